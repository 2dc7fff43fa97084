"""Profiles: one named, frozen set of parameters per scale of run.

``smoke``  tests and CI: a few dozen small synthetic images; every notebook runs in seconds.
``cpu``    the default main job on a laptop or this project's 2-core build machines, no GPU, no
           internet: synthetic data at Severstal's native 256x1600 size, read at a reduced input
           size (see the profile's ``notes`` for the budget).
``paper``  the real Kaggle Severstal data at full size on a GPU with the paper's settings.

Anything can be overridden: ``get_profile("cpu", epochs=3)``; an unknown name or field is an error
that lists the valid ones. Later stages read their settings from here, so a notebook's parameters
cell only names the profile and the few values a reader is likely to change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .utils import repo_root


@dataclass(frozen=True)
class TrainConfig:
    """The classifier's training settings; the defaults are the paper's (section IV)."""

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
    weights_path: str | None = None
    allow_random_init: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    cache_images: bool = True
    channels_last: bool = True  # ~1.5x faster on CPU for MobileNet/EfficientNet

    @classmethod
    def from_profile(cls, profile, **overrides) -> "TrainConfig":
        keys = set(cls.__dataclass_fields__)
        vals = {k: getattr(profile, k) for k in keys if hasattr(profile, k)}
        vals.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(vals) - keys)
        if unknown:
            raise KeyError(f"unknown training parameter(s) {unknown}; valid: {sorted(keys)}")
        vals["image_size"] = tuple(int(v) for v in vals.get("image_size", cls.image_size))
        return cls(**vals)

    def key(self) -> dict:
        """What the trained weights depend on (not where or how fast they are computed)."""
        d = dataclasses.asdict(self)
        for k in ("device", "num_workers", "cache_images"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class Profile(TrainConfig):
    """A training configuration plus the data it runs on and the number of folds."""

    name: str = ""
    notes: str = ""
    # data: None = the synthetic set below, generated into the artifacts folder on first use
    data_dir: str | None = None
    synthetic_n: int = 800
    synthetic_size: tuple[int, int] = (256, 1600)
    n_folds: int = 5
    # the segmentation stage (notebooks 04-05; see segment.SegConfig for the seg_* fields)
    seg_size: tuple[int, int] | None = None  # network input (sides divisible by 32); None: image_size
    seg_arch: str = "unet"
    seg_encoder: str = "efficientnet-b0"
    seg_slim: bool = False
    seg_epochs: int = 20
    seg_batch_size: int = 16
    seg_lr: float = 1e-3
    seg_encoder_init: str | None = None  # "classifier": start from the fold's classifier encoder
    seg_folds: tuple[int, ...] | None = None  # folds held out and scored (None: every fold)
    seg_defective_only: bool = False  # train on images with at least one defect only
    seg_max_train: int | None = None  # cap on training images per fold (None: all)
    grid_epochs: int | None = None  # notebook 05's runs (None: seg_epochs)
    grid_size: tuple[int, int] | None = None  # notebook 05's input (None: seg_size)
    grid_encoder: str | None = "resnet34"  # the thesis's ResNet (None: the classifier's encoder)
    grid_max_train: int | None = None  # notebook 05: training images per run (None: all)

    def describe(self) -> str:
        data = self.data_dir or (f"synthetic n={self.synthetic_n} "
                                 f"{self.synthetic_size[0]}x{self.synthetic_size[1]}")
        return (f"profile {self.name!r}: data {data}, input {self.image_size[0]}x"
                f"{self.image_size[1]}, {self.n_folds} folds, seed {self.seed}")


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        notes="Tests and CI. 40 synthetic images made at 128x800 and read at 64x400, 3 folds, "
              "2 epochs of a tiny encoder, so that every notebook finishes in seconds. Its numbers "
              "show that the code runs, not what the method is worth.",
        synthetic_n=40, synthetic_size=(128, 800), image_size=(64, 400), n_folds=3,
        encoder="mobilenetv3_small_050", epochs=2, batch_size=8, lr_encoder=2e-3, lr_head=2e-3,
        seg_size=(32, 192), seg_encoder="tu-mobilenetv3_small_050", seg_slim=True, seg_epochs=1,
        seg_batch_size=8, seg_lr=3e-3, seg_encoder_init="classifier", seg_folds=(0,),
        seg_defective_only=True, grid_encoder=None),
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
              "epochs on 160 images per run (17 runs in ~2 min). Sized so that the whole default "
              "run stays within 15 minutes on 2 cores.",
        synthetic_n=1600, synthetic_size=(256, 1600), image_size=(128, 800), n_folds=3,
        encoder="mobilenetv3_small_050", epochs=10, batch_size=16, lr_encoder=2e-3, lr_head=2e-3,
        seg_size=(64, 384), seg_encoder="tu-mobilenetv3_small_050", seg_slim=True, seg_epochs=3,
        seg_batch_size=16, seg_lr=3e-3, seg_encoder_init="classifier", seg_folds=(0,),
        seg_defective_only=True, grid_epochs=2, grid_max_train=160, grid_encoder=None),
    "paper": Profile(
        name="paper",
        notes="The paper: Kaggle Severstal (12,568 images, put train.csv and train_images/ in "
              "data_dir), full 256x1600 input, EfficientNet-b0 from ImageNet weights, Adam 1e-4 "
              "(encoder) / 1e-3 (head), batch 64, 5 folds. Segmentation: a U-Net with smp's ImageNet "
              "EfficientNet-b0 encoder at 256x1600, 20 epochs on every fold; the grid's ResNet is an "
              "ImageNet ResNet34. Needs a GPU (16 s per batch of 8 on "
              "a CPU). Images are decoded per batch by DataLoader workers, not cached.",
        synthetic_n=0, image_size=(256, 1600), n_folds=5, encoder="efficientnet_b0",
        pretrained=True, allow_random_init=False, epochs=30, batch_size=64, num_workers=8,
        cache_images=False, seg_size=(256, 1600), seg_encoder="efficientnet-b0", seg_epochs=20,
        seg_batch_size=16, seg_lr=1e-3, grid_encoder="resnet34"),
}


def get_profile(name: str | Profile = "cpu", **overrides) -> Profile:
    """The named profile with ``overrides`` applied (``None`` values are ignored)."""
    if isinstance(name, Profile):
        prof = name
    else:
        if name not in PROFILES:
            raise KeyError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
        prof = PROFILES[name]
    fields = {f.name for f in dataclasses.fields(Profile)} - {"name", "notes"}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KeyError(f"unknown profile field(s) {unknown}; valid fields: {sorted(fields)}")
    for key in ("image_size", "synthetic_size", "seg_size", "seg_folds", "grid_size"):
        if overrides.get(key) is not None:
            overrides[key] = tuple(int(v) for v in overrides[key])
    return dataclasses.replace(prof, **overrides)


def artifacts_dir(profile: Profile | str, root: str | Path | None = None) -> Path:
    """``<repo>/artifacts/<profile>``: datasets, folds, checkpoints and caches of one profile."""
    name = profile.name if isinstance(profile, Profile) else profile
    return Path(root) if root is not None else repo_root() / "artifacts" / name


def figures_dir(profile: Profile | str, root: str | Path | None = None) -> Path:
    """``<repo>/figures/<profile>``: every figure and table a profile's notebooks write."""
    name = profile.name if isinstance(profile, Profile) else profile
    return Path(root) if root is not None else repo_root() / "figures" / name


def load_data(profile: Profile, data_dir: str | Path | None = None,
              artifacts: str | Path | None = None, progress: bool = True):
    """The profile's dataset as a :class:`~cam2mask_lib.data.DatasetIndex`.

    ``data_dir`` (or the profile's) names a Severstal- or generic-format folder; without one the
    synthetic set is generated under ``artifacts/data`` on first use and reused afterwards. The
    ``paper`` profile refuses to run on synthetic data.
    """
    from .data import load_dataset
    from .synth import ensure_synthetic

    data_dir = data_dir or profile.data_dir
    if data_dir is not None:
        return load_dataset(data_dir)
    if profile.synthetic_n <= 0:
        raise ValueError(
            f"profile {profile.name!r} needs real data: pass data_dir= (or --data-dir) pointing at "
            f"the Kaggle Severstal folder (train.csv + train_images/) or a generic-format folder")
    folder = artifacts_dir(profile, artifacts) / "data"
    h, w = profile.synthetic_size
    path = ensure_synthetic(folder, n=profile.synthetic_n, seed=profile.seed, height=h, width=w,
                            progress=progress)
    return load_dataset(path)
