"""The paper's multi-label classifier (section IV): timm encoder + Dropout-Linear-ELU-Dropout-Linear.

Training follows the paper unless the profile overrides it: BCE averaged over classes and batch,
Adam with lr 1e-4 for the encoder and 1e-3 for the head, ReduceLROnPlateau on the validation loss
(patience 3, factor 0.5), horizontal flips (vertical optional), K-fold cross-validation on the
folds of the data layer. The weights of the 3 epochs with the lowest validation loss are averaged
(``torch.optim.swa_utils.AveragedModel``; BatchNorm statistics recomputed on the training data with
``update_bn``) and the average makes the out-of-fold predictions and, later, the CAMs.

The network returns **logits**; probabilities are ``sigmoid(logits)`` (the paper's final Sigmoid).
The CAM stage differentiates the logits by default (as pytorch-grad-cam's ``ClassifierOutputTarget``
does); ``cams.compute_cams(..., target="prob")`` differentiates the probabilities instead.

Every fold is checkpointed atomically after every epoch, with the random state needed to continue
exactly: an interrupted fold resumes where it stopped and ends with the same weights as an
uninterrupted run. Finished folds are reused unless their data or parameters changed (the run
folder's name is a hash of both).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import timm
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm import tqdm

from . import distributed, paper, weights
from .data import ImageDataset
from .device import autocast, model_device, resolve_device, to_model
from .trainer import ResumableTrainer, load_checkpoint, save_checkpoint, side_by_side
from .utils import (ConfigError, UserError, atomic_write_text, bars, chunks, config_key,
                    describe_weights, file_digest, read_json, say, stable_hash, write_json)


class PretrainedUnavailable(UserError, RuntimeError):
    """ImageNet weights were asked for but could not be loaded (no network, no file)."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """timm encoder -> global average pooling -> paper head (logits, one per class).

    ``target_layer`` is the module whose output is the last activation before pooling (for timm
    EfficientNet: ``bn2``, i.e. conv_head -> BatchNorm -> SiLU); ``features(x)`` returns that
    activation and ``head_from_features(A)`` maps it to logits, so ``forward(x) ==
    head_from_features(features(x))``.
    """

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int,
                 hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(num_features, hidden), nn.ELU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.num_classes = num_classes
        self.frozen = 0  # stages kept as they start (freeze)

    @property
    def target_layer(self) -> nn.Module:
        enc = self.encoder
        if hasattr(enc, "conv_head") and hasattr(enc, "bn2"):  # timm EfficientNet family
            return enc.bn2
        return enc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def head_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(feats).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_from_features(self.features(x))

    def param_groups(self, lr_encoder: float, lr_head: float) -> list[dict]:
        trained = [p for p in self.encoder.parameters() if p.requires_grad]
        return [{"params": trained, "lr": lr_encoder, "name": "encoder"},
                {"params": list(self.head.parameters()), "lr": lr_head, "name": "head"}]

    def freeze(self, stages: int) -> None:
        """Keep the encoder's stem and its first ``stages`` stages as they are
        (:func:`weights.freeze_stem`)."""
        weights.freeze_stem(self.encoder, stages, "classifier freeze")
        self.frozen = max(stages, 0)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """What the frozen stem and stages make of ``x``: a fixed function of the image
        (:func:`weights.freeze_stem`), which :class:`StemFeatures` computes once per image."""
        enc = self.encoder
        return enc.blocks[:self.frozen](enc.bn1(enc.conv_stem(x)))

    def from_stem(self, f: torch.Tensor) -> torch.Tensor:
        """The logits from :meth:`stem`'s output: ``from_stem(stem(x)) == forward(x)`` (a test).
        The encoder runs its own forward with the frozen layers set aside for the call."""
        enc = self.encoder
        kept = enc.conv_stem, enc.bn1, enc.blocks
        enc.conv_stem, enc.bn1, enc.blocks = nn.Identity(), nn.Identity(), kept[2][self.frozen:]
        try:
            return self.head_from_features(enc(f))
        finally:
            enc.conv_stem, enc.bn1, enc.blocks = kept


def build_classifier(encoder: str, num_classes: int, pretrained: bool = False,
                     weights_path: str | Path | None = None, hidden: int = 256,
                     dropout: float = 0.2) -> Classifier:
    """A :class:`Classifier` with a timm encoder built by name (``efficientnet_b0``, ...).

    ``weights_path``: a local timm weights file for the encoder (works offline). ``pretrained``:
    timm's usual source (a model hub); if that fails, :class:`PretrainedUnavailable` is raised.
    Random weights only when asked for (``pretrained=False``): never a silent fallback, so that
    a table's "ImageNet" is always true.
    """
    kwargs = dict(num_classes=0, global_pool="")
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights_path {path}: file not found")
        enc = timm.create_model(encoder, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    elif pretrained and weights.packaged(encoder) is not None:  # installed, offline
        enc = timm.create_model(encoder, pretrained=False, **kwargs)
        own = enc.state_dict()
        enc.load_state_dict({k: v for k, v in weights.state_dict(encoder).items() if k in own})
    elif pretrained:
        try:
            enc = timm.create_model(encoder, pretrained=True, **kwargs)
        except Exception as e:  # network, hub, missing file: all mean "no weights here"
            raise PretrainedUnavailable(
                f"ImageNet weights for {encoder!r} could not be loaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}). Give a local timm weights "
                f"file (classifier.weights_path=FILE; cam2mask train --weights-path FILE), or "
                f"ask for random weights explicitly (--random-weights; pretrained=False)"
            ) from None
    else:
        enc = timm.create_model(encoder, pretrained=False, **kwargs)
    # channels of the spatial feature map: not always timm's num_features (MobileNetV3 applies
    # its conv_head spatially when global_pool=""), so measure it
    enc.eval()
    with torch.no_grad():
        channels = int(enc(torch.zeros(1, 3, 64, 64)).shape[1])
    enc.train()
    return Classifier(enc, channels, num_classes, hidden=hidden, dropout=dropout)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

MAX_SIDE = 4096  # the largest input side any run may ask for (the paper's widest is 1600)


@dataclass(frozen=True)
class TrainConfig:
    """The classifier's training settings; the defaults are the paper's (section IV).
    ``image_size`` is also the CAM stage's input and the resolution masks are scored at."""

    encoder: str = "efficientnet_b0"
    image_size: tuple[int, int] = (256, 1600)
    epochs: int = 30
    batch_size: int = 64
    lr_encoder: float = 1e-4
    lr_head: float = 1e-3
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    hflip: bool = True
    vflip: bool = False
    hidden: int = 256
    dropout: float = 0.2
    top_k: int = 3
    pretrained: bool = False
    weights_path: str | None = None  # a local timm weights file (offline ImageNet weights)
    freeze: int = 0  # the encoder's stem and first stages kept as they start (Classifier.freeze)
    # 0: the folds one after another in this process, with torch's threads (one per core). N:
    # up to N folds at a time, each in its own process with one thread: on 2 cores two 1-thread
    # processes train ~1.5x the images of one 2-thread process, and the weights no longer depend
    # on the machine's core count (the thread count changes how sums are ordered)
    fold_processes: int = 0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    cache_images: bool = True
    # "workers": PIL decodes and resizes in the DataLoader workers (or the memory-mapped cache);
    # "device": the workers read JPEG bytes, decoded per batch on the model's device
    # (torchvision's decode_jpeg, nvJPEG on CUDA), for data too large to cache
    decode: str = "workers"
    channels_last: bool = True  # ~1.5x faster on CPU for MobileNet/EfficientNet

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ConfigError(f"classifier image_size {self.image_size}: expected (height, width), "
                             f"each at least 32 pixels (the encoder downsamples 32x)")
        if max(self.image_size) > MAX_SIDE:
            raise ConfigError(f"classifier image_size {self.image_size}: each side at most "
                              f"{MAX_SIDE} pixels (the paper's input is 256x1600; a larger one "
                              f"would not fit a batch in memory)")
        if self.freeze < 0:
            raise ConfigError(f"classifier freeze={self.freeze}: must be >= 0")
        if self.freeze and not (self.pretrained or self.weights_path):
            raise ConfigError(f"classifier freeze={self.freeze}: freezing stages of random "
                              f"weights keeps them random; give ImageNet weights or freeze=0")
        for name in ("epochs", "batch_size", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"classifier {name}={getattr(self, name)}: must be at least 1")
        if self.num_workers < 0:
            raise ConfigError(f"classifier num_workers={self.num_workers}: must be >= 0")
        if self.fold_processes < 0:
            raise ConfigError(f"classifier fold_processes={self.fold_processes}: must be >= 0 "
                              f"(0: the folds one after another in this process)")
        if self.decode not in ("workers", "device"):
            raise ConfigError(f"classifier decode={self.decode!r}: expected 'workers' or 'device'")
        if self.decode == "device" and self.cache_images:
            raise ConfigError("classifier decode='device' decodes the JPEG files for every batch; "
                              "set cache_images=False with it (the cache holds decoded images)")
        if not timm.is_model(self.encoder):
            close = timm.list_models(f"*{self.encoder.split('_')[0][:6]}*")[:5]
            raise ConfigError(f"classifier encoder {self.encoder!r} is not a timm model name"
                              + (f"; similar names: {close}" if close else ""))

    def key(self) -> dict:
        """What the trained weights depend on (:func:`utils.config_key`: not where or how fast
        they are computed), with a weights file as its bytes' digest."""
        d = config_key(self, skip=("device", "num_workers", "cache_images", "fold_processes"))
        if self.fold_processes:  # one thread per fold, however many processes run side by side
            d["threads"] = 1
        if self.freeze:  # frozen stages keep their batch-norm statistics (weights.freeze_stem)
            d["frozen_stats"] = True
        if self.weights_path is not None:  # the file's bytes, not where it lies
            d["weights_path"] = file_digest(self.weights_path)
        elif self.pretrained and weights.packaged(self.encoder) is not None:
            d["weights_file"] = file_digest(weights.packaged(self.encoder).path())
        return d

    def weights(self) -> str:
        """How the encoder starts, for tables."""
        src = weights.packaged(self.encoder)
        if self.pretrained and self.weights_path is None and src is not None:
            text = src.describe()
        else:
            text = describe_weights(self.pretrained, self.weights_path, "timm's hub")
        return text + weights.frozen_note(self.freeze)


