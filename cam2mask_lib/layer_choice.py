"""Which layer's map each class reads (beyond the paper), chosen from the image labels alone.

The paper's maps come from the classifier's last layer, 1/32 of its input: a defect smaller than
one cell of that map (a pit on a ball screw) becomes a blob many times its size. A map read at
an earlier encoder stage (LayerCAM, :func:`cams.stage_views`, at stride 8 or 16: see
:func:`stage_candidates`) sees a smaller neighbourhood and can follow it, while a large defect is
seen whole only by the last layer. So each class chooses among them on the data at hand.

The judge is the classifier itself (the *deletion* test of Petsiuk et al., "RISE", 2018): on
images labelled with the class, the pixels a map ranks highest are blurred away, a growing share
of them (:attr:`DeletionTest.fractions`), and the class's probability is read again from the
fold's own classifier (the one that made the map, which never saw the image). A map that found
the evidence makes the probability fall sooner; the lowest mean probability wins. Nothing here
reads a true mask. :class:`LayerChoice` then serves each class's maps from its chosen cache, as
a :class:`cams.CamCache` serves one layer's, to the refinement and the self-training.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cams import CamCache
from .device import model_device, to_model
from .pipeline import stage_cam_stage
from .refine.grey import gaussian_blur
from .utils import read_json, say, write_json

LAST = "last layer"  # the paper's map: Grad-CAM++ at the last layer (cams.BEST_VARIANT)
STRIDES = (8, 16)  # the earlier maps a class may read: the last encoder stage at each stride


def stage_candidates(model) -> dict[str, int]:
    """``{"stride 8": stage, "stride 16": stage}``: the last encoder stage at each of
    :data:`STRIDES`, from timm's ``feature_info`` (EfficientNet-Lite0: stages 2 and 4); empty
    for an encoder without numbered stages, whose classes then read the last layer."""
    out = {}
    for info in getattr(model.encoder, "feature_info", None) or []:
        module, stride = str(info["module"]), int(info["reduction"])
        if stride in STRIDES and module.startswith("blocks.") and module[7:].isdigit():
            out[f"stride {stride}"] = int(module[7:])
    return out


def describe_candidate(name: str) -> str:
    return ("Grad-CAM++ at the last layer (the paper's)" if name == LAST
            else f"LayerCAM at {name}")


@dataclass(frozen=True)
class DeletionTest:
    """Blur the top ``fractions`` of each map's pixels (a Gaussian of ``blur`` x the longer side)
    on up to ``images`` images labelled with the class (a fixed sample, spread over the folds)
    and average the class's probability over the fractions: the lower, the more of the
    classifier's evidence the map holds."""

    fractions: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    images: int = 120
    blur: float = 1 / 32

    def probabilities(self, model, x: torch.Tensor, maps: torch.Tensor, c: int) -> np.ndarray:
        """``[len(x)]``: class ``c``'s probability with each fraction of the pixels ranked
        highest by ``maps`` ``[b, H, W]`` blurred, averaged over the fractions (on the model's
        device; ``x`` normalised as the model reads it)."""
        sigma = self.blur * max(x.shape[-2:])
        blurred = torch.cat([gaussian_blur(x[:, k:k + 1], sigma) for k in range(x.shape[1])], 1)
        flat = maps.flatten(1).float()
        out = []
        with torch.no_grad():
            for q in self.fractions:
                cut = torch.quantile(flat, 1 - q, dim=1)[:, None, None]
                top = (maps >= cut)[:, None]
                out.append(torch.sigmoid(model(torch.where(top, blurred, x))[:, c].float()))
        return torch.stack(out).mean(0).cpu().numpy()


@dataclass
class LayerChoice:
    """Each class's maps from its chosen candidate's cache: ``caches`` by candidate name,
    ``chosen`` one name per class, ``scores`` ``{class: {candidate: deletion score}}`` (what the
    choice read). It serves the refinement as a :class:`cams.CamCache` does."""

    caches: dict[str, CamCache]
    chosen: list[str]
    scores: dict = field(default_factory=dict)

    def _groups(self, classes=None):
        classes = range(len(self.chosen)) if classes is None else classes
        groups: dict[str, list[tuple[int, int]]] = {}
        for i, c in enumerate(classes):
            groups.setdefault(self.chosen[c], []).append((i, c))
        return groups

    def _assemble(self, rows, size, classes, make) -> torch.Tensor:
        out = None
        for name, pairs in self._groups(classes).items():
            part = make(self.caches[name], [c for _, c in pairs])
            if out is None:
                n_cls = len(self.chosen) if classes is None else len(classes)
                out = torch.empty((len(rows), n_cls, *size), dtype=part.dtype, device=part.device)
            out[:, [i for i, _ in pairs]] = part
        return out

    def maps_on(self, device, rows, size, aug_smooth: bool = True, classes=None) -> torch.Tensor:
        """:meth:`cams.CamCache.maps_on`, each class from its chosen cache."""
        rows, size = list(rows), tuple(size)
        return self._assemble(rows, size, classes, lambda cache, cls: cache.maps_on(
            device, rows, size, aug_smooth, classes=cls))

    def maps(self, rows, size, aug_smooth: bool = True, classes=None) -> np.ndarray:
        return self.maps_on("cpu", rows, size, aug_smooth, classes).numpy()

    def absolute_on(self, device, rows, size, scales=None) -> torch.Tensor:
        """:meth:`cams.CamCache.absolute_on`, each class from its chosen cache."""
        rows, size = list(rows), tuple(size)
        out = self._assemble(rows, size, None, lambda cache, cls: cache.absolute_on(
            device, rows, size)[:, cls])
        if scales is not None:
            out /= torch.as_tensor(np.asarray(scales, np.float32), device=out.device)[
                None, :, None, None]
        return out

    def class_paths(self) -> list[Path]:
        """Each class's cache folder (what a self-training run's key records)."""
        return [Path(self.caches[c].path) for c in self.chosen]

    def describe(self, class_names) -> str:
        return "; ".join(f"{n}: {describe_candidate(c)}" for n, c in zip(class_names,
                                                                          self.chosen))

    def record(self, class_names) -> dict:
        """What was chosen and why, for a run's summary: per class the choice and every
        candidate's deletion score (the class's mean probability after deletion)."""
        return {n: {"chosen": c, "deletion_scores": {k: round(float(v), 4)
                                                     for k, v in self.scores.get(n, {}).items()}}
                for n, c in zip(class_names, self.chosen)}


