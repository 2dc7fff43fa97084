"""The segmentation stage on a context: training targets, one network per held-out fold, scoring.

Training targets (:class:`Targets`): the true masks (:func:`true_targets`), masks made from the
out-of-fold CAMs (:func:`cam_targets`) and confident CAM pixels with an ignored band
(:func:`confident_targets`). :func:`train_segmenters` trains one network (:mod:`segment`) per
held-out fold on the other folds' images, cached by what the weights depend on;
:func:`predict_probs` gives each held-out image's probabilities from its own fold's network at any
size, and :func:`seg_stats` scores them exactly as the CAM masks are scored.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .cams import CamCache
from .classify import ClassifierRun, load_fold_model
from .pipeline import Context
from .postprocess import Params, Stats, apply, collect_stats, search
from .profiles import Profile
from .refine import Refined
from .segment import SegConfig, confident_labels, predict_masks, train_segmenter
from .trainer import side_by_side
from .utils import ConfigError, chunks, config_key, say, stable_hash

# bumped whenever refine.self_training_targets changes what it makes from the same inputs, so that
# networks trained on the old targets are not reused
REFINED_TARGETS_VERSION = 2
SEG_THRESHOLD = 0.2  # the paper's binarisation of the U-Net's output (with min_seg_len 0)
# what teacher_thresholds chooses from (0.5 included: a network's usual binarisation)
NET_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


# ------------------------------------------------------------------------------------------------
# Training targets
# ------------------------------------------------------------------------------------------------

@dataclass
class Targets:
    """Training masks for a segmentation network: ``targets(rows)`` is uint8 ``[len(rows), C, H,
    W]`` at the segmentation input size (0/1, ``losses.IGNORE`` where a pixel does not count).
    ``name`` labels the run folder, ``key`` is what the masks depend on (part of the cache key).
    ``guide``: the dataset whose uint8 batches ``fn(rows, images)`` takes in place of reading the
    images of ``rows`` itself (a trainer reading that dataset passes its batch); None when ``fn``
    takes rows only."""

    name: str
    key: dict
    fn: Callable[..., np.ndarray]
    memo: dict | None = None  # per-row results kept in memory (small profiles)
    guide: object | None = None

    def __call__(self, rows, images=None):
        if images is not None and self.guide is None:
            raise TypeError(f"targets {self.name!r} read no images; call them with rows only")

        def call(r, pick):  # the targets of rows r, the images at positions pick of the batch
            return self.fn(r) if images is None else self.fn(r, images[pick])

        if self.memo is None:
            return call(rows, slice(None))
        todo = [(j, int(i)) for j, i in enumerate(rows) if int(i) not in self.memo]
        if todo:
            pick, todo_rows = map(list, zip(*todo))
            self.memo.update(zip(todo_rows, call(np.asarray(todo_rows), pick)))
        kept = [self.memo[int(i)] for i in rows]  # tensors stay on their device
        return torch.stack(kept) if isinstance(kept[0], torch.Tensor) else np.stack(kept)


def _memo(ctx: Context) -> dict | None:
    return {} if ctx.profile.classifier.cache_images else None


def true_targets(ctx: Context) -> Targets:
    """The true masks (supervised training)."""
    size = ctx.seg_size
    return Targets("true", {"masks": "true"}, lambda rows: ctx.true_masks(rows, size), _memo(ctx))


def _cam_key(ctx: Context, cache: CamCache, aug_smooth: bool) -> dict:
    """Which maps made the targets: the cache's folder, or the folders of every cache a
    :class:`fusion.FusedMaps` multiplies."""
    def rel(p):
        return str(Path(p).relative_to(ctx.artifacts))
    where = ([rel(p) for p in cache.paths()] if hasattr(cache, "paths") else rel(cache.path))
    return {"cams": where, "aug_smooth": aug_smooth}


def cam_targets(ctx: Context, cache: CamCache, threshold=SEG_THRESHOLD, min_area_fraction=0.0,
                aug_smooth: bool = True, name: str = "cam") -> Targets:
    """Masks made from the (out-of-fold) CAMs of each training image: the CAM above
    ``threshold`` for every class in the image's label (the only supervision a labelled image
    has; absent classes get empty masks), emptied when smaller than ``min_area_fraction`` of the
    image. ``threshold`` and ``min_area_fraction`` may be per class."""
    labels = ctx.index.labels.astype(bool)
    h, w = ctx.seg_size
    params = Params(confidence=0.5, threshold=threshold,
                    min_area=np.asarray(min_area_fraction, float) * h * w)
    key = {"masks": "cam", **_cam_key(ctx, cache, aug_smooth), "params": params.describe()}

    def fn(rows):  # maps and masks made on the context's device, the masks brought back
        rows = np.asarray(rows)
        maps = cache.maps_on(ctx.device, rows, (h, w), aug_smooth=aug_smooth)
        return apply(maps, labels[rows], params).cpu().numpy()

    return Targets(name, key, fn, _memo(ctx))


def confident_targets(ctx: Context, cache: CamCache, high: float = 0.6, low: float = 0.2,
                      aug_smooth: bool = True) -> Targets:
    """Confident CAM pixels (:func:`segment.confident_labels`): for a class in the image's label,
    defect above ``high``, background below ``low``, ignored in between; absent classes are
    background everywhere."""
    if not 0 <= low <= high <= 1:
        raise ConfigError(f"confident pixels: need 0 <= low <= high <= 1, got low={low}, "
                          f"high={high}")
    labels = ctx.index.labels.astype(bool)
    key = {"masks": "confident", **_cam_key(ctx, cache, aug_smooth), "high": high, "low": low}

    def fn(rows):  # made on the context's device, as cam_targets are
        rows = np.asarray(rows)
        maps = cache.maps_on(ctx.device, rows, ctx.seg_size, aug_smooth=aug_smooth)
        return confident_labels(maps > high, maps < low, labels[rows]).cpu().numpy()

    return Targets("confident", key, fn, _memo(ctx))


def refined_targets(ctx: Context, refined: Refined) -> Targets:
    """Self-training targets from a calibrated refinement (:func:`refine.refine_stage`) at the
    segmentation input size (:meth:`refine.Refined.targets`: defect where the refined mask is,
    background well outside the region or where the grey level is the image's own, or where the
    label says the class is absent; the band between ignored)."""
    if tuple(refined.size) != tuple(ctx.seg_size):
        raise ValueError(f"refined maps at {refined.size}; the segmentation input is {ctx.seg_size}")
    cal = refined.calibration
    key = {"masks": "refined", **_cam_key(ctx, refined.cache, True),
           "refine": config_key(refined.config),
           "scales": [float(v) for v in cal.scales],
           "thresholds": [float(v) for v in cal.thresholds],
           "polarity": [None if np.isnan(v) else float(v) for v in cal.polarity],
           "deviations": [None if np.isnan(v) else float(v) for v in cal.deviations],
           "anywhere": [bool(v) for v in cal.anywhere],
           "near": [bool(v) for v in cal.near],
           "targets_version": REFINED_TARGETS_VERSION}
    return Targets("refined", key, refined.targets, _memo(ctx), guide=ctx.images())


# ------------------------------------------------------------------------------------------------
# One network per held-out fold
# ------------------------------------------------------------------------------------------------

def held_out_folds(profile: Profile) -> list[int]:
    """The folds a profile's segmentation stage holds out and scores (each by a network trained
    on the rest): its ``segmentation.folds``, else every fold (the profile has checked the
    numbers when it was made)."""
    folds = profile.segmentation.folds
    return list(range(profile.n_folds)) if folds is None else list(folds)


def seg_folds(ctx: Context) -> list[int]:
    """The folds whose images are held out and scored in this context."""
    return held_out_folds(ctx.profile)


def eval_rows(ctx: Context) -> np.ndarray:
    """The images scored in the segmentation stage: those of the held-out folds."""
    return np.flatnonzero(np.isin(ctx.folds, seg_folds(ctx)))


@dataclass
class SegRun:
    """Trained networks of one training set-up: ``models`` by held-out fold, their configuration,
    run folder and the seconds spent training in this session (0 when every fold was reused)."""

    models: dict[int, torch.nn.Module]
    config: SegConfig
    dir: Path
    seconds: float


def _setup(ctx: Context, targets: Targets, cfg: SegConfig | None,
           classifier: ClassifierRun | None, overrides: dict) -> tuple[SegConfig, Path]:
    """The configuration (the profile's ``segmentation.net`` unless given, with ``overrides``)
    and the run folder, named by what the weights depend on."""
    stage = ctx.profile.segmentation
    cfg = dataclasses.replace(cfg or stage.net, **{k: v for k, v in overrides.items()
                                                   if v is not None})
    key = {"data": ctx.index.fingerprint(), "folds": stable_hash(ctx.folds.tolist()),
           "labels": stable_hash(ctx.index.labels.tolist()), "size": ctx.seg_size,
           "defective_only": stage.defective_only, "targets": targets.key,
           "max_train": stage.max_train, "train": cfg.key()}
    if cfg.encoder_init == "classifier":
        if classifier is None:
            raise ValueError("encoder_init='classifier' needs the classifier stage's result "
                             "(classifier=pipeline.classifier_stage(ctx))")
        key["classifier"] = Path(classifier.dir).name
    enc = "" if cfg.arch == "thesis_unet" else "_" + cfg.encoder.replace("tu-", "")
    name = f"{targets.name}_{cfg.arch}{enc}_{cfg.loss}_{stable_hash(key)}"
    return cfg, ctx.artifacts / "segmentation" / name


def segmenter_dir(ctx: Context, targets: Targets, cfg: SegConfig | None = None,
                  classifier: ClassifierRun | None = None, **overrides) -> Path:
    """The run folder :func:`train_segmenters` uses for these arguments (two set-ups with the
    same folder train the same networks)."""
    return _setup(ctx, targets, cfg, classifier, overrides)[1]


class FixedTargets:
    """Targets made once for the rows a network trains on (``masks[i]`` those of ``rows[i]``):
    plain arrays that pickle, for a network trained in a process of its own."""

    def __init__(self, rows, masks: np.ndarray):
        self.pos = {int(r): i for i, r in enumerate(rows)}
        self.masks = masks

    def __call__(self, rows) -> np.ndarray:
        return self.masks[[self.pos[int(r)] for r in rows]]


def fixed_targets(targets: Targets, ds, rows, batch: int = 32) -> FixedTargets:
    """``targets`` of ``rows`` made now, batch by batch, as a trainer reading ``ds`` would make
    them (a guide that is ``ds`` gets the batch's images)."""
    rows = np.asarray(rows)
    parts = []
    for b in chunks(rows, batch):
        y = (targets(b, ds.uint8_batch(b)) if getattr(targets, "guide", None) is ds
             else targets(b))
        parts.append(y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
    return FixedTargets(rows, np.concatenate(parts))


@dataclass
class _Plan:
    """One set-up's networks: its context, training images, targets, configuration, run folder,
    and the training rows of each held-out fold it trains."""

    ctx: Context
    ds: object
    targets: Targets
    cfg: SegConfig
    dir: Path
    rows: dict[int, np.ndarray]

    def todo(self) -> list[int]:
        return [k for k in self.rows if not (self.dir / f"fold{k}" / "final.pt").is_file()]


def _plan(ctx: Context, targets: Targets, cfg: SegConfig | None, classifier, only_folds,
          overrides: dict) -> _Plan:
    stage = ctx.profile.segmentation
    cfg, run = _setup(ctx, targets, cfg, classifier, overrides)
    folds = seg_folds(ctx)
    if only_folds is not None:
        bad = sorted(set(only_folds) - set(folds))
        if bad:
            raise ConfigError(f"segmentation folds {bad} are not among the held-out folds {folds}")
        folds = [k for k in folds if k in set(only_folds)]
    train_ok = ctx.index.labels.any(1) if stage.defective_only else np.ones(len(ctx.index), bool)
    rows = {}
    for k in folds:
        r = np.flatnonzero((ctx.folds != k) & train_ok)
        if stage.max_train and len(r) > stage.max_train:
            pick = np.random.default_rng(ctx.profile.seed + k).choice(
                len(r), stage.max_train, replace=False)
            r = r[np.sort(pick)]
        rows[k] = r
    return _Plan(ctx, ctx.seg_images(), targets, cfg, run, rows)


def _network_job(args) -> tuple[str, float]:
    """One network of :func:`_train_side_by_side`, in its worker process."""
    ds, targets, rows, num_classes, cfg, out, fold, encoder = args
    t = time.perf_counter()
    train_segmenter(ds, targets, rows, num_classes, cfg, out, progress=False, fold=fold,
                    encoder_state=encoder)
    return f"{out.parent.name}/{out.name}", time.perf_counter() - t


def _train_side_by_side(units: list[tuple[_Plan, int]], encoders: dict, progress: bool) -> None:
    """Train the (set-up, fold) ``units`` up to the largest ``processes`` of their
    configurations at a time, each in a process of one thread; their targets are made here
    first (:func:`fixed_targets`). Each writes its fold folder, which the caller then loads."""
    n = min(max(p.cfg.processes for p, _ in units), len(units))
    say(progress, f"segmentation: {len(units)} networks in {n} processes of one thread each")
    jobs = []
    for p, k in units:
        enc = encoders.get((p.dir, k))
        jobs.append((p.ds, fixed_targets(p.targets, p.ds, p.rows[k], p.cfg.batch_size), p.rows[k],
                     p.ctx.index.num_classes, p.cfg, p.dir / f"fold{k}", k,
                     None if enc is None else {name: v.cpu() for name, v in enc.items()}))
    for name, seconds in side_by_side(_network_job, jobs, n):
        say(progress, f"segmentation: {name} finished in {seconds:.0f} s")


def _train(plans: list[_Plan], classifier: ClassifierRun | None, progress: bool) -> list[SegRun]:
    """Every plan's networks: those still to train side by side where their configuration asks
    for processes, the rest here one after another; then every network loaded."""
    encoders = {}  # the fold's classifier encoder, for the folds still to train
    for p in plans:
        if p.cfg.encoder_init == "classifier":
            for k in p.todo():
                encoders[(p.dir, k)] = load_fold_model(
                    classifier.dir, k, classifier.num_classes, classifier.config,
                    p.ctx.device).encoder.state_dict()
    t0 = time.perf_counter()
    side = [(p, k) for p in plans if p.cfg.processes for k in p.todo()]
    if side:
        _train_side_by_side(side, encoders, progress)
    models = [{k: train_segmenter(p.ds, p.targets, rows, p.ctx.index.num_classes, p.cfg,
                                  p.dir / f"fold{k}", progress=progress, fold=k,
                                  encoder_state=encoders.get((p.dir, k)))
               for k, rows in p.rows.items()} for p in plans]
    seconds = time.perf_counter() - t0  # set-ups trained together share the time they took
    return [SegRun(models=m, config=p.cfg, dir=p.dir, seconds=seconds)
            for p, m in zip(plans, models)]


def train_segmenters(ctx: Context, targets: Targets, cfg: SegConfig | None = None,
                     classifier: ClassifierRun | None = None, progress: bool = True,
                     only_folds=None, **overrides) -> SegRun:
    """One segmentation network per held-out fold (:func:`seg_folds`, or those of them in
    ``only_folds``), trained on the other folds' images (defective ones only with
    ``defective_only``) with ``targets``. ``cfg``: the profile's ``segmentation.net`` unless
    given (``overrides`` change its fields). With ``encoder_init="classifier"`` each fold's
    encoder starts from the ``classifier`` stage's model of the same fold (trained on the same
    training folds, so nothing held out leaks in). With ``processes`` the folds train side by
    side. Cached and resumable under
    ``artifacts/<profile>/segmentation/<targets>_<arch>_<hash>/fold<k>``."""
    return _train([_plan(ctx, targets, cfg, classifier, only_folds, overrides)], classifier,
                  progress)[0]


def train_segmenter_sets(sets: list[tuple[Context, Targets, SegConfig | None]],
                         classifier: ClassifierRun | None = None,
                         progress: bool = True) -> list[SegRun]:
    """:func:`train_segmenters` for several set-ups ``(context, targets, configuration)`` at
    once: where their configurations ask for ``processes``, every (set-up, fold) network still
    to train runs side by side with the others; each ``SegRun.seconds`` is then the time of
    the whole call."""
    return _train([_plan(c, t, cfg, classifier, None, {}) for c, t, cfg in sets], classifier,
                  progress)


# ------------------------------------------------------------------------------------------------
# Prediction and scoring
# ------------------------------------------------------------------------------------------------

def predict_probs(ctx: Context, run: SegRun, rows, size=None, batch: int = 32,
                  numpy: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray | torch.Tensor]]:
    """``(rows, probabilities [b, C, H, W])`` per batch: each held-out image by the network of
    its own fold, upsampled (bilinear, on the network's device) to ``size`` (default: the scoring
    size, the classifier's input). Rows come fold by fold, in the order of ``run.models``.
    ``numpy=False``: the probabilities stay tensors on the network's device."""
    ds = ctx.seg_images()
    size = tuple(size or ctx.profile.image_size)
    rows = np.asarray(rows)
    for k, model in run.models.items():
        for b, p in predict_masks(model, ds, rows[ctx.folds[rows] == k], loss=run.config.loss,
                                  batch_size=batch, numpy=False,
                                  num_workers=run.config.num_workers):
            if p.shape[-2:] != size:
                p = torch.nn.functional.interpolate(p, size=size, mode="bilinear",
                                                    align_corners=False)
            yield b, (p.cpu().numpy() if numpy else p)


def predict_masks_at(ctx: Context, run: SegRun, rows, params: Params, probs: np.ndarray,
                     size=None) -> np.ndarray:
    """Binary masks ``[len(rows), C, H, W]`` of ``rows`` (held-out images) at ``size``: the
    network's probabilities post-processed with ``params``; ``probs`` ``[len(rows), C]`` are the
    classifier's probabilities of those rows (the confidence gate)."""
    rows = np.asarray(rows)
    pos = {int(r): i for i, r in enumerate(rows)}
    out = [None] * len(rows)
    for b, p in predict_probs(ctx, run, rows, size):
        idx = [pos[int(r)] for r in b]
        for i, m in zip(idx, apply(p, probs[idx], params)):
            out[i] = m
    return np.stack(out)


def seg_stats(ctx: Context, run: SegRun, thresholds=(SEG_THRESHOLD,), batch: int = 32,
              defective_only: bool = False, truth: dict | None = None, score_size=None,
              masks_of: Callable[[np.ndarray, tuple[int, int]], np.ndarray] | None = None
              ) -> Stats:
    """Post-processing statistics of the networks' probabilities on their held-out images, scored
    exactly as the CAM masks: upsampled to the scoring size (the classifier's input) and
    compared with the true masks there. ``truth``: a dict shared between calls that keeps the
    (bit-packed) true masks of each batch. ``score_size``: score at another size (e.g. the
    network's own input, for comparisons between networks only). ``masks_of(rows, size)``: other
    masks to compare with (default: the true masks). Score with ``postprocess.report``."""
    size = tuple(score_size or ctx.profile.image_size)
    keep = ctx.index.labels.any(1) | (not defective_only)
    rows = np.flatnonzero(np.isin(ctx.folds, list(run.models)) & keep)
    order = np.concatenate([rows[ctx.folds[rows] == k] for k in run.models])  # as predict_probs
    batches = []  # zip() in collect_stats takes a batch of maps before its true masks

    def maps():
        for b, p in predict_probs(ctx, run, rows, size, batch, numpy=False):
            batches.append(b)
            yield p  # counted on the network's device

    def trues():
        for i in itertools.count():
            if masks_of is not None:
                yield masks_of(batches[i], size)
                continue
            if truth is None:
                yield ctx.true_masks(batches[i], size)
                continue
            key = (size, tuple(int(r) for r in batches[i]))
            if key not in truth:  # the same batches recur for every network scored
                truth[key] = np.packbits(ctx.true_masks(batches[i], size), axis=-1)
            yield np.unpackbits(truth[key], axis=-1, count=size[1])

    return collect_stats(maps(), trues(), thresholds, rows=order)


def fit_to_teacher(stats: Stats, labels: np.ndarray) -> np.ndarray:
    """Per class, the threshold of ``stats`` (:func:`postprocess.collect_stats` of a network's
    probabilities against its teacher's masks) whose masks agree best with the teacher's: mean
    Dice over the images, each class gated by ``labels`` ``[N, C]`` (the images' labels, in the
    order of ``stats``). A class no image is labelled with keeps 0.5."""
    labels = np.asarray(labels, bool)
    params, _ = search(stats, labels.astype(float), [0.5], [0], rows=np.arange(len(labels)),
                       per_class=True)
    return np.where(labels.any(0), np.asarray(params.threshold, float), 0.5)


def teacher_thresholds(ctx: Context, run: SegRun, refined: Refined,
                       grid=NET_THRESHOLDS, batch: int = 32) -> np.ndarray:
    """:func:`fit_to_teacher` for a network self-trained on ``refined``'s masks: its held-out
    probabilities on the images labelled defective against ``refined``'s masks of the same
    images, gated by the image labels (:meth:`refine.Refined.batches`). Label-only: no true mask
    is read. A network trained on noisy targets is not calibrated at 0.5: where its teacher's
    region is not consistent from image to image (a region that holds much sheet), its
    probabilities stay below 0.5, and a fixed 0.5 finds no defect at all."""
    labels = ctx.index.labels.astype(bool)
    if not labels[np.isin(ctx.folds, list(run.models))].any():
        return np.full(labels.shape[1], 0.5)

    gate = labels.astype(float)  # the teacher's masks gated by the labels, not the classifier

    def teacher(rows, size):
        return np.concatenate([m for _, _, m in refined.batches(rows, gate, batch)])

    stats = seg_stats(ctx, run, grid, batch, defective_only=True, score_size=refined.size,
                      masks_of=teacher)
    return fit_to_teacher(stats, labels[stats.rows])