# --------------------------------------------------------------------------------------------
# Weight averaging
# --------------------------------------------------------------------------------------------

def average_state_dicts(states: Sequence[dict]) -> dict:
    """Element-wise mean of floating-point tensors of several state dicts (integer buffers such
    as BatchNorm's ``num_batches_tracked`` are taken from the first)."""
    if not states:
        raise ValueError("nothing to average")
    out = {}
    for k, v in states[0].items():
        if torch.is_floating_point(v):
            out[k] = sum(s[k].double() for s in states).div(len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def averaged_model(model: Classifier, states: Sequence[dict], bn_batches: Iterable[torch.Tensor],
                   device: torch.device, from_stem: bool = False) -> Classifier:
    """Average ``states`` into ``model`` with ``AveragedModel`` (equal weights), then recompute the
    BatchNorm statistics on ``bn_batches`` with ``update_bn`` (those of trained layers: a frozen
    stage keeps its own, :func:`weights.freeze_stem`); ``from_stem``: the batches are
    :class:`StemFeatures`'. Returns the plain module."""
    swa = AveragedModel(model)
    for s in states:
        model.load_state_dict(s)
        swa.update_parameters(model)
    update_bn(bn_batches, _FromStem(swa.module) if from_stem else swa, device=device)
    return swa.module


# --------------------------------------------------------------------------------------------
# Training one fold (resumable)
# --------------------------------------------------------------------------------------------

def _batches(ds, rows: np.ndarray, batch_size: int, gen: torch.Generator | None, num_workers: int):
    """uint8 images ``[B, 3, H, W]`` (normalised on the model's device by ``to_model``) and
    labels of ``ds`` in batches; shuffled with ``gen`` when given. With ``num_workers`` the
    dataset's persistent workers decode and resize (``ds.loader``: started once, not for every
    epoch and prediction pass), and batches arrive in pinned memory when CUDA is present."""
    order = rows if gen is None else rows[torch.randperm(len(rows), generator=gen).numpy()]
    labels = torch.from_numpy(ds.index.labels.astype(np.float32))
    for b, x in ds.batches(order, batch_size, num_workers):
        yield x, labels[ds.rows[b]]


def _augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, part=(0, 1),
             size: int | None = None) -> torch.Tensor:
    """Random flips of ``x``; with DDP ``x`` is slice ``part = (rank, ranks)`` of a batch of
    ``size`` images, and every rank draws for the whole batch and keeps its slice's draws, so the
    flips are those of one process."""
    size = len(x) if size is None else size
    for dim, f in _flip_draws(cfg, gen, part, size):  # drawn on the CPU, applied on x's device
        x = torch.where(f.to(x.device)[:, None, None, None], x.flip(dim), x)
    return x


