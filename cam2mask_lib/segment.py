"""Segmentation networks and losses: the paper's U-Net, the thesis's grid, the lecture's toolbox.

Models (``build_segmenter``): every segmentation-models-pytorch architecture by name (``unet``,
``unetplusplus``, ``fpn``, ``deeplabv3plus``, ``linknet``, ``pspnet``, ...; timm encoders with the
``tu-`` prefix), plus the two networks of the thesis that smp does not have: ``thesis_unet`` (plain
U-Net, 32-64-128-256-512 filters, BatchNorm, transposed-convolution decoder) and
``resnet_encdec`` (a ResNet encoder with a mirrored decoder and no skip connections).

Losses (``make_loss``): all take logits ``[N, C(+1), H, W]`` and uint8 masks ``[N, C, H, W]``
where ``IGNORE`` (255) marks pixels that do not count (pseudo-labels):

* ``bce_dice``: the thesis's 0.7 BCE - Dice (4 sigmoid masks);
* ``cce_dice``: the thesis's 0.7 CCE - 0.25 Dice over 5 softmax masks (background first), with
  class weights (default 2, 2.5, 1, 2 for the classes, 1 for the background);
* ``focal``: focal loss, ``FL = -(1 - p_t)^gamma log p_t`` (gamma 2);
* ``bce_logdice``: the lecture's BCE - ln(Dice);
* ``lovasz``: Lovasz hinge (for fine-tuning);
* ``bce_smooth``: BCE with label smoothing ``y_ls = y (1 - a) + a / 2`` (a = 0.1).

Dice terms are smp's soft Dice: per class over the batch, classes without true pixels left out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

IGNORE = 255
THESIS_CLASS_WEIGHTS = (2.0, 2.5, 1.0, 2.0)


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
        import timm

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


def build_segmenter(arch: str, encoder: str = "resnet18", classes: int = 4,
                    pretrained: bool = False, slim: bool = False, **kwargs) -> nn.Module:
    """A segmentation network by name: the thesis's ``thesis_unet`` / ``resnet_encdec``, or any
    smp architecture (``smp.create_model``) with ``encoder`` (``tu-<timm name>`` for timm).
    ``slim`` narrows the decoder (see :data:`SLIM`); ``kwargs`` go to the model."""
    kwargs = {**(SLIM.get(arch.lower(), {}) if slim else {}), **kwargs}
    if arch == "thesis_unet":
        return ThesisUNet(classes=classes, **kwargs)
    if arch == "resnet_encdec":
        return ResNetEncDec(encoder=encoder, classes=classes, pretrained=pretrained)
    import segmentation_models_pytorch as smp

    try:
        return smp.create_model(arch, encoder_name=encoder,
                                encoder_weights="imagenet" if pretrained else None,
                                classes=classes, **kwargs)
    except (OSError, ConnectionError, RuntimeError) as e:
        if not pretrained:
            raise
        raise RuntimeError(f"could not load ImageNet weights for the {arch} encoder {encoder!r} "
                           f"({type(e).__name__}: {e}); without internet pass pretrained=False "
                           f"(random init) or put the weights in the torch hub cache") from e


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

def _masked_bce(logits, target, smooth: float = 0.0):
    """BCE over the pixels that are not IGNORE, with optional label smoothing towards 1/2."""
    valid = target != IGNORE
    y = torch.where(valid, target, torch.zeros_like(target)).float()
    if smooth:
        y = y * (1 - smooth) + smooth / 2
    per = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (per * valid).sum() / valid.sum().clamp_min(1)


def _masked_focal(logits, target, gamma: float = 2.0):
    """Sigmoid focal loss ``-(1 - p_t)^gamma log p_t`` averaged over non-IGNORE pixels. Written
    here because smp's FocalLoss fails in multilabel mode with ignore_index (it indexes a class
    slice with the full mask); tests check it equals smp's where nothing is ignored."""
    valid = target != IGNORE
    y = torch.where(valid, target, torch.zeros_like(target)).float()
    logp = -nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per = -((1 - logp.exp()) ** gamma) * logp
    return (per * valid).sum() / valid.sum().clamp_min(1)


