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
from tqdm import tqdm

from .cams import CamCache, cam_dataset, stage_cam_dataset
from .classify import ClassifierRun, Classifier, fold_models, train_cv
from .data import (DatasetIndex, ImageDataset, folds_for, image_array, load_dataset,
                   resize_mask)
from .device import resolve_device
from .postprocess import Stats, collect_stats
from .profiles import Profile, get_profile
from .profiles import artifacts_dir as _artifacts_dir
from .profiles import figures_dir as _figures_dir
from .report import Provenance, provenance
from .segment import check_size
from .synth import ensure_synthetic
from .utils import ConfigError, bars, chunks


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


def load_data(profile: Profile, data_dir: str | Path | None = None,
              artifacts: str | Path | None = None, progress: bool = True) -> DatasetIndex:
    """The profile's dataset as a :class:`~cam2mask_lib.data.DatasetIndex`.

    ``data_dir`` (or the profile's) names a Severstal- or generic-format folder; without one the
    synthetic set is generated under ``artifacts/data`` on first use and reused afterwards. The
    ``paper`` profile refuses to run on synthetic data.
    """
    data_dir = data_dir or profile.data.data_dir
    if data_dir is not None:
        return load_dataset(data_dir)
    if profile.data.synthetic_n <= 0:
        raise ConfigError(
            f"profile {profile.name!r} needs real data: pass data_dir= (or --data-dir) pointing at "
            f"the Kaggle Severstal folder (train.csv + train_images/) or a generic-format folder")
    folder = _artifacts_dir(profile, artifacts) / "data"
    h, w = profile.data.synthetic_size
    path = ensure_synthetic(folder, n=profile.data.synthetic_n, seed=profile.seed, height=h,
                            width=w, progress=progress)
    return load_dataset(path)


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
    out = cam_dir(ctx, run, method, aug_smooth, weights)
    return cam_dataset(ctx.fold_models(run, weights), ctx.images(), ctx.folds, out, method=method,
                       aug_smooth=aug_smooth, progress=progress,
                       num_workers=ctx.profile.classifier.num_workers)


def cam_dir(ctx: Context, run: ClassifierRun, method: str, aug_smooth: bool, weights: str
            ) -> Path:
    """Where :func:`cam_stage` caches ``run``'s maps of one CAM variant."""
    return (ctx.artifacts / "cams" / Path(run.dir).name
            / f"{method}{'_aug' if aug_smooth else ''}_{weights}")


def stage_cam_stage(ctx: Context, run: ClassifierRun, stages, aug_smooth: bool = True,
                    weights: str = "averaged", progress: bool = True,
                    models: dict[int, Classifier] | None = None,
                    last: str | None = None) -> dict:
    """Out-of-fold LayerCAM maps at the classifier's encoder ``stages`` (see
    :func:`cams.stage_views`), cached beside :func:`cam_stage`'s, one folder per stage;
    ``models``: ``run``'s fold models of ``weights`` when the caller has them loaded already.
    ``last``: a CAM method; then key ``"last"`` is :func:`cam_stage`'s cache of that method's
    last-layer maps, filled from the same forward passes (and reused by :func:`cam_stage`)."""
    if not run.complete:
        raise RuntimeError("the classifier has unfinished folds; run the classification stage first")
    base = ctx.artifacts / "cams" / Path(run.dir).name
    out = {int(s): base / f"layercam_stage{int(s)}{'_aug' if aug_smooth else ''}_{weights}"
           for s in stages}
    return stage_cam_dataset(models or ctx.fold_models(run, weights), ctx.images(), ctx.folds, out,
                             aug_smooth=aug_smooth, progress=progress,
                             num_workers=ctx.profile.classifier.num_workers,
                             last=None if last is None else
                             (last, cam_dir(ctx, run, last, aug_smooth, weights)))


def stats_from_cache(ctx: Context, cache: CamCache, rows, thresholds, aug_smooth: bool,
                     batch: int = 32, progress: bool = False) -> Stats:
    """Post-processing statistics (see :func:`postprocess.collect_stats`) of the cached CAMs of
    ``rows`` at the scoring resolution (the classifier's input), made and counted on the
    context's device."""
    rows = np.asarray(rows)
    parts = list(chunks(rows, batch))
    maps = (cache.maps_on(ctx.device, c, ctx.profile.image_size, aug_smooth=aug_smooth)
            for c in tqdm(parts, desc="scoring", disable=not bars(progress)))
    trues = (ctx.true_masks(c) for c in parts)
    return collect_stats(maps, trues, thresholds, rows=rows)