def _flip_dims(cfg: TrainConfig) -> list[int]:
    """The dims of the flips the configuration asks for, in the order applied."""
    return [dim for dim, on in ((-1, cfg.hflip), (-2, cfg.vflip)) if on]


def _flip_draws(cfg: TrainConfig, gen: torch.Generator, part=(0, 1),
                size: int = 0) -> list[tuple[int, torch.Tensor]]:
    """``(dim, flipped?)`` of each flip of :func:`_flip_dims`: drawn for a batch of ``size``
    images with ``gen`` (on the CPU), this rank's slice kept."""
    return [(dim, (torch.rand(size, generator=gen) < 0.5)[part[0]::part[1]])
            for dim in _flip_dims(cfg)]


# the most memory the frozen stages' features may take (StemFeatures); past it they are computed
# again at every step, as the other configurations do
STEM_FEATURES_BYTES = 4 << 30


class StemFeatures:
    """The frozen stem's and stages' output (:meth:`Classifier.stem`) for every image of ``ds``
    in every flip the training draws, computed once for every epoch of a fold: the frozen layers
    (their batch-norm statistics included) see the same images again and again. Training,
    validation, the weights' average and the out-of-fold predictions then run
    :meth:`Classifier.from_stem` on them: the same numbers as from the images (a test),
    without the frozen layers' forward pass at full resolution (1.5-1.7x faster training steps
    at 192x512 and 192x192 on 2 cores, measured; docs/real_data.md).
    Kept on ``model``'s device, as ``[images, flips, C, h, w]``; ``model``: the fold's own, in
    the layout it trains in (another layout rounds the sums otherwise)."""

    def __init__(self, model: Classifier, ds, cfg: TrainConfig, progress=True):
        dims = _flip_dims(cfg)
        self.variants = [[d for i, d in enumerate(dims) if v >> i & 1]
                         for v in range(2 ** len(dims))]
        t, model = time.perf_counter(), model.eval()
        parts = []
        with torch.no_grad(), autocast(model_device(model)):
            for _, x in ds.batches(np.arange(len(ds)), cfg.batch_size * 2, cfg.num_workers):
                x = to_model(x, model)
                parts.append(torch.stack([model.stem(x.flip(v) if v else x).float()
                                           for v in self.variants], 1).contiguous())
        self.features = torch.cat(parts)
        say(progress, f"classifier: the frozen stages' features of {len(ds)} images x "
                      f"{len(self.variants)} flips computed once ({self.nbytes / 2**30:.1f} GiB, "
                      f"{time.perf_counter() - t:.0f} s)")

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    @staticmethod
    def fits(model: Classifier, n_images: int, cfg: TrainConfig) -> bool:
        """Whether the features of ``n_images`` at ``cfg.image_size`` stay within
        :data:`STEM_FEATURES_BYTES`."""
        with torch.no_grad():
            one = model.eval().stem(torch.zeros(1, 3, *cfg.image_size,
                                                device=model_device(model)))
        return one.numel() * 4 * n_images * 2 ** len(_flip_dims(cfg)) <= STEM_FEATURES_BYTES

    def batch(self, positions, draws: Sequence[tuple[int, torch.Tensor]] = ()) -> torch.Tensor:
        """The features of the images at ``positions`` of the dataset, each in the flips that
        ``draws`` (:func:`_flip_draws`) gave it."""
        idx = torch.as_tensor(np.asarray(positions), device=self.features.device)
        v = torch.zeros(len(idx), dtype=torch.long, device=self.features.device)
        for i, (_, f) in enumerate(draws):
            v += f.to(v.device).long() << i
        return self.features[idx, v]


