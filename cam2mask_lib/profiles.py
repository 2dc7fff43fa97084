"""Profiles: one named, frozen set of parameters per scale of run, composed of the stages' own
configurations.

``smoke``  tests and CI: a few dozen small synthetic images; every notebook runs in seconds.
``cpu``    the default main job on a laptop or this project's 2-core build machines, no GPU, no
           internet: synthetic data at Severstal's native 256x1600 size, read at a reduced input
           size (see the profile's ``notes`` for the budget).
``paper``  the real Kaggle Severstal data at full size on a GPU with the paper's settings.

A :class:`Profile` holds what every stage shares (``seed``, ``device``, ``n_folds``) and one
configuration per stage: the network stages define theirs (``classifier``:
:class:`classify.TrainConfig`; ``segmentation``: :class:`segment.SegStageConfig`, whose ``net`` is
a :class:`segment.SegConfig`), and the two that have no module of their own below the pipeline
are defined here: ``data`` (:class:`DataConfig`, loaded by :func:`pipeline.context`) and ``grid``
(:class:`GridConfig`, Table 4's runs in :mod:`experiments`). Imports point one way: this module
imports configurations only, and every module that runs on a context imports it, never the
reverse. Anything can be overridden, by section or with dotted names::

    get_profile("cpu", seed=1, classifier={"epochs": 3})
    get_profile("cpu", **{"classifier.epochs": 3, "segmentation.net.loss": "focal"})

An unknown name or field is an error that lists the valid ones. Later stages read their settings
from here, so a notebook's parameters cell only names the profile and the few values a reader is
likely to change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .classify import TrainConfig
from .segment import SegConfig, SegStageConfig, check_size
from .utils import ConfigError, check_weights_file, describe_weights, repo_root


@dataclass(frozen=True)
class DataConfig:
    """Which data a profile runs on: a folder (``data_dir``, Severstal or generic format) or, when
    None, a synthetic set of ``synthetic_n`` images of ``synthetic_size`` generated on first use."""

    data_dir: str | None = None
    synthetic_n: int = 800
    synthetic_size: tuple[int, int] = (256, 1600)

    def __post_init__(self):
        object.__setattr__(self, "synthetic_size", tuple(int(v) for v in self.synthetic_size))

    def describe(self) -> str:
        return self.data_dir or (f"synthetic n={self.synthetic_n} "
                                 f"{self.synthetic_size[0]}x{self.synthetic_size[1]}")


@dataclass(frozen=True)
class GridConfig:
    """Notebook 05's runs: ``epochs`` and input ``size`` (None: the segmentation stage's),
    training images per run (``max_train``, None: the stage's), the held-out ``folds`` scored
    (None: the stage's; the thesis scored one split, so the paper profile holds out fold 0 only),
    and the thesis's ResNet encoder
    (``encoder``, a timm name; None: the classifier's encoder, started from the classifier),
    which starts from ImageNet weights where the segmentation network does (``pretrained``), from
    ``weights_path`` (a local file of that encoder's weights) when given."""

    epochs: int | None = None
    size: tuple[int, int] | None = None
    encoder: str | None = "resnet34"
    max_train: int | None = None
    weights_path: str | None = None
    folds: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.folds is not None:
            object.__setattr__(self, "folds", tuple(int(f) for f in self.folds))
        if self.size is not None:
            object.__setattr__(self, "size", check_size(tuple(int(v) for v in self.size),
                                                        "grid size"))
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"grid epochs={self.epochs}: must be >= 1 or None")


@dataclass(frozen=True)
class Profile:
    """What every stage shares (``seed``, ``device``: copied into the stage configurations that
    train; ``n_folds``) and one configuration per stage."""

    name: str = ""
    notes: str = ""
    seed: int = 0
    device: str = "auto"
    n_folds: int = 5
    data: DataConfig = field(default_factory=DataConfig)
    classifier: TrainConfig = field(default_factory=TrainConfig)
    segmentation: SegStageConfig = field(default_factory=SegStageConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def __post_init__(self):
        if self.n_folds < 2:
            raise ConfigError(f"profile {self.name!r}: n_folds={self.n_folds}; cross-validation "
                             f"needs at least 2 folds")
        for what, folds in (("segmentation.folds", self.segmentation.folds),
                            ("grid.folds", self.grid.folds)):
            bad = [f for f in folds or () if not 0 <= f < self.n_folds]
            if bad or folds == ():
                raise ConfigError(f"profile {self.name!r}: {what}={list(folds)}: expected fold "
                                  f"numbers 0..{self.n_folds - 1} (None: every fold)")
        check_weights_file(self.classifier.weights_path, "classifier.weights_path")
        check_weights_file(self.segmentation.net.weights_path, "segmentation.net.weights_path")
        check_weights_file(self.grid.weights_path, "grid.weights_path")
        shared = dict(seed=self.seed, device=self.device)
        object.__setattr__(self, "classifier", dataclasses.replace(self.classifier, **shared))
        seg = self.segmentation
        object.__setattr__(self, "segmentation",
                           dataclasses.replace(seg, net=dataclasses.replace(seg.net, **shared)))

    @property
    def image_size(self) -> tuple[int, int]:
        """The classifier's input size: also the CAMs' size and the resolution masks are scored
        at."""
        return self.classifier.image_size

    def weights(self) -> str:
        """How every network starts (each stage's configuration says for its own), for tables."""
        seg = self.segmentation.net.weights()
        text = f"classifier {self.classifier.weights()}, segmentation {seg}"
        if self.grid.encoder:
            grid = describe_weights(self.segmentation.net.pretrained, self.grid.weights_path,
                                    "timm's hub")
            text += f", grid's {self.grid.encoder} {grid}"
        return text

    def describe(self) -> str:
        return (f"profile {self.name!r}: data {self.data.describe()}, input {self.image_size[0]}x"
                f"{self.image_size[1]}, {self.n_folds} folds, seed {self.seed}")


def _cpu_scale(n: int, made_at, read_at, epochs: int, batch: int, seg_size, seg_epochs: int,
               n_folds: int = 3, lr: float = 2e-3, seg_batch: int | None = None,
               fold_processes: int = 0) -> dict:
    """What the CPU profiles share (see the cpu profile's notes for why): ``n`` synthetic images
    made at ``made_at`` and read at ``read_at``, 3 folds, timm's MobileNetV3 from random weights
    with a raised encoder learning rate, and a U-Net with the same encoder (started from the
    fold's classifier) and a slim decoder, trained on the defective images of folds 1-2.
    ``fold_processes``: the classifier's folds side by side, one process of one thread each."""
    return dict(
        n_folds=n_folds, data=DataConfig(synthetic_n=n, synthetic_size=made_at),
        classifier=TrainConfig(encoder="mobilenetv3_small_050", image_size=read_at, epochs=epochs,
                               batch_size=batch, lr_encoder=lr, lr_head=lr,
                               fold_processes=fold_processes),
        segmentation=SegStageConfig(
            net=SegConfig(arch="unet", encoder="tu-mobilenetv3_small_050", slim=True, lr=3e-3,
                          epochs=seg_epochs, batch_size=seg_batch or batch,
                          encoder_init="classifier"),
            size=seg_size, folds=(0,), defective_only=True))


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        notes="Tests and CI. 40 synthetic images made at 128x800 and read at 64x400, 3 folds, "
              "2 epochs of a tiny encoder, so that every notebook finishes in seconds. Its numbers "
              "show that the code runs, not what the method is worth.",
        **_cpu_scale(n=40, made_at=(128, 800), read_at=(64, 400), epochs=2, batch=8,
                     seg_size=(32, 192), seg_epochs=1),
        grid=GridConfig(encoder=None)),
    "cpu": Profile(
        name="cpu",
        notes="Default: 2 CPU cores, no GPU, no internet. 1600 synthetic images at Severstal's "
              "256x1600 (~50 s to generate), read at 128x800: CAM maps have 1/32 of the input's "
              "resolution, and 128x800 gives 4x25 maps where 64x400 gives 2x12, too coarse to "
              "localise a defect. At 128x800 EfficientNet-b0 trains at ~6 images/s here, so the "
              "encoder is timm's mobilenetv3_small_050 (~95 images/s with channels_last, 10-15x "
              "faster; same 4x25 maps, same head and recipe). No ImageNet weights can be "
              "downloaded: it starts from random weights, so the encoder's learning rate is "
              "raised from the paper's 1e-4 (meant for a pretrained encoder) to 2e-3. Measured: "
              "with 800 images x 5 folds x 12 epochs the mean out-of-fold AUC was 0.83 in 8.5 "
              "min; twice the images with 3 folds (half the training per epoch: each image is "
              "trained on twice, not four times) reached 0.90 in 8 epochs, so: 1600 images, "
              "3 folds, 10 epochs (~6 min). Segmentation (notebooks 04-05): 64x384 input (sides "
              "divisible by 32); a U-Net with the same MobileNetV3 encoder and a slim decoder "
              "(~100 images/s training, 4x the full decoder); its encoder starts from the fold's "
              "classifier, because from random weights every network tried learned nothing in 2-3 "
              "epochs (all masks empty; measured). Trained on the defective images of folds 1-2, "
              "scored on fold 0: 3 epochs per network in Table 3 (~20 s each); the grid uses 2 "
              "epochs on 160 images per run (17 runs in ~2 min). The classifier's 3 folds train "
              "side by side, one process of one thread each: on 2 cores faster than one "
              "2-thread process, and the weights no longer depend on the core count. Sized for "
              "a 15-minute run on 2 cores: 10.6 min on a Zen 5 EPYC, about 30 on a Zen 1 one "
              "(docs/cpu_timing.md).",
        **_cpu_scale(n=1600, made_at=(256, 1600), read_at=(128, 800), epochs=10, batch=16,
                     seg_size=(64, 384), seg_epochs=3, fold_processes=3),
        grid=GridConfig(epochs=2, max_train=160, encoder=None)),
    "lecture": Profile(
        name="lecture",
        notes="A lab: the whole method, notebooks 00-06, in 4.5-6 minutes on 2 CPU cores. The "
              "cpu profile's recipe at half its data and a third of its training: 800 synthetic "
              "images at Severstal's 256x1600 read at 128x800 (CAM maps of 4x25, as in cpu), 2 "
              "folds, 10 epochs of batch 32 (fewer, larger steps: the fastest way measured to a "
              "usable classifier from random weights in this budget), U-Nets of 2 epochs, a grid "
              "of 1 epoch on 64 images per run at 32x192, the 2 folds side by side. Its numbers are "
              "noisier than cpu's; the "
              "README's claims table says which of the paper's orderings still hold in it.",
        **_cpu_scale(n=800, made_at=(256, 1600), read_at=(128, 800), epochs=10, batch=32,
                     seg_size=(64, 384), seg_epochs=2, n_folds=2, lr=4e-3, seg_batch=16,
                     fold_processes=2),
        grid=GridConfig(epochs=1, max_train=64, size=(32, 192), encoder=None)),
    "paper": Profile(
        name="paper",
        notes="The paper: Kaggle Severstal (12,568 images, put train.csv and train_images/ in "
              "data_dir), full 256x1600 input, EfficientNet-b0 from ImageNet weights, Adam 1e-4 "
              "(encoder) / 1e-3 (head), batch 64, 5 folds. Segmentation: a U-Net with smp's ImageNet "
              "EfficientNet-b0 encoder at 256x1600, 20 epochs on every fold; the grid (Table 4) "
              "holds out fold 0 only, as the thesis scored one split, and its ResNet is an "
              "ImageNet ResNet34. Needs a GPU (16 s per batch of 8 on "
              "a CPU). Images are decoded per batch by DataLoader workers, not cached.",
        n_folds=5,
        data=DataConfig(synthetic_n=0),
        classifier=TrainConfig(encoder="efficientnet_b0", image_size=(256, 1600), pretrained=True,
                               epochs=30, batch_size=64, num_workers=8,
                               cache_images=False),
        segmentation=SegStageConfig(
            net=SegConfig(arch="unet", encoder="efficientnet-b0", epochs=20, batch_size=16,
                          lr=1e-3, pretrained=True, num_workers=8),
            size=(256, 1600)),
        grid=GridConfig(encoder="resnet34", folds=(0,))),
}


def _nest(overrides: dict) -> dict:
    """``{"classifier.epochs": 3, "seed": 1}`` -> ``{"classifier": {"epochs": 3}, "seed": 1}``."""
    out: dict = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"profile override {key!r} goes inside {p!r}, which is also given "
                               f"a plain value")
        if isinstance(value, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]].update(value)
        else:
            d[parts[-1]] = value
    return out