class _Loss(nn.Module):
    def __init__(self, kind: str, num_classes: int, class_weights=None, gamma: float = 2.0,
                 smoothing: float = 0.1):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.kind, self.num_classes = kind, num_classes
        self.gamma, self.smoothing = gamma, smoothing
        self.dice = smp.losses.DiceLoss("multilabel", from_logits=True, ignore_index=IGNORE)
        self.sm_dice = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)
        self.lovasz = smp.losses.LovaszLoss("multilabel", ignore_index=IGNORE)
        w = list(class_weights) if class_weights is not None else (
            list(THESIS_CLASS_WEIGHTS) if num_classes == 4 else [1.0] * num_classes)
        self.register_buffer("ce_weights", torch.tensor([1.0] + w, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(torch.long if self.kind == "cce_dice" else logits.dtype)
        if self.kind == "bce_dice":
            return 0.7 * _masked_bce(logits, target) - (1 - self.dice(logits, target))
        if self.kind == "bce_logdice":
            dice = (1 - self.dice(logits, target)).clamp_min(1e-7)
            return _masked_bce(logits, target) - torch.log(dice)
        if self.kind == "bce_smooth":
            return _masked_bce(logits, target, self.smoothing)
        if self.kind == "focal":
            return _masked_focal(logits, target, self.gamma)
        if self.kind == "lovasz":
            return self.lovasz(logits, target)
        if self.kind == "cce_dice":
            idx = to_class_index(target)
            ce = nn.functional.cross_entropy(logits, idx, weight=self.ce_weights,
                                             ignore_index=IGNORE)
            return 0.7 * ce - 0.25 * (1 - self.sm_dice(logits, idx))
        raise ValueError(self.kind)


LOSSES = ("bce_dice", "cce_dice", "focal", "bce_logdice", "lovasz", "bce_smooth")


def make_loss(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A loss by name (see :data:`LOSSES`); ``cce_dice`` expects ``num_classes + 1`` logits."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
    return _Loss(name, num_classes, **kwargs)


def to_class_index(masks: torch.Tensor) -> torch.Tensor:
    """Per-class masks ``[N, C, H, W]`` -> class index ``[N, H, W]`` (0 = background, c + 1 =
    class c; where classes overlap the last wins; IGNORE anywhere -> IGNORE)."""
    m = masks.long()
    ignore = (m == IGNORE).any(1)
    fg = (m == 1)
    idx = torch.zeros(m.shape[0], *m.shape[2:], dtype=torch.long, device=m.device)
    for c in range(m.shape[1]):
        idx[fg[:, c]] = c + 1
    idx[ignore] = IGNORE
    return idx


# --------------------------------------------------------------------------------------------
# Pseudo-labels from CAMs
# --------------------------------------------------------------------------------------------

def pseudo_labels(maps: np.ndarray, present: np.ndarray, high: float = 0.6,
                  low: float = 0.2) -> np.ndarray:
    """Training targets from CAMs that only trust confident pixels.

    ``maps`` ``[N, C, H, W]`` in [0, 1]; ``present`` ``[N, C]`` bool: the class is in the image
    (its image-level label, or the classifier's confident prediction). For a present class:
    1 where the CAM is above ``high``, 0 below ``low``, IGNORE (255) in between. For an absent
    class the whole map is 0 (confidently background). Returns uint8 ``[N, C, H, W]``.
    """
    if not 0 <= low <= high <= 1:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    out = np.full(maps.shape, IGNORE, dtype=np.uint8)
    out[maps > high] = 1
    out[maps < low] = 0
    out[~np.asarray(present, bool)] = 0
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegConfig:
    """How a segmentation network is trained; the defaults are the paper's U-Net (EfficientNet-b0
    encoder). ``ema``: evaluate an exponential moving average of the weights (decay per step, e.g.
    0.99); ``swa_start``: evaluate the plain average of the weights at the end of every epoch
    from this one on (stochastic weight averaging, BatchNorm statistics recomputed after)."""

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
    encoder_init: str | None = None  # "classifier": start from the fold's classifier encoder
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True

    def __post_init__(self):
        if self.encoder_init not in (None, "classifier"):
            raise ValueError(f"encoder_init must be None or 'classifier', got {self.encoder_init!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.ema is not None and self.swa_start is not None:
            raise ValueError("choose ema or swa_start, not both")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema is a decay in (0, 1), got {self.ema}")
        if self.swa_start is not None and not 0 <= self.swa_start < self.epochs:
            raise ValueError(f"swa_start must be an epoch in [0, {self.epochs}), got {self.swa_start}")

    @classmethod
    def from_profile(cls, profile, **overrides) -> "SegConfig":
        """The profile's ``seg_*`` fields (``seg_epochs`` -> ``epochs``) plus its seed, device and
        ``pretrained``; ``overrides`` win."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        vals = {k[4:]: getattr(profile, k) for k in dir(profile)
                if k.startswith("seg_") and k[4:] in names}
        vals.update(seed=profile.seed, device=profile.device, pretrained=profile.pretrained)
        vals.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(vals) - names)
        if unknown:
            raise KeyError(f"unknown segmentation parameter(s) {unknown}; valid: {sorted(names)}")
        return cls(**vals)

    def key(self) -> dict:
        """What the trained weights depend on."""
        d = asdict(self)
        d.pop("device")
        return d


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


def train_segmenter(ds, targets, rows, num_classes: int, cfg: SegConfig, out: str | Path,
                    progress: bool = True, fold: int = 0,
                    encoder_state: dict | None = None) -> nn.Module:
    """Train a segmentation network on ``rows`` of ``ds`` (items with an ``image``), with
    ``targets(rows) -> uint8 [len(rows), C, H, W]`` (0/1, IGNORE = 255 for pixels that do not
    count). Checkpoints every epoch atomically in ``out`` and resumes from them; a finished run
    (``out/final.pt``) is loaded, not retrained. ``encoder_state``: initial encoder weights (see
    :func:`load_encoder`). Returns the model (the EMA or SWA average when asked for) in eval
    mode, on the training device."""
    from tqdm import tqdm

    from .classify import _load, _rng_for, _save, resolve_device
    from .utils import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    classes = num_classes + 1 if cfg.loss == "cce_dice" else num_classes
    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.arch, cfg.encoder, classes=classes, pretrained=cfg.pretrained,
                            slim=cfg.slim)
    if encoder_state is not None:
        load_encoder(model, encoder_state)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    avg = None
    if cfg.ema or cfg.swa_start is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        avg = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
               if cfg.ema else AveragedModel(model))
    final = out / "final.pt"
    result = avg.module if avg is not None else model
    if final.is_file():
        result.load_state_dict(_load(final))
        return result.to(device).eval()
    loss_fn = make_loss(cfg.loss, num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, history = 0, []
    state = out / "state.pt"
    if state.is_file():
        st = _load(state)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        if avg is not None:
            avg.load_state_dict(st["avg"])
        start, history = st["epoch"] + 1, st["history"]
    rows = np.asarray(rows)

    def batch(b, gen=None):
        x = torch.stack([ds[int(i)]["image"] for i in b])
        if gen is None:
            return x.to(device, memory_format=fmt)
        y = torch.from_numpy(np.ascontiguousarray(targets(b)))
        if cfg.hflip:
            f = torch.rand(len(b), generator=gen) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
            y = torch.where(f[:, None, None, None], y.flip(-1), y)
        return x.to(device, memory_format=fmt), y.to(device)

    for epoch in tqdm(range(start, cfg.epochs), desc=f"{cfg.arch}/{cfg.loss}", disable=not progress,
                      initial=start, total=cfg.epochs, leave=False):
        gen = _rng_for(cfg, fold, epoch)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model.train()
        order = rows[torch.randperm(len(rows), generator=gen).numpy()]
        tot, n = 0.0, 0
        for s in range(0, len(order), cfg.batch_size):
            b = order[s:s + cfg.batch_size]
            x, y = batch(b, gen)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.ema:
                avg.update_parameters(model)
            tot += float(loss.detach()) * len(b)
            n += len(b)
        if cfg.swa_start is not None and epoch >= cfg.swa_start:
            avg.update_parameters(model)
        history.append({"epoch": epoch, "loss": tot / max(n, 1)})
        _save(state, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                      "history": history, "avg": avg.state_dict() if avg is not None else None})
    if cfg.swa_start is not None:  # BatchNorm statistics of the averaged weights
        from torch.optim.swa_utils import update_bn

        with torch.no_grad():
            update_bn((batch(rows[s:s + cfg.batch_size]) for s in range(0, len(rows), cfg.batch_size)),
                      avg, device=device)
    result = avg.module if avg is not None else model
    _save(final, result.state_dict())
    write_json(out / "done.json", {"config": asdict(cfg), "history": history})
    return result.eval()


@torch.no_grad()
def predict_masks(model: nn.Module, ds, rows, loss: str = "bce_dice", batch_size: int = 16):
    """Yield ``(rows, probabilities [b, C, H, W])`` per batch: sigmoid of the logits, or for a
    softmax model (``cce_dice``) the softmax without the background channel."""
    model.eval()
    device = next(model.parameters()).device
    rows = np.asarray(rows)
    for s in range(0, len(rows), batch_size):
        b = rows[s:s + batch_size]
        x = torch.stack([ds[int(i)]["image"] for i in b])
        z = model(x.to(device, memory_format=torch.channels_last)).float()
        p = z.softmax(1)[:, 1:] if loss == "cce_dice" else z.sigmoid()
        yield b, p.cpu().numpy()