class _FromStem(nn.Module):
    """A classifier that reads :class:`StemFeatures` (for ``update_bn``)."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.from_stem(f)


@torch.no_grad()
def predict_logits(model: nn.Module, ds, rows: np.ndarray, batch_size: int,
                   num_workers: int = 0, stem: StemFeatures | None = None) -> np.ndarray:
    """Logits ``[len(rows), C]`` of ``model`` (eval mode) on its own device and layout; from
    ``stem``'s features of those rows when given."""
    model.eval()
    device = model_device(model)
    out = []
    if stem is not None:
        for b in chunks(rows, batch_size):
            with autocast(device):
                f = to_model(stem.batch(b), model)
                out.append(model.from_stem(f).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, model.num_classes), np.float32)
    for x, _ in _batches(ds, rows, batch_size, None, num_workers):
        with autocast(device):
            out.append(model(to_model(x, model)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_classes), np.float32)


def roc_auc_per_class(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC-AUC of each column; NaN where a class has only positives or only negatives."""
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        if 0 < y[:, c].sum() < len(y):
            out[c] = roc_auc_score(y[:, c], p[:, c])
    return out


class ClassifierTrainer(ResumableTrainer):
    """One fold of the paper's recipe: BCE, Adam with encoder/head learning rates,
    ReduceLROnPlateau on the validation loss, flips; keeps the ``top_k`` epochs' weights.

    With ``ddp`` (under torchrun) every rank trains the same fold: rank ``r`` of ``G`` takes
    images ``r, r + G, ...`` of every batch (the batch size must divide by ``G``), BatchNorm
    statistics cover the whole batch (:func:`distributed.sync_batchnorm`), the loss is scaled so
    that DDP's average of the ranks' gradients is the whole batch's, flips are drawn for the
    whole batch; every rank validates, and rank 0 writes the checkpoints. Dropout's masks are
    not those of one process (each rank draws its own), so the weights differ from a
    single-process run by more than rounding; with dropout 0 they agree to rounding (a test).

    Frozen stages (``cfg.freeze``) take their batch-norm statistics from the fold's training
    images first (:func:`weights.adapt_frozen_stats`) and keep them; with one process their
    output for every image is then computed once (:class:`StemFeatures`, ``cache_stem``) and
    read instead of the images: the same weights to rounding (a test)."""

    def __init__(self, ds, labels: np.ndarray, folds: np.ndarray, fold: int, cfg: TrainConfig,
                 out: Path, progress: bool = True, ddp: bool = False, cache_stem: bool = True):
        rank, world = (distributed.rank(), distributed.world()) if ddp else (0, 1)
        super().__init__(out, cfg.epochs, cfg.seed, fold, desc=f"fold {fold}",
                         progress=progress if rank == 0 else False)
        self.rank, self.world, self.writer = rank, world, rank == 0
        if cfg.batch_size % world:
            raise ConfigError(f"classifier batch_size={cfg.batch_size} does not divide among "
                              f"{world} ranks (DDP inside a fold gives each rank an equal slice)")
        self.ds, self.cfg, self.labels, self.stem = ds, cfg, labels, None
        self.train_rows = np.flatnonzero(folds != fold)
        self.val_rows = np.flatnonzero(folds == fold)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed * 7919 + fold)
        self.model = build_classifier(cfg.encoder, labels.shape[1], pretrained=cfg.pretrained,
                                      weights_path=cfg.weights_path, hidden=cfg.hidden,
                                      dropout=cfg.dropout)
        self.model.freeze(cfg.freeze)
        self.model.to(self.device, memory_format=self.memory_format)
        if cfg.freeze:
            model = self.model
            weights.adapt_frozen_stats(model, model.stem, (
                to_model(x, model) for x, _ in _batches(ds, self.train_rows, cfg.batch_size, None,
                                                        cfg.num_workers)))
            if cache_stem and world == 1 and StemFeatures.fits(model, len(ds), cfg):
                self.stem = StemFeatures(model, ds, cfg, progress)
        self.opt = torch.optim.Adam(self.model.param_groups(cfg.lr_encoder, cfg.lr_head))
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        self.loss_fn = nn.BCEWithLogitsLoss()  # mean over classes and batch, as the paper's formula
        self.top: list[tuple[float, int]] = []  # (val loss, epoch), best first
        self.net = self.model
        if world > 1:
            self.model = distributed.sync_batchnorm(self.model)
            cuda = self.device.type == "cuda"
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None)

    def _train_batches(self, gen: torch.Generator):
        """``(images, labels, images in the whole batch)`` of one epoch, shuffled with ``gen``:
        the whole batches with one rank; with DDP this rank's slice of each (a last batch smaller
        than the number of ranks is left out, so that every rank takes the same number of
        steps)."""
        cfg, rows = self.cfg, self.train_rows
        order = rows[torch.randperm(len(rows), generator=gen).numpy()]
        mine, sizes = distributed.batch_slices(order, cfg.batch_size, self.rank, self.world)
        per_rank = cfg.batch_size // self.world
        if self.stem is not None:  # the images' positions: their features are read in run_epoch
            labels = torch.from_numpy(self.ds.index.labels.astype(np.float32))
            for b, n in zip(chunks(mine, per_rank), sizes):
                yield b, labels[self.ds.rows[b]], n
            return
        for (x, y), n in zip(_batches(self.ds, mine, per_rank, None, cfg.num_workers), sizes):
            yield x, y, n

    @property
    def memory_format(self):
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def run_epoch(self, epoch, gen):
        cfg, model = self.cfg, self.model
        model.train()
        # the loss summed on the device (float64: the sum a Python float makes), read once an
        # epoch: a float() per step would wait for the GPU at every step
        t0, n = time.perf_counter(), 0
        tot = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y, size in self._train_batches(gen):
            if self.stem is not None:  # the same flips drawn, their features read
                x = to_model(self.stem.batch(x, _flip_draws(cfg, gen, size=size)), model)
                forward = model.from_stem
            else:
                x = to_model(_augment(x, cfg, gen, (self.rank, self.world), size), model)
                forward = self.net
            with autocast(self.device):
                loss = self.loss_fn(forward(x).float(), y.to(self.device))
            self.opt.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: each rank's mean is weighted by its share (1 alone)
            (loss * (len(x) * self.world / size)).backward()
            self.opt.step()
            tot += loss.detach().double() * len(x)
            n += len(x)
        if self.world > 1:  # on the model's device (NCCL reduces CUDA tensors only)
            both = torch.stack([tot, torch.tensor(float(n), dtype=torch.float64,
                                                  device=self.device)])
            torch.distributed.all_reduce(both)
            tot, n = both[0], int(both[1])
        tot = float(tot)
        logits = predict_logits(model, self.ds, self.val_rows, cfg.batch_size * 2, cfg.num_workers,
                                self.stem)
        y_val = self.labels[self.val_rows].astype(np.float32)
        val_loss = float(self.loss_fn(torch.from_numpy(logits), torch.from_numpy(y_val)))
        with np.errstate(over="ignore"):  # a confident logit of -90 is a probability of 0
            auc = roc_auc_per_class(self.labels[self.val_rows], 1 / (1 + np.exp(-logits)))
        self.sched.step(val_loss)
        return {"fold": self.fold, "epoch": epoch, "train_loss": tot / max(n, 1),
                "val_loss": val_loss,
                "val_auc": float(np.nanmean(auc)) if not np.all(np.isnan(auc)) else float("nan"),
                "lr_encoder": self.opt.param_groups[0]["lr"],
                "lr_head": self.opt.param_groups[1]["lr"], "seconds": time.perf_counter() - t0}

    def after_epoch(self, epoch, record):
        """Keep the weights of the ``top_k`` epochs with the lowest validation loss."""
        self.top.append((record["val_loss"], epoch))
        self.top.sort()
        if self.writer:
            if any(e == epoch for _, e in self.top[:self.cfg.top_k]):
                save_checkpoint(self.out / f"epoch{epoch}.pt", self.model.state_dict())
            for _, e in self.top[self.cfg.top_k:]:
                (self.out / f"epoch{e}.pt").unlink(missing_ok=True)
        self.top = self.top[:self.cfg.top_k]

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "top": self.top}

    def load_state(self, st):
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.top = [tuple(t) for t in st["top"]]

    def postfix(self, record):
        return {"loss": f"{record['train_loss']:.3f}", "val": f"{record['val_loss']:.3f}",
                "auc": f"{record['val_auc']:.3f}"}

    def average(self) -> Classifier:
        """The top epochs' weights averaged (BatchNorm statistics recomputed on the training
        images): the fold's final model."""
        states = [load_checkpoint(self.out / f"epoch{e}.pt") for _, e in self.top]
        bn_gen = torch.Generator().manual_seed(self.cfg.seed + self.fold)
        if self.stem is not None:  # the same order, the features of each batch
            order = self.train_rows[torch.randperm(len(self.train_rows), generator=bn_gen).numpy()]
            bn_batches = (to_model(self.stem.batch(b), self.model)
                          for b in chunks(order, self.cfg.batch_size))
        else:
            bn_batches = (to_model(x, self.model)
                          for x, _ in _batches(self.ds, self.train_rows, self.cfg.batch_size,
                                               bn_gen, self.cfg.num_workers))
        return averaged_model(self.model, states, bn_batches, self.device,
                              from_stem=self.stem is not None)


