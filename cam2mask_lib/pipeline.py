"""What every notebook and command does first, and the stages as one-call functions.

    ctx = pipeline.context("cpu")              # profile, data, folds, device, output folders
    run = pipeline.classifier_stage(ctx)       # K-fold classifier, out-of-fold probabilities
    cache = pipeline.cam_stage(ctx, run)       # out-of-fold CAMs of every image, cached

The experiments that build the paper's tables from these stages are in :mod:`experiments`; the
segmentation stage (targets, one network per held-out fold, scoring) is in :mod:`seg_stage`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cams import CamCache, cam_dataset
from .classify import ClassifierRun, Classifier, fold_models, train_cv
from .data import DatasetIndex, ImageDataset, folds_for, image_array, resize_mask
from .device import resolve_device
from .profiles import Profile, get_profile, load_data
from .profiles import artifacts_dir as _artifacts_dir
from .profiles import figures_dir as _figures_dir
from .report import Provenance, provenance
from .seg_stage import check_size


@dataclass
class Context:
    """One run's profile, data, folds, output folders, provenance and device (resolved once from
    the profile's ``device``; models are loaded there and every batch follows its model)."""

    profile: Profile
    index: DatasetIndex
    folds: np.ndarray
    figures: Path
    artifacts: Path
    prov: Provenance
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _images: ImageDataset | None = field(default=None, repr=False)  # made on first use

    def describe(self) -> str:
        """Three lines: the run's settings, how its networks start, and the data used."""
        p = self.profile
        return (f"profile {p.name!r}: input {p.image_size[0]}x{p.image_size[1]}, {p.n_folds} "
                f"folds, seed {p.seed}, device {self.device}\nweights: {p.weights()}\n"
                f"{self.index.describe()}")

    def images(self) -> ImageDataset:
        """The images (no masks) at the classifier's input size, one shared instance: with the
        profile's ``cache_images`` they are resized once into a memory-mapped uint8 array under
        ``artifacts/images`` that every stage and session reuses."""
        if self._images is None:
            size, cfg = self.profile.image_size, self.profile.classifier
            arr = (image_array(self.index, size, self.artifacts / "images", progress=False)
                   if cfg.cache_images else None)
            self._images = ImageDataset(self.index, size, with_masks=False, array=arr,
                                        decode_device=self.device if cfg.decode == "device"
                                        else None)
        return self._images

    @property
    def seg_size(self) -> tuple[int, int]:
        """The segmentation networks' input size: the profile's ``segmentation.size``, else the
        classifier's input size (sides divisible by 32)."""
        size = self.profile.segmentation.size or self.profile.image_size
        return check_size(tuple(int(v) for v in size), f"profile {self.profile.name!r}: "
                                                      f"segmentation input")

    def seg_images(self) -> ImageDataset:
        """The images at the segmentation input size, ImageNet-normalised (shrunk from the
        classifier's memory-mapped array when the profile caches images)."""
        size = self.seg_size
        if size == tuple(self.profile.image_size):
            return self.images()
        arr = None
        if self.profile.classifier.cache_images:
            big = self.images().array
            ok = big is not None and big.shape[1] >= size[0] and big.shape[2] >= size[1]
            arr = image_array(self.index, size, self.artifacts / "images", progress=False,
                              source=big if ok else None)
        return ImageDataset(self.index, size, with_masks=False, array=arr)

    def true_masks(self, rows, size=None) -> np.ndarray:
        """True masks ``[len(rows), C, H, W]`` at ``size``, by default the classifier's input
        size (the scoring resolution)."""
        size = tuple(size or self.profile.image_size)
        return np.stack([resize_mask(self.index.mask(int(i)), size) for i in rows])

    def fold_models(self, run: ClassifierRun, weights: str = "averaged") -> dict[int, Classifier]:
        """Every fold's classifier of ``run`` on this context's device."""
        return fold_models(run, weights, device=self.device)


def context(profile: str | Profile = "cpu", data_dir: str | Path | None = None,
            seed: int | None = None, figures_dir: str | Path | None = None,
            artifacts_dir: str | Path | None = None, progress: bool = False,
            index: DatasetIndex | None = None, **overrides) -> Context:
    """Resolve the profile (with overrides, see :func:`profiles.get_profile`), load or generate
    its data (or take an already loaded ``index``), and load or make its folds
    (``artifacts/<profile>/folds_k{K}_seed{S}.csv``, shared by every stage)."""
    prof = get_profile(profile, seed=seed, **overrides)
    art = _artifacts_dir(prof, artifacts_dir)
    if index is None:
        index = load_data(prof, data_dir, art, progress=progress)
    folds = folds_for(index, art, n_folds=prof.n_folds, seed=prof.seed)
    device = resolve_device(prof.device)
    return Context(profile=prof, index=index, folds=folds, figures=_figures_dir(prof, figures_dir),
                   artifacts=art, prov=provenance(prof, index, device), device=device)


def classifier_stage(ctx: Context, only_folds=None, progress: bool = True,
                     ddp: bool = False) -> ClassifierRun:
    """Train (or reuse) the profile's classifier on every fold; see :func:`classify.train_cv`."""
    cfg = ctx.profile.classifier
    return train_cv(ctx.index, ctx.folds, cfg, ctx.artifacts / "classifier",
                    only_folds=only_folds, progress=progress, ds=ctx.images(), ddp=ddp)


def cam_stage(ctx: Context, run: ClassifierRun, method: str = "gradcam++",
              aug_smooth: bool = True, weights: str = "averaged",
              progress: bool = True) -> CamCache:
    """Out-of-fold CAMs of every image (each from its own fold's model), cached at feature-map
    resolution under ``artifacts/<profile>/cams/<classifier run>/<variant>/``."""
    if not run.complete:
        raise RuntimeError("the classifier has unfinished folds; run the classification stage first")
    variant = f"{method}{'_aug' if aug_smooth else ''}_{weights}"
    out = ctx.artifacts / "cams" / Path(run.dir).name / variant
    return cam_dataset(ctx.fold_models(run, weights), ctx.images(), ctx.folds, out, method=method,
                       aug_smooth=aug_smooth, progress=progress)
