"""Segmentation networks and their training: the paper's U-Net, the thesis's grid, the lecture's
toolbox.

Models (``build_segmenter``): every segmentation-models-pytorch architecture by name (``unet``,
``unetplusplus``, ``fpn``, ``deeplabv3plus``, ``linknet``, ``pspnet``, ...; timm encoders with the
``tu-`` prefix), plus the two networks of the thesis that smp does not have: ``thesis_unet`` (plain
U-Net, 32-64-128-256-512 filters, BatchNorm, transposed-convolution decoder) and
``resnet_encdec`` (a ResNet encoder with a mirrored decoder and no skip connections).

Losses are in :mod:`cam2mask_lib.losses` (one class each, by name). Training
(:func:`train_segmenter`) is the shared resumable loop of :mod:`cam2mask_lib.trainer` with an
optional EMA or SWA of the weights; :func:`confident_labels` makes training targets that only
trust confident pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from .device import autocast, model_device, resolve_device, to_model
from .losses import IGNORE, LOSSES, make_loss, output_channels, probabilities
from .trainer import ResumableTrainer, load_checkpoint, save_checkpoint
from .utils import ConfigError, UserError, config_key, describe_weights, file_digest, write_json
from .weights import freeze_stem, frozen_note


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def _conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ThesisUNet(nn.Module):
    """The thesis's plain U-Net: 4 poolings, filters 32-64-128-256-512 (``base`` x 1..16), two
    3x3 conv + BN + ReLU per level, transposed-convolution upsampling, skip connections."""

    def __init__(self, in_channels: int = 3, classes: int = 4, base: int = 32):
        super().__init__()
        ch = [base * 2 ** i for i in range(5)]
        self.down = nn.ModuleList([_conv_bn(in_channels, ch[0])] +
                                  [_conv_bn(ch[i - 1], ch[i]) for i in range(1, 5)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i], ch[i - 1], 2, stride=2)
                                 for i in range(4, 0, -1)])
        self.dec = nn.ModuleList([_conv_bn(2 * ch[i - 1], ch[i - 1]) for i in range(4, 0, -1)])
        self.head = nn.Conv2d(ch[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # odd sizes: pad to the skip's size
                x = nn.functional.pad(x, (0, skip.shape[-1] - x.shape[-1], 0,
                                          skip.shape[-2] - x.shape[-2]))
            x = dec(torch.cat([skip, x], 1))
        return self.head(x)


class ResNetEncDec(nn.Module):
    """The thesis's ResNet encoder-decoder: a timm ResNet (any depth) down to 1/32, then a
    mirrored stack of transposed convolutions back to the input size, with no skip connections."""

    def __init__(self, encoder: str = "resnet18", classes: int = 4, pretrained: bool = False):
        super().__init__()
        self.encoder = timm.create_model(encoder, pretrained=pretrained, features_only=True,
                                         out_indices=(4,))
        c = self.encoder.feature_info.channels()[-1]
        chans = [c, c // 2, c // 4, c // 8, c // 16, max(c // 32, 16)]
        self.decoder = nn.Sequential(*[nn.Sequential(
            nn.ConvTranspose2d(chans[i], chans[i + 1], 2, stride=2, bias=False),
            nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)) for i in range(5)])
        self.head = nn.Conv2d(chans[-1], classes, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = self.head(self.decoder(self.encoder(x)[-1]))
        return nn.functional.interpolate(y, size=(h, w), mode="bilinear", align_corners=False) \
            if y.shape[-2:] != (h, w) else y


# CPU-sized decoders (``slim=True``): about a quarter of smp's default widths, measured 4x faster
# to train at 64x384 on 2 cores (U-Net with a MobileNetV3 encoder: 26 -> 105 images/s)
SLIM = {"unet": {"decoder_channels": (64, 32, 16, 16, 8)},
        "unetplusplus": {"decoder_channels": (64, 32, 16, 16, 8)},
        "manet": {"decoder_channels": (64, 32, 16, 16, 8)},
        "fpn": {"decoder_pyramid_channels": 64, "decoder_segmentation_channels": 32},
        "deeplabv3plus": {"decoder_channels": 64},
        "deeplabv3": {"decoder_channels": 64},
        "linknet": {},
        "thesis_unet": {"base": 8}}


class EncoderWeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights for a segmentation encoder were asked for but could not be loaded."""