def train_fold(ds, labels: np.ndarray, folds: np.ndarray, fold: int, cfg: TrainConfig,
               out: Path, progress: bool = True, ddp: bool = False,
               cache_stem: bool = True) -> dict:
    """Train on all folds but ``fold``, validate on ``fold``; write checkpoints to ``out``.
    With ``ddp`` every rank calls it for the same fold (see :class:`ClassifierTrainer`); rank 0
    averages the weights and writes the result, the others wait for it.

    Returns ``{"oof": probs of the fold's rows, "rows": those rows, "history": [...]}``.
    A finished fold (``out/done.json``) is loaded, not retrained.
    """
    out = Path(out)
    done = out / "done.json"
    if done.is_file():
        rec = read_json(done)
        return {"oof": np.load(out / "oof.npy"), "rows": np.flatnonzero(folds == fold),
                "history": rec["history"]}
    trainer = ClassifierTrainer(ds, labels, folds, fold, cfg, out, progress, ddp=ddp,
                                cache_stem=cache_stem)
    history = trainer.fit()
    if trainer.world > 1:
        if trainer.writer:
            train_fold(ds, labels, folds, fold, cfg, out, progress=False)  # rank 0 finishes
        distributed.barrier()
        return train_fold(ds, labels, folds, fold, cfg, out)  # done: read
    avg = trainer.average()
    save_checkpoint(out / "final.pt", avg.state_dict())
    with np.errstate(over="ignore"):  # exp of a large -logit is inf: the probability 0, exactly
        probs = 1 / (1 + np.exp(-predict_logits(avg, ds, trainer.val_rows, cfg.batch_size * 2,
                                                 cfg.num_workers, trainer.stem)))
    np.save(out / "oof.npy", probs)
    write_json(done, {"history": history, "averaged_epochs": [e for _, e in trainer.top]})
    return {"oof": probs, "rows": trainer.val_rows, "history": history}