def choose(caches: dict[str, CamCache], models_by_fold: dict, ds, folds: np.ndarray,
           labels: np.ndarray, class_names, size: tuple[int, int], test: DeletionTest | None = None,
           seed: int = 0, batch: int = 16, progress: bool = True) -> LayerChoice:
    """Each class's map: the candidate of ``caches`` whose :class:`DeletionTest` score is lowest
    on a sample of the images labelled with the class, each judged by its own fold's model
    (``models_by_fold``) on its images ``ds`` at the classifier's input ``size``. A class without
    positive images keeps the last layer's map."""
    test = test or DeletionTest()
    labels = np.asarray(labels, bool)
    rng = np.random.default_rng(seed)
    chosen, scores = [], {}
    for c, name in enumerate(class_names):
        pos = np.flatnonzero(labels[:, c])
        if len(pos) == 0:
            chosen.append(LAST)
            continue
        sample = np.sort(rng.choice(pos, min(test.images, len(pos)), replace=False))
        sums = dict.fromkeys(caches, 0.0)
        for f in sorted(models_by_fold):
            model = models_by_fold[f].eval()
            rows = sample[folds[sample] == f]
            for s in range(0, len(rows), batch):
                r = rows[s:s + batch]
                x = to_model(ds.uint8_batch(r), model)
                for cand, cache in caches.items():
                    m = cache.maps_on(model_device(model), r, size, classes=[c])[:, 0]
                    sums[cand] += float(test.probabilities(model, x, m, c).sum())
        scores[name] = {k: v / len(sample) for k, v in sums.items()}
        best = min(scores[name], key=scores[name].get)
        chosen.append(best)
        say(progress, f"map of class {name}: {describe_candidate(best)} (deletion test on "
                      f"{len(sample)} of its images: mean probability after deletion " +
            ", ".join(f"{k} {v:.3f}" for k, v in scores[name].items()) + ")")
    return LayerChoice(dict(caches), chosen, scores)


def layer_choice_stage(ctx, run, last: CamCache, test: DeletionTest | None = None,
                       progress: bool = True) -> LayerChoice:
    """The choice on a context: the out-of-fold LayerCAM caches of ``run``'s classifier at its
    :func:`stage_candidates` (:func:`pipeline.stage_cam_stage`) beside ``last`` (its last
    layer's Grad-CAM++), each class's map chosen by :func:`choose`. The choice is kept in
    ``choice.json`` beside the caches and reused while the run, the test and the labels are the
    same."""
    test = test or DeletionTest()
    models = ctx.fold_models(run)
    stages = stage_candidates(next(iter(models.values())))
    names = list(ctx.index.class_names)
    staged = stage_cam_stage(ctx, run, list(stages.values()), progress=progress, models=models)
    caches = {LAST: last, **dict(zip(stages, staged.values()))}
    if len(caches) == 1:
        say(progress, "maps: the last layer's for every class (the encoder has no earlier "
                      "stages to read)")
        return LayerChoice(caches, [LAST] * len(names))
    key = json.loads(json.dumps({  # as it reads back (tuples become lists)
        "candidates": {k: str(c.path) for k, c in caches.items()}, "test": vars(test),
        "seed": ctx.profile.seed,
        "labels": hashlib.sha256(np.ascontiguousarray(ctx.index.labels, np.uint8)).hexdigest()}))
    path = Path(last.path).parent / "choice.json"
    kept = read_json(path) if path.is_file() else {}
    if kept.get("key") == key:
        choice = LayerChoice(caches, kept["chosen"], kept["scores"])
        say(progress, f"maps (chosen before, {path}): {choice.describe(names)}")
        return choice
    choice = choose(caches, models, ctx.images(), ctx.folds, ctx.index.labels, names,
                    ctx.profile.image_size, test, seed=ctx.profile.seed, progress=progress)
    write_json(path, {"key": key, "chosen": choice.chosen, "scores": choice.scores})
    return choice