def read_weights(path: str | Path) -> dict:
    """A state dict from a local file: ``torch.save`` output (a state dict, or a checkpoint
    holding one under ``state_dict`` or ``model``) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights_path {path}: expected a state dict, found {type(state).__name__}")
    return state


def build_segmenter(arch: str, encoder: str = "resnet18", classes: int = 4,
                    pretrained: bool = False, slim: bool = False,
                    weights_path: str | Path | None = None, **kwargs) -> nn.Module:
    """A segmentation network by name: the thesis's ``thesis_unet`` / ``resnet_encdec``, or any
    smp architecture (``smp.create_model``) with ``encoder`` (``tu-<timm name>`` for timm).
    ``slim`` narrows the decoder (see :data:`SLIM`); ``kwargs`` go to the model. The encoder
    starts from ``weights_path`` (a local file with the encoder's weights: timm's state dict for
    ``tu-`` and thesis encoders, smp's for its own; works offline), else from ImageNet weights
    with ``pretrained`` (smp's or timm's download), else from random weights; a failed download
    is an error, never a silent fallback to random weights."""
    if weights_path is not None:
        model = build_segmenter(arch, encoder, classes, pretrained=False, slim=slim, **kwargs)
        load_encoder(model, read_weights(weights_path))
        return model
    kwargs = {**(SLIM.get(arch.lower(), {}) if slim else {}), **kwargs}
    if arch == "thesis_unet":
        return ThesisUNet(classes=classes, **kwargs)
    try:
        if arch == "resnet_encdec":
            return ResNetEncDec(encoder=encoder, classes=classes, pretrained=pretrained)
        # smp names timm ("tu-") weights by the encoder's tag and asks for True; its own, "imagenet"
        weights = (True if encoder.startswith("tu-") else "imagenet") if pretrained else None
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights,
                                classes=classes, **kwargs)
    except (OSError, ConnectionError, RuntimeError) as e:  # no network, no hub, no file
        if not pretrained:
            raise
        raise EncoderWeightsUnavailable(
            f"could not load ImageNet weights for the {arch} encoder {encoder!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Give a local "
            f"file (segmentation.net.weights_path=FILE; grid.weights_path=FILE for the grid's "
            f"encoder), or ask for random weights explicitly (--random-weights; pretrained=False)"
        ) from None


# --------------------------------------------------------------------------------------------
# Pseudo-labels from CAMs
# --------------------------------------------------------------------------------------------

def confident_labels(defect: np.ndarray | torch.Tensor, background, present
                     ) -> np.ndarray | torch.Tensor:
    """Training targets that only trust confident pixels, uint8 ``[N, C, H, W]``: for a class in
    the image's label (``present`` ``[N, C]``), 1 where ``defect``, 0 where ``background`` (and
    not ``defect``), ``losses.IGNORE`` elsewhere; for an absent class 0 everywhere (the label says
    the defect is not there). The confident pixels of a CAM (defect above one cut, background
    below a lower one: :func:`seg_stage.confident_targets`) and the refined masks with their band
    (:func:`refine.self_training_targets`) are both made here. A tensor on ``defect``'s device
    for a tensor, else a numpy array."""
    d = defect.bool() if isinstance(defect, torch.Tensor) else torch.from_numpy(
        np.asarray(defect, bool))
    out = torch.full(d.shape, IGNORE, dtype=torch.uint8, device=d.device)
    out[torch.as_tensor(background, device=d.device).bool()] = 0
    out[d] = 1
    out[~torch.as_tensor(np.asarray(present, bool), device=d.device)] = 0
    return out if isinstance(defect, torch.Tensor) else out.numpy()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegConfig:
    """How a segmentation network is trained; the defaults are the paper's U-Net (EfficientNet-b0
    encoder). ``ema``: evaluate an exponential moving average of the weights (decay per step, e.g.
    0.99); ``swa_start``: evaluate the plain average of the weights at the end of every epoch
    from this one on (stochastic weight averaging, BatchNorm statistics recomputed after).
    ``hflip``: the paper's augmentation, each image flipped left to right with its targets at
    random."""

    arch: str = "unet"
    encoder: str = "efficientnet-b0"  # the paper's (smp's name for the EfficientNet encoder)
    loss: str = "bce_dice"
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    hflip: bool = True
    ema: float | None = None
    swa_start: int | None = None
    slim: bool = False
    pretrained: bool = False
    weights_path: str | None = None  # a local file with the encoder's (ImageNet) weights
    encoder_init: str | None = None  # "classifier": start from the fold's classifier encoder
    # the timm encoder's stem and first stages kept as they start (weights.freeze_stem): the
    # refined method's U-Nets keep frozen what their classifier kept at its ImageNet weights
    freeze: int = 0
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    num_workers: int = 0  # DataLoader workers that decode the images (uncached data)
    # 0: a stage's networks one after another in this process, with torch's threads. N: up to N
    # networks (set-ups x held-out folds) at a time, each in its own process with one thread
    # (trainer.side_by_side), its targets made here first (seg_stage.FixedTargets)
    processes: int = 0

    def __post_init__(self):
        if self.processes < 0:
            raise ConfigError(f"segmentation processes={self.processes}: must be >= 0 (0: the "
                              f"networks one after another in this process)")
        if self.num_workers < 0:
            raise ConfigError(f"segmentation num_workers={self.num_workers}: must be >= 0")
        if self.encoder_init not in (None, "classifier"):
            raise ConfigError(f"encoder_init must be None or 'classifier', got {self.encoder_init!r}")
        if self.freeze < 0:
            raise ConfigError(f"segmentation freeze={self.freeze}: must be >= 0")
        if self.freeze and not (self.encoder_init or self.pretrained or self.weights_path):
            raise ConfigError(f"segmentation freeze={self.freeze}: freezing stages of random "
                              f"weights keeps them random; start the encoder from trained "
                              f"weights (encoder_init, pretrained, weights_path) or freeze=0")
        if self.freeze and not self.encoder.startswith("tu-"):
            raise ConfigError(f"segmentation freeze={self.freeze}: only a timm encoder "
                              f"('tu-<name>') can be frozen, not {self.encoder!r}")
        if self.encoder_init and self.weights_path:
            raise ConfigError(f"segmentation encoder: encoder_init={self.encoder_init!r} and "
                              f"weights_path={self.weights_path!r} both set where it starts; "
                              f"choose one")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {tuple(LOSSES)}")
        if self.ema is not None and self.swa_start is not None:
            raise ConfigError("choose ema or swa_start, not both")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"ema is a decay in (0, 1), got {self.ema}")
        if self.swa_start is not None and not 0 <= self.swa_start < self.epochs:
            raise ConfigError(f"swa_start must be an epoch in [0, {self.epochs}), got {self.swa_start}")

    def key(self) -> dict:
        """What the trained weights depend on (:func:`utils.config_key`), with a weights file as
        its bytes' digest."""
        d = config_key(self, skip=("device", "num_workers", "processes"))
        if self.processes:  # one thread per network, however many processes run side by side
            d["threads"] = 1
        if self.freeze:  # the frozen stages' batch norms keep their statistics (freeze_stem)
            d["frozen_stats"] = True
        if self.weights_path is not None:  # the file's bytes, not where it lies
            d["weights_path"] = file_digest(self.weights_path)
        return d

    def weights(self) -> str:
        """How the encoder starts (and what of it stays frozen), for tables."""
        frozen = frozen_note(self.freeze)
        if self.encoder_init == "classifier":
            return "started from the fold's classifier" + frozen
        if self.arch == "thesis_unet":
            return "RANDOM initialisation (no encoder)"
        return describe_weights(self.pretrained, self.weights_path, "downloaded") + frozen