def _fold_job(args) -> tuple[int, float]:
    """One fold of :func:`train_folds_in_processes`, in its worker process."""
    ds, labels, folds, fold, cfg, out = args
    t = time.perf_counter()
    train_fold(ds, labels, folds, fold, cfg, out, progress=False)
    return fold, time.perf_counter() - t


def train_folds_in_processes(ds, labels: np.ndarray, folds: np.ndarray, todo: Sequence[int],
                             cfg: TrainConfig, out: Path, progress: bool = True) -> None:
    """Train the folds ``todo`` side by side, up to ``cfg.fold_processes`` at a time, each in a
    process of one thread (:func:`trainer.side_by_side`). Each fold writes its folder as
    :func:`train_fold` does, so the caller then reads the finished folds; a fold's weights are
    those of a one-thread :func:`train_fold` in this process (a test). An interrupted call leaves
    every fold's last epoch checkpointed, to resume."""
    n = min(cfg.fold_processes, len(todo))
    say(progress, f"classifier: folds {[k + 1 for k in todo]} in {n} processes of one thread "
                  f"each ({out.name})")
    jobs = [(ds, labels, folds, k, cfg, out / f"fold{k}") for k in todo]
    for k, seconds in side_by_side(_fold_job, jobs, n):
        say(progress, f"classifier: fold {k + 1} finished in {seconds:.0f} s")


