"""The maps the refined method reads (issue #38): the paper's Grad-CAM++ at the classifier's
last layer, multiplied pixel by pixel with LayerCAM at the encoder's last stage of stride 8.

The last layer's map says *which* part of the image holds the class's evidence, but in cells of
1/32 of the input: a pit or a spot smaller than a cell becomes a blob. LayerCAM (Jiang et al.,
2021) at a stride-8 stage draws the evidence at four times that resolution, but it also marks
edges and texture that the class does not depend on. Their product keeps the fine map's detail
where the coarse map agrees, as Guided Grad-CAM (Selvaraju et al., 2017) multiplies guided
backpropagation with Grad-CAM. Each factor is scaled per image to [0, 1] (as the paper scales its
maps), and their product again by its peak, so the paper's cut at 0.3 applies to it unchanged.

Measured on the two real development sets (`docs/real_data.md`: the Dice of each map cut as the
paper cuts it, every labelled image out of fold), the product was the best map or within 0.02 of
it on three of the four classes and 80% of the best on the fourth (NEU-Seg's large patches, where
the last layer alone does best), while every single map failed somewhere; the classifier's own
deletion test, tried first to choose one map per class, ranked them against their Dice on two of
the four classes. It is one rule for every data set, nothing chosen per set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cams import BEST_VARIANT, VARIANTS, CamCache
from .pipeline import cam_stage, stage_cam_stage
from .utils import say

STRIDE = 8  # the fine factor: the last encoder stage at this stride (EfficientNet-Lite0: stage 2)
COARSE = "Grad-CAM++ at the last layer"


def fine_stage(model) -> int | None:
    """The classifier's last encoder stage of stride :data:`STRIDE`, from timm's
    ``feature_info``; None for an encoder without numbered stages (its maps are the last
    layer's alone)."""
    stage = None
    for info in getattr(model.encoder, "feature_info", None) or []:
        module, stride = str(info["module"]), int(info["reduction"])
        if stride == STRIDE and module.startswith("blocks.") and module[7:].isdigit():
            stage = int(module[7:])
    return stage


@dataclass
class FusedMaps:
    """``coarse`` (the last layer's maps) times ``fine`` (LayerCAM at encoder stage ``stage``),
    served as a :class:`cams.CamCache` serves its maps."""

    coarse: CamCache
    fine: CamCache
    stage: int

    def maps_on(self, device, rows, size, aug_smooth: bool = True, classes=None) -> torch.Tensor:
        """``[len(rows), C, H, W]`` in [0, 1] on ``device``: the product of the two caches' maps
        (each per image in [0, 1]), divided by its peak per image and class."""
        rows, size = list(rows), tuple(size)
        m = (self.coarse.maps_on(device, rows, size, aug_smooth, classes)
             * self.fine.maps_on(device, rows, size, aug_smooth, classes))
        return m / m.amax((-2, -1), keepdim=True).clamp_min(1e-12)

    def maps(self, rows, size, aug_smooth: bool = True, classes=None) -> np.ndarray:
        return self.maps_on("cpu", rows, size, aug_smooth, classes).numpy()

    def absolute_on(self, device, rows, size, scales=None) -> torch.Tensor:
        """The product of the two caches' maps in their own units (:meth:`cams.CamCache.
        absolute_on`), each class divided by ``scales``."""
        rows, size = list(rows), tuple(size)  # the scales divide one factor: the product
        return (self.coarse.absolute_on(device, rows, size, scales)
                * self.fine.absolute_on(device, rows, size))

    def paths(self) -> list[Path]:
        """The two cache folders (what a self-training run's key records)."""
        return [Path(self.coarse.path), Path(self.fine.path)]

    def describe(self) -> str:
        return f"{COARSE} x LayerCAM at encoder stage {self.stage} (stride {STRIDE})"


def describe_maps(maps) -> str:
    """What a refinement's maps are, for a run's note and summary."""
    return maps.describe() if isinstance(maps, FusedMaps) else f"{COARSE} (the paper's)"


def fused_maps_stage(ctx, run, progress: bool = True) -> FusedMaps | CamCache:
    """The refined method's maps on a context: the out-of-fold last-layer Grad-CAM++ of ``run``'s
    classifier (:data:`cams.BEST_VARIANT`, the cache :func:`pipeline.cam_stage` makes and then
    reuses) times the out-of-fold LayerCAM at its :func:`fine_stage`, both from the same forward
    passes (:func:`pipeline.stage_cam_stage`, cached and resumable); the last layer's alone for
    an encoder without that stage."""
    method, aug_smooth, weights = VARIANTS[BEST_VARIANT]
    models = ctx.fold_models(run, weights)
    stage = fine_stage(next(iter(models.values())))
    if stage is None:
        say(progress, f"maps: {COARSE} alone (the encoder has no numbered stride-{STRIDE} stage)")
        return cam_stage(ctx, run, method, aug_smooth, weights, progress=progress)
    made = stage_cam_stage(ctx, run, [stage], aug_smooth, weights, progress=progress,
                           models=models, last=method)
    maps = FusedMaps(made["last"], made[stage], stage)
    say(progress, f"maps: {maps.describe()}")
    return maps