@dataclass(frozen=True)
class SegStageConfig:
    """The segmentation stage: the network and its training (``net``), its input ``size`` (sides
    divisible by 32; None: the classifier's input size), the ``folds`` held out and scored (None:
    every fold), whether to train on defective images only, and a cap on training images per fold
    (``max_train``, None: all)."""

    net: SegConfig = field(default_factory=SegConfig)
    size: tuple[int, int] | None = None
    folds: tuple[int, ...] | None = None
    defective_only: bool = False
    max_train: int | None = None

    def __post_init__(self):
        if self.size is not None:
            size = tuple(int(v) for v in self.size)
            object.__setattr__(self, "size", check_size(size, "segmentation size"))
        if self.folds is not None:
            object.__setattr__(self, "folds", tuple(int(f) for f in self.folds))
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(f"segmentation max_train={self.max_train}: must be >= 1 or None")


def check_size(size: tuple[int, int], what: str) -> tuple[int, int]:
    """``size`` when both sides are positive multiples of 32 (five 2x poolings in every smp
    encoder), else a ValueError that suggests the nearest smaller size."""
    if len(size) != 2 or min(size) < 32 or size[0] % 32 or size[1] % 32:
        hint = "x".join(str(max(32, v // 32 * 32)) for v in size)
        raise ConfigError(f"{what} {'x'.join(map(str, size))} has a side not divisible by 32 (or "
                         f"below 32); choose e.g. {hint}")
    return size


def load_encoder(model: nn.Module, state: dict) -> None:
    """Copy a timm encoder's weights (e.g. a trained classifier's) into a segmentation network
    whose encoder is the same timm model (smp's ``tu-<name>``); every encoder weight must be
    found in ``state`` (keys the encoder lacks, like a classifier's final conv, are skipped)."""
    enc = getattr(model, "encoder", None)
    target = getattr(enc, "model", enc)
    if target is None:
        raise ValueError(f"{type(model).__name__} has no encoder to initialise")
    own = target.state_dict()
    missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if missing:
        raise ValueError(f"the given weights do not fit the encoder ({len(missing)} of {len(own)} "
                         f"tensors missing or of another shape, e.g. {missing[:3]}); the "
                         f"segmentation encoder must be 'tu-<the classifier's timm encoder>'")
    target.load_state_dict({k: state[k] for k in own})


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, cfg: SegConfig):
    """Images ``x`` ``[B, 3, H, W]`` and their targets ``y`` ``[B, C, H, W]`` flipped left to
    right together where ``cfg.hflip`` asks, every image drawn on its own from ``gen`` (on the
    CPU; the draw moves to the batch's device)."""
    if cfg.hflip:
        f = (torch.rand(len(x), generator=gen) < 0.5)[:, None, None, None]
        x = torch.where(f.to(x.device), x.flip(-1), x)
        y = torch.where(f.to(y.device), y.flip(-1), y)
    return x, y


class SegmenterTrainer(ResumableTrainer):
    """A segmentation network trained on ``rows`` of ``ds`` with ``targets(rows)``; keeps an EMA
    (updated every step) or SWA (updated at the end of every epoch from ``swa_start``) average."""

    def __init__(self, ds, targets, rows, num_classes: int, cfg: SegConfig, out: Path,
                 progress: bool = True, fold: int = 0, encoder_state: dict | None = None):
        super().__init__(out, cfg.epochs, cfg.seed, fold, desc=f"{cfg.arch}/{cfg.loss}",
                         progress=progress)
        self.ds, self.targets, self.cfg = ds, targets, cfg
        self.rows = np.asarray(rows)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = build_segmenter(cfg.arch, cfg.encoder,
                                     classes=output_channels(cfg.loss, num_classes),
                                     # an encoder about to be overwritten is not downloaded
                                     pretrained=cfg.pretrained and encoder_state is None,
                                     slim=cfg.slim, weights_path=cfg.weights_path)
        if encoder_state is not None:
            load_encoder(self.model, encoder_state)
        if cfg.freeze:
            freeze_stem(self.model.encoder.model, cfg.freeze, "segmentation freeze")
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.fmt)
        self.avg = None
        if cfg.ema:
            self.avg = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema),
                                     use_buffers=True)
        elif cfg.swa_start is not None:
            self.avg = AveragedModel(self.model)
        self.loss_fn = make_loss(cfg.loss, num_classes).to(self.device)
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                    lr=cfg.lr)

    @property
    def result(self) -> nn.Module:
        """The network evaluated: the EMA / SWA average when there is one."""
        return self.avg.module if self.avg is not None else self.model

    def batch(self, b, gen=None, x: torch.Tensor | None = None):
        """Images (and, with ``gen``, flipped together with their targets) on the device; ``x``:
        the uint8 images of ``b`` when a loader has read them already."""
        x = self.ds.uint8_batch(b) if x is None else x  # normalised on the device by to_model
        if gen is None:
            return to_model(x, self.model)
        # targets that read this dataset's images (their guide) take the batch, not a second read
        y = (self.targets(b, x) if getattr(self.targets, "guide", None) is self.ds
             else self.targets(b))
        y = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(y))
        x, y = augment(x, y, gen, self.cfg)
        return to_model(x, self.model), y.to(self.device)

    def run_epoch(self, epoch, gen):
        cfg, model = self.cfg, self.model
        model.train()
        order = self.rows[torch.randperm(len(self.rows), generator=gen).numpy()]
        # the loss summed on the device (float64: the sum a Python float makes), read once an
        # epoch: a float() per step would wait for the GPU at every step
        tot, n = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for b, x in self.ds.batches(order, cfg.batch_size, cfg.num_workers):
            x, y = self.batch(b, gen, x)
            with autocast(self.device):  # bf16 on CUDA, full precision elsewhere
                loss = self.loss_fn(model(x).float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if cfg.ema:
                self.avg.update_parameters(model)
            tot += loss.detach().double() * len(b)
            n += len(b)
        if cfg.swa_start is not None and epoch >= cfg.swa_start:
            self.avg.update_parameters(model)
        return {"epoch": epoch, "loss": float(tot) / max(n, 1)}

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "avg": self.avg.state_dict() if self.avg is not None else None}

    def load_state(self, st):
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        if self.avg is not None:
            self.avg.load_state_dict(st["avg"])

    def finish(self) -> nn.Module:
        """BatchNorm statistics of the SWA average (recomputed on the training images)."""
        if self.cfg.swa_start is not None:
            bs = self.cfg.batch_size
            with torch.no_grad():
                update_bn((self.batch(b, None, x) for b, x in
                           self.ds.batches(self.rows, bs, self.cfg.num_workers)),
                          self.avg, device=self.device)
        return self.result


