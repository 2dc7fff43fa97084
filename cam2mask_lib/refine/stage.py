"""The refinement on a context: a combination calibrated on a run's image labels and
out-of-fold CAMs (:func:`refine_stage`), its masks scored and its self-training targets served
(:class:`Refined`), the guide images read where the context's models run."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import DiceReport, dice
from ..pipeline import Context
from .technique import Calibration, RefineConfig, Technique


def image_loader(ctx: Context, size: tuple[int, int]):
    """``images(rows)``: float ``[b, 3, H, W]`` (0-255) at ``size`` on the context's device,
    area-resized there from the classifier's input images (the guide of PAR and of the grey-level
    test, which run where their images are). Image files (a profile that caches no images) are
    decoded by the classifier's data workers, not in this process."""
    ds, workers = ctx.images(), ctx.profile.classifier.num_workers
    return lambda rows: guide_images(ds.uint8_batch(np.asarray(rows), workers), ctx.device, size)


def guide_images(x: torch.Tensor, device, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 batch of the classifier's input images as guide images: float (0-255) on
    ``device``, area-resized to ``size``."""
    size = tuple(int(v) for v in size)
    x = x.to(device).float()
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="area")


@dataclass
class Refined:
    """A combination calibrated on a run's image labels: :meth:`batches` gives its maps and masks
    at ``size`` for any rows."""

    ctx: Context
    cache: object
    config: RefineConfig
    calibration: Calibration
    size: tuple[int, int]

    def batches(self, rows, probs: np.ndarray, batch: int = 32):
        return Technique(self.config).masks(self.cache, image_loader(self.ctx, self.size), rows,
                                            probs, self.size, self.calibration, batch)

    def score(self, rows, probs: np.ndarray) -> DiceReport:
        """Kaggle Dice of the masks of ``rows`` against the true masks at ``size``, streamed
        batch by batch."""
        values, nonempty = [], []
        for b, _, m in self.batches(rows, probs):
            true = self.ctx.true_masks(b, self.size)
            values.append(dice(m, true))
            nonempty.append(true.any((-2, -1)))
        return DiceReport(np.concatenate(values), np.concatenate(nonempty),
                          self.ctx.index.class_names)

    def targets(self, rows, images: torch.Tensor | None = None) -> np.ndarray:
        """Self-training targets of ``rows`` (:meth:`Technique.targets`, image labels).
        ``images``: the uint8 batch of ``rows`` from ``ctx.images()`` when the caller has read it
        already (a training batch), so that the guide images are not read a second time."""
        load = (image_loader(self.ctx, self.size) if images is None else
                lambda _rows: guide_images(images, self.ctx.device, self.size))
        return Technique(self.config).targets(self.cache, load, rows,
                                              self.ctx.index.labels.astype(bool), self.size,
                                              self.calibration)

    def describe(self) -> str:
        return f"{self.config.describe()}; learnt from the labels: {self.calibration.describe()}"


def refine_stage(ctx: Context, cache, config: RefineConfig | None = None,
                 size: tuple[int, int] | None = None) -> Refined:
    """Calibrate ``config`` (default :class:`RefineConfig`) on the context's image labels and the
    out-of-fold CAMs of ``cache``, at ``size`` (default: the segmentation input size)."""
    config = config or RefineConfig()
    size = tuple(size or ctx.seg_size)
    cal = Technique(config).calibrate(cache, image_loader(ctx, size),
                                      ctx.index.labels.astype(bool), size, device=ctx.device)
    return Refined(ctx, cache, config, cal, size)