# --------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------

@dataclass
class ClassifierRun:
    """A cross-validated classifier: its run folder, configuration, class names, out-of-fold
    probabilities ``oof`` [N, C] (NaN for folds not trained), training history, ROC-AUC per class
    on the union of the finished folds, whether every fold finished, and which folds this call
    trained (the others were read from their finished folders)."""

    dir: Path
    config: TrainConfig
    class_names: list[str]
    oof: np.ndarray
    history: pd.DataFrame
    auc: np.ndarray
    complete: bool
    trained: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def run_dir(base: Path, index, folds: np.ndarray, cfg: TrainConfig) -> Path:
    key = {"data": index.fingerprint(masks=False), "labels": stable_hash(index.labels.tolist()),
           "folds": stable_hash(folds.tolist()), "train": cfg.key()}
    return Path(base) / f"{cfg.encoder}_{stable_hash(key)}"


def train_cv(index, folds: np.ndarray, cfg: TrainConfig, base: Path,
             only_folds: Iterable[int] | None = None, progress: bool = True,
             ds=None, ddp: bool = False) -> ClassifierRun:
    """Train every fold (or ``only_folds``) and collect out-of-fold probabilities; also writes
    ``config.json``, ``oof.csv`` and ``history.csv`` in the run folder. ``ddp``: every rank of
    a torchrun job trains each fold together (see :class:`ClassifierTrainer`)."""
    out = run_dir(base, index, folds, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"config": asdict(cfg), "n_images": len(index),
                                     "class_names": index.class_names})
    if ds is None:
        ds = ImageDataset(index, cfg.image_size, with_masks=False, cache=cfg.cache_images,
                          decode_device=resolve_device(cfg.device) if cfg.decode == "device"
                          else None)
    n_folds = int(folds.max()) + 1
    todo = list(range(n_folds)) if only_folds is None else sorted(set(only_folds))
    for k in todo:
        if not 0 <= k < n_folds:
            raise ConfigError(f"fold {k} does not exist; folds are 0..{n_folds - 1}")
    trained = [k for k in todo if not (out / f"fold{k}" / "done.json").is_file()]
    if cfg.fold_processes and trained:
        if ddp:
            raise ConfigError("classifier fold_processes: folds in processes of their own and "
                              "torchrun's ranks are two ways to share the folds; use one "
                              "(fold_processes=0 under torchrun)")
        train_folds_in_processes(ds, index.labels, folds, trained, cfg, out, progress)
    oof = np.full(index.labels.shape, np.nan, dtype=np.float64)
    hist = []
    for k in tqdm(range(n_folds), desc="folds", disable=not bars(progress)):
        fdir = out / f"fold{k}"
        if k not in todo and not (fdir / "done.json").is_file():
            continue
        say(progress, f"classifier: fold {k + 1}/{n_folds} ({out.name})")
        res = train_fold(ds, index.labels, folds, k, cfg, fdir, progress=progress, ddp=ddp)
        oof[res["rows"]] = res["oof"]
        hist += res["history"]
    history = pd.DataFrame(hist)
    df = pd.DataFrame(oof, columns=[f"p_{c}" for c in index.class_names])
    df.insert(0, "image_id", index.image_ids)
    df.insert(1, "fold", folds)
    atomic_write_text(out / "oof.csv", df.to_csv(index=False))
    atomic_write_text(out / "history.csv", history.to_csv(index=False))
    done_rows = ~np.isnan(oof).any(1)
    auc = roc_auc_per_class(index.labels[done_rows], oof[done_rows]) if done_rows.any() else \
        np.full(index.num_classes, np.nan)
    return ClassifierRun(dir=out, config=cfg, class_names=list(index.class_names), oof=oof,
                         history=history, auc=auc, complete=not np.isnan(oof).any(),
                         trained=tuple(trained))