def train_segmenter(ds, targets, rows, num_classes: int, cfg: SegConfig, out: str | Path,
                    progress: bool = True, fold: int = 0,
                    encoder_state: dict | None = None) -> nn.Module:
    """Train a segmentation network on ``rows`` of ``ds`` (items with an ``image``), with
    ``targets(rows) -> uint8 [len(rows), C, H, W]`` (0/1, IGNORE = 255 for pixels that do not
    count); targets with a ``guide`` that is ``ds`` are called ``targets(rows, images)`` with the
    batch's uint8 images. Checkpoints every epoch atomically in ``out`` and resumes from them; a
    finished run (``out/final.pt``) is loaded, not retrained. ``encoder_state``: initial encoder
    weights (see :func:`load_encoder`). Returns the model (the EMA or SWA average when asked for) in eval
    mode, on the training device."""
    out = Path(out)
    trainer = SegmenterTrainer(ds, targets, rows, num_classes, cfg, out, progress, fold,
                               encoder_state)
    final = out / "final.pt"
    if final.is_file():
        trainer.result.load_state_dict(load_checkpoint(final))
        return trainer.result.to(trainer.device).eval()
    history = trainer.fit()
    result = trainer.finish()
    save_checkpoint(final, result.state_dict())
    write_json(out / "done.json", {"config": asdict(cfg), "history": history})
    return result.eval()


@torch.no_grad()
def predict_masks(model: nn.Module, ds, rows, loss: str = "bce_dice", batch_size: int = 16,
                  numpy: bool = True, num_workers: int = 0):
    """Yield ``(rows, probabilities [b, C, H, W])`` per batch, computed on the model's device (see
    :func:`losses.probabilities`): numpy arrays, or with ``numpy=False`` float32 tensors left on
    that device. ``num_workers``: the images read by the dataset's persistent workers."""
    model.eval()
    device = model_device(model)
    for b, x in ds.batches(rows, batch_size, num_workers):
        with autocast(device):  # bf16 on CUDA, full precision elsewhere
            logits = model(to_model(x, model))
        p = probabilities(loss, logits.float())
        yield b, (p.cpu().numpy() if numpy else p)