def _replace(obj, changes: dict, where: str):
    """A frozen dataclass with ``changes`` (nested dicts for nested dataclasses); None values are
    ignored; an unknown field is a ConfigError that lists the valid ones. Sizes and folds given as
    lists become tuples in the configurations' own ``__post_init__``."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    valid = sorted(set(fields) - {"name", "notes"}) if isinstance(obj, Profile) else sorted(fields)
    unknown = sorted(k for k in changes if k not in valid)
    if unknown:
        raise ConfigError(f"unknown {where} field(s) {unknown}; valid fields: {valid}")
    vals = {}
    for k, v in changes.items():
        if v is None:
            continue
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{where} field {k!r} is a section; give a dict of its fields "
                               f"({sorted(f.name for f in dataclasses.fields(cur))}) or dotted "
                               f"names such as '{k}.{dataclasses.fields(cur)[0].name}'")
            v = _replace(cur, v, f"{where}.{k}" if where != "profile" else k)
        vals[k] = v
    return dataclasses.replace(obj, **vals)


# the explicit "random weights" flag (cam2mask reproduce / train / masks --random-weights): every
# network from random weights, and the tables say so; never a silent fallback from ImageNet
RANDOM_WEIGHTS = {"classifier.pretrained": False, "segmentation.net.pretrained": False}


def with_random_weights(overrides: dict, option: str = "--random-weights") -> dict:
    """Dotted ``overrides`` plus :data:`RANDOM_WEIGHTS`; a weights file or ``pretrained=True``
    among them contradicts the flag and is refused."""
    clash = sorted(k for k, v in overrides.items()
                   if (k.endswith("weights_path") and v is not None)
                   or (k.endswith("pretrained") and v))
    if clash:
        raise ConfigError(f"{option} starts every network from random weights; it contradicts "
                          f"{clash}")
    return {**overrides, **RANDOM_WEIGHTS}


def get_profile(name: str | Profile = "cpu", **overrides) -> Profile:
    """The named profile with ``overrides`` applied (top-level fields, section dicts, or dotted
    names; ``None`` values are ignored)."""
    if isinstance(name, Profile):
        prof = name
    else:
        if name not in PROFILES:
            raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
        prof = PROFILES[name]
    return _replace(prof, _nest(overrides), "profile")


def artifacts_dir(profile: Profile | str, root: str | Path | None = None) -> Path:
    """``<repo>/artifacts/<profile>``: datasets, folds, checkpoints and caches of one profile."""
    name = profile.name if isinstance(profile, Profile) else profile
    return Path(root) if root is not None else repo_root() / "artifacts" / name


def figures_dir(profile: Profile | str, root: str | Path | None = None) -> Path:
    """``<repo>/figures/<profile>``: every figure and table a profile's notebooks write."""
    name = profile.name if isinstance(profile, Profile) else profile
    return Path(root) if root is not None else repo_root() / "figures" / name