# --------------------------------------------------------------------------------------------
# Reading finished runs
# --------------------------------------------------------------------------------------------

def _fold_model(cfg: TrainConfig, num_classes: int, state_path: Path,
                device: torch.device | str | None) -> Classifier:
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: this fold has not finished training")
    model = build_classifier(cfg.encoder, num_classes, pretrained=False, hidden=cfg.hidden,
                             dropout=cfg.dropout)
    model.load_state_dict(load_checkpoint(state_path))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return model.to(resolve_device(device or cfg.device), memory_format=fmt).eval()


def load_fold_model(run: Path, fold: int, num_classes: int, cfg: TrainConfig,
                    device: torch.device | str | None = None) -> Classifier:
    """The averaged (final) model of one fold in eval mode, on ``device`` (default: the
    configuration's) and in the layout it was trained in."""
    return _fold_model(cfg, num_classes, Path(run) / f"fold{fold}" / "final.pt", device)


def fold_models(run: ClassifierRun, weights: str = "averaged",
                device: torch.device | str | None = None) -> dict[int, Classifier]:
    """The classifier of every finished fold: ``"averaged"`` (top-3 epochs, the paper's SWA) or
    ``"best_epoch"`` (the single epoch with the lowest validation loss, no averaging)."""
    if weights not in ("averaged", "best_epoch"):
        raise ValueError(f"weights must be 'averaged' or 'best_epoch', got {weights!r}")
    out = {}
    for fdir in sorted(Path(run.dir).glob("fold*")):
        k = int(fdir.name[4:])
        if weights == "averaged":
            out[k] = load_fold_model(run.dir, k, run.num_classes, run.config, device)
        else:
            best = read_json(fdir / "done.json")["averaged_epochs"][0]
            out[k] = _fold_model(run.config, run.num_classes, fdir / f"epoch{best}.pt", device)
    return out


def load_run(run: str | Path, class_names=None, device=None) -> dict:
    """A finished classifier run folder (``.../classifier/<encoder>_<hash>/``, as ``train_cv``
    writes it): ``{"config": TrainConfig, "class_names", "dir", "models": {fold: Classifier}}``.
    Raises a clear error for a folder that is not one, has no finished fold, or (with
    ``class_names``) was trained on other classes."""
    run = Path(run)
    cfg_file = run / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run}: not a classifier run folder (no config.json); give the "
                                f"folder that holds config.json and fold*/final.pt, e.g. "
                                f"artifacts/cpu/classifier/<encoder>_<hash> or OUT/work/classifier/...")
    meta = read_json(cfg_file)
    cfg = TrainConfig(**meta["config"])
    names = [str(c) for c in meta.get("class_names", [])]
    if class_names is not None and len(names) != len(class_names):
        raise ConfigError(f"{run}: the classifier has {len(names)} classes {names}; the data has "
                         f"{len(class_names)} {list(class_names)}")
    folds = sorted(int(p.parent.name[4:]) for p in run.glob("fold*/final.pt"))
    if not folds:
        raise FileNotFoundError(f"{run}: no finished fold (fold*/final.pt)")
    return {"config": cfg, "class_names": names, "dir": run,
            "models": {k: load_fold_model(run, k, len(names), cfg, device) for k in folds}}


def table1(auc: np.ndarray, class_names: Sequence[str], label: str):
    """Table 1: ROC-AUC per class on the union of the folds, the paper's rows beside ours."""
    rows = [{"model": label, **{f"class {c}": float(a) for c, a in zip(class_names, auc)},
             "mean": float(np.nanmean(auc)), "source": "this run"}]
    if list(class_names) == list(paper.CLASS_COUNTS):
        for name, vals in paper.TABLE1.items():
            rows.append({"model": name, **{f"class {c}": v for c, v in zip(class_names, vals)},
                         "mean": float(np.mean(vals)), "source": "paper (Kaggle Severstal)"})
    return pd.DataFrame(rows)
