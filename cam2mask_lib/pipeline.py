"""What every notebook and command does first, and the stages as one-call functions.

    ctx = pipeline.context("cpu")            # profile, data, folds, output folders, provenance
    result = pipeline.classifier_stage(ctx)  # 5-fold classifier, out-of-fold probabilities
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DatasetIndex, folds_for
from .profiles import Profile, get_profile, load_data
from .profiles import artifacts_dir as _artifacts_dir
from .profiles import figures_dir as _figures_dir
from .report import Provenance, provenance


@dataclass
class Context:
    profile: Profile
    index: DatasetIndex
    folds: np.ndarray
    figures: Path
    artifacts: Path
    prov: Provenance
    _images: object = field(default=None, repr=False)  # the shared ImageDataset, made on first use

    def describe(self) -> str:
        return f"{self.profile.describe()}\n{self.index.describe()}"

    def images(self):
        """The images (no masks) at the profile's input size, one shared instance, so decoded
        images cached in memory (``cache_images``) are reused by every stage of a session."""
        from .data import ImageDataset, image_array

        if self._images is None:
            arr = (image_array(self.index, self.profile.image_size, self.artifacts / "images",
                               progress=False) if self.profile.cache_images else None)
            self._images = ImageDataset(self.index, self.profile.image_size, with_masks=False,
                                        array=arr)
        return self._images


def context(profile: str | Profile = "cpu", data_dir: str | Path | None = None,
            seed: int | None = None, figures_dir: str | Path | None = None,
            artifacts_dir: str | Path | None = None, progress: bool = False,
            index: DatasetIndex | None = None, **overrides) -> Context:
    """Resolve the profile (with overrides), load or generate its data (or take an already
    loaded ``index``), and load or make its folds (``artifacts/<profile>/folds_k{K}_seed{S}.csv``,
    shared by every stage)."""
    prof = get_profile(profile, seed=seed, **overrides)
    art = _artifacts_dir(prof, artifacts_dir)
    if index is None:
        index = load_data(prof, data_dir, art, progress=progress)
    folds = folds_for(index, art, n_folds=prof.n_folds, seed=prof.seed)
    return Context(profile=prof, index=index, folds=folds, figures=_figures_dir(prof, figures_dir),
                   artifacts=art, prov=provenance(prof, index))


def classifier_stage(ctx: Context, only_folds=None, progress: bool = True, **overrides) -> dict:
    """Train (or reuse) the profile's classifier on every fold; see :func:`classify.train_cv`."""
    from .classify import TrainConfig, train_cv

    cfg = TrainConfig.from_profile(ctx.profile, **overrides)
    res = train_cv(ctx.index, ctx.folds, cfg, ctx.artifacts / "classifier",
                   only_folds=only_folds, progress=progress,
                   ds=ctx.images() if cfg.image_size == ctx.profile.image_size else None)
    res["config"] = cfg
    return res


# ------------------------------------------------------------------------------------------------
# CAM and post-processing stages
# ------------------------------------------------------------------------------------------------

def fold_models(cls_result: dict, num_classes: int, weights: str = "averaged") -> dict:
    """The classifier of every fold: ``"averaged"`` (top-3 epochs, the paper's SWA) or
    ``"best_epoch"`` (the single epoch with the lowest validation loss, no averaging)."""
    import json

    from .classify import _load, build_classifier, load_fold_model

    cfg, run = cls_result["config"], Path(cls_result["dir"])
    out = {}
    for fdir in sorted(run.glob("fold*")):
        k = int(fdir.name[4:])
        if weights == "averaged":
            out[k] = load_fold_model(run, k, num_classes, cfg)
        elif weights == "best_epoch":
            best = json.loads((fdir / "done.json").read_text())["averaged_epochs"][0]
            m = build_classifier(cfg.encoder, num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
            m.load_state_dict(_load(fdir / f"epoch{best}.pt"))
            out[k] = m.eval()
        else:
            raise ValueError(f"weights must be 'averaged' or 'best_epoch', got {weights!r}")
    return out


def cam_stage(ctx: Context, cls_result: dict, method: str = "gradcam++", aug_smooth: bool = True,
              weights: str = "averaged", progress: bool = True):
    """Out-of-fold CAMs of every image (each from its own fold's model), cached at feature-map
    resolution under ``artifacts/<profile>/cams/<classifier run>/<variant>/``."""
    from .cams import cam_dataset

    if not cls_result["complete"]:
        raise RuntimeError("the classifier has unfinished folds; run the classification stage first")
    variant = f"{method}{'_aug' if aug_smooth else ''}_{weights}"
    out = ctx.artifacts / "cams" / Path(cls_result["dir"]).name / variant
    models = fold_models(cls_result, ctx.index.num_classes, weights)
    return cam_dataset(models, ctx.images(), ctx.folds, out, method=method, aug_smooth=aug_smooth,
                       progress=progress)


def true_masks(ctx: Context, rows, size=None) -> "np.ndarray":
    """True masks ``[len(rows), C, H, W]`` at ``size``, by default the profile's input size (the
    scoring resolution)."""
    from .data import resize_mask

    size = tuple(size or ctx.profile.image_size)
    return np.stack([resize_mask(ctx.index.mask(int(i)), size) for i in rows])


def stats_from_cache(ctx: Context, cache, rows, thresholds, aug_smooth: bool, batch: int = 32,
                     progress: bool = False):
    """Post-processing statistics (see :func:`postprocess.collect_stats`) of cached CAMs."""
    from tqdm import tqdm

    from .postprocess import collect_stats

    rows = np.asarray(rows)
    chunks = [rows[s:s + batch] for s in range(0, len(rows), batch)]
    maps = (cache.maps(c, ctx.profile.image_size, aug_smooth=aug_smooth)
            for c in tqdm(chunks, desc="scoring", disable=not progress))
    trues = (true_masks(ctx, c) for c in chunks)
    st = collect_stats(maps, trues, thresholds)
    st.rows = rows
    return st


def stats_from_method(ctx: Context, cls_result: dict, method: str, rows, thresholds,
                      weights: str = "averaged", batch: int = 16, progress: bool = False):
    """Statistics for a CAM method computed directly (e.g. through pytorch-grad-cam), no cache."""
    import torch
    from tqdm import tqdm

    from .cams import compute_cams
    from .postprocess import collect_stats

    rows = np.asarray(rows)
    ds = ctx.images()
    models = {k: m.to(memory_format=torch.channels_last)
              for k, m in fold_models(cls_result, ctx.index.num_classes, weights).items()}
    order = np.argsort(ctx.folds[rows], kind="stable")
    rows = rows[order]
    chunks = [rows[s:s + batch] for s in range(0, len(rows), batch)]

    def maps():
        for c in tqdm(chunks, desc=method, disable=not progress):
            out = np.empty((len(c), ctx.index.num_classes, *ctx.profile.image_size), np.float32)
            for f in np.unique(ctx.folds[c]):
                sel = np.flatnonzero(ctx.folds[c] == f)
                x = torch.stack([ds[int(r)]["image"] for r in c[sel]]).contiguous(
                    memory_format=torch.channels_last)
                out[sel] = compute_cams(models[int(f)], x, method=method)
            yield out

    st = collect_stats(maps(), (true_masks(ctx, c) for c in chunks), thresholds)
    st.rows = rows
    return st


# the CAM variants of Table 2: name -> (method, aug smoothing, weights)
VARIANTS = {
    "Grad-CAM": ("gradcam", False, "best_epoch"),
    "Grad-CAM++": ("gradcam++", False, "best_epoch"),
    "Grad-CAM++ + SWA + aug smooth": ("gradcam++", True, "averaged"),
}
BEST_VARIANT = "Grad-CAM++ + SWA + aug smooth"
# 0.1 steps plus the paper's 0.75 and a low 0.05 (each threshold costs a pass over all maps)
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
CONFIDENCES = tuple(round(c, 2) for c in np.arange(0.1, 0.91, 0.1))
MIN_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01)


def min_areas(ctx: Context) -> list[int]:
    """The minimum-area grid in pixels at the scoring resolution (the profile's input size)."""
    h, w = ctx.profile.image_size
    return [round(f * h * w) for f in MIN_AREA_FRACTIONS]


def postprocessing_stage(ctx: Context, cls_result: dict, caches: dict,
                         other_methods=("layercam",),
                         progress: bool = True) -> dict:
    """Table 2: every CAM variant with tuned post-processing, the paper's parameters, the other
    grad-cam methods, and two baselines, scored with the paper's protocol (defective images) and
    on all images and non-empty masks. Returns the table and everything needed for pictures."""
    import pandas as pd

    from . import paper
    from .postprocess import Params, baseline_empty, baseline_fill, report, search

    probs = cls_result["oof"]
    names = ctx.index.class_names
    all_rows = np.arange(len(ctx.index))
    mins = min_areas(ctx)
    stats = {name: stats_from_cache(ctx, caches[name], all_rows, THRESHOLDS, VARIANTS[name][1],
                                    progress=progress) for name in caches}
    rows, tuned = [], {}

    def add(name, rep, params, paper_value=None, note="", all_images=True):
        s = rep.summary()
        rows.append({"experiment": name, "post-processing": params, "Dice (defective images)":
                     s["dice_defective_images"], "Dice (all images)":
                     s["dice_all_images"] if all_images else float("nan"),
                     "Dice (non-empty masks)": s["dice_nonempty_masks"],
                     "paper Dice": paper_value, "note": note})

    st0 = next(iter(stats.values()))
    add("baseline: no mask anywhere", baseline_empty(st0, names), "-")
    fill_scores = {c: baseline_fill(st0, probs, c, names).summary()["dice_defective_images"]
                   for c in CONFIDENCES}
    best_c = max(fill_scores, key=fill_scores.get)
    add("baseline: whole image where the classifier fires", baseline_fill(st0, probs, best_c, names),
        f"confidence={best_c:g} (tuned)")
    reports = {}
    for name, st in stats.items():
        params, _ = search(st, probs, CONFIDENCES, mins)
        tuned[name] = params
        reports[name] = report(st, probs, params, names)
        add(f"{name} + {cls_result['config'].encoder}", reports[name],
            params.describe() + " (tuned)", paper.TABLE2.get(name))
    best = stats[BEST_VARIANT] if BEST_VARIANT in stats else st0
    pc, _ = search(best, probs, CONFIDENCES, mins, per_class=True)
    tuned["per class"] = pc
    reports["per class"] = report(best, probs, pc, names)
    add(f"{BEST_VARIANT}, per-class post-processing", reports["per class"],
        pc.describe() + " (tuned per class)")
    pp_paper = Params(**paper.PAPER_POSTPROCESS)
    key = "Grad-CAM++ + SWA + aug smooth, confidence=0.5, min_seg_len=0, threshold=0.3"
    add(f"{BEST_VARIANT}, the paper's parameters", report(best, probs, pp_paper, names),
        pp_paper.describe(), paper.TABLE2[key])
    from .cams import FAST_METHODS

    defective = np.flatnonzero(ctx.index.labels.any(1))
    for m in other_methods:
        fast = m in FAST_METHODS  # cheap: every image; else pytorch-grad-cam on defective images
        st = stats_from_method(ctx, cls_result, m, all_rows if fast else defective, THRESHOLDS,
                               progress=progress)
        params, _ = search(st, probs[st.rows], CONFIDENCES, mins, rows=np.arange(len(st.rows)))
        add(f"{m} ({'fast path, equal to ' if fast else 'through '}pytorch-grad-cam) + "
            f"{cls_result['config'].encoder}", report(st, probs[st.rows], params, names),
            params.describe() + " (tuned)", all_images=fast,
            note="SWA weights, no aug smoothing" + ("" if fast else ", defective images only"))
    table = pd.DataFrame(rows)
    return {"table": table, "stats": stats, "params": tuned, "reports": reports, "probs": probs}


def per_class_table(rep, class_names):
    import pandas as pd

    s = rep.summary()
    return pd.DataFrame([{"class": c, "Dice (defective images)": s[f"class {c} (defective images)"],
                          "Dice (non-empty masks)": s[f"class {c} (non-empty masks)"],
                          "non-empty masks": int(rep.true_nonempty[:, k].sum())}
                         for k, c in enumerate(class_names)])


# ------------------------------------------------------------------------------------------------
# Segmentation stage (section VI of the paper, the thesis's grid)
# ------------------------------------------------------------------------------------------------

SEG_THRESHOLD = 0.2  # the paper's binarisation of the U-Net's output (with min_seg_len 0)


def seg_size(profile: Profile) -> tuple[int, int]:
    """The segmentation networks' input size: ``seg_size``, else the classifier's input size;
    both sides must be divisible by 32 (five 2x poolings in every smp encoder)."""
    size = tuple(int(v) for v in (profile.seg_size or profile.image_size))
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"profile {profile.name!r}: segmentation input {size[0]}x{size[1]} has a "
                         f"side not divisible by 32; set seg_size (e.g. "
                         f"{size[0] // 32 * 32}x{size[1] // 32 * 32})")
    return size


def seg_images(ctx: Context):
    """The images at the segmentation input size (memory-mapped once when the profile caches
    images), ImageNet-normalised."""
    from .data import ImageDataset, image_array

    size = seg_size(ctx.profile)
    if size == tuple(ctx.profile.image_size):
        return ctx.images()
    arr = None
    if ctx.profile.cache_images:  # shrink the classifier's cached array when it is larger
        big = ctx.images().array
        ok = big is not None and big.shape[1] >= size[0] and big.shape[2] >= size[1]
        arr = image_array(ctx.index, size, ctx.artifacts / "images", progress=False,
                          source=big if ok else None)
    return ImageDataset(ctx.index, size, with_masks=False, array=arr)


@dataclass
class Targets:
    """Training masks for a segmentation network: ``targets(rows)`` is uint8 ``[len(rows), C, H,
    W]`` at the segmentation input size (0/1, ``segment.IGNORE`` where a pixel does not count).
    ``name`` labels the run folder, ``key`` is what the masks depend on (part of the cache key)."""

    name: str
    key: dict
    fn: object
    memo: dict | None = None  # per-row results kept in memory (small profiles)

    def __call__(self, rows):
        if self.memo is None:
            return self.fn(rows)
        todo = [int(i) for i in rows if int(i) not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.fn(np.asarray(todo))))
        return np.stack([self.memo[int(i)] for i in rows])


def _memo(ctx: Context) -> dict | None:
    return {} if ctx.profile.cache_images else None


def true_targets(ctx: Context) -> Targets:
    """The true masks (supervised training)."""
    size = seg_size(ctx.profile)
    return Targets("true", {"masks": "true"}, lambda rows: true_masks(ctx, rows, size), _memo(ctx))


def _cam_maps(ctx: Context, cache, rows, aug_smooth: bool) -> np.ndarray:
    return cache.maps(np.asarray(rows), seg_size(ctx.profile), aug_smooth=aug_smooth)


def cam_targets(ctx: Context, cache, threshold=SEG_THRESHOLD, min_area_fraction=0.0,
                aug_smooth: bool = True, name: str = "cam") -> Targets:
    """Masks made from the (out-of-fold) CAMs of each training image: the CAM above
    ``threshold`` for every class in the image's label (the only supervision a labelled image
    has; absent classes get empty masks), emptied when smaller than ``min_area_fraction`` of the
    image. ``threshold`` and ``min_area_fraction`` may be per class."""
    from .postprocess import Params, apply

    labels = ctx.index.labels.astype(bool)
    h, w = seg_size(ctx.profile)
    params = Params(confidence=0.5, threshold=threshold,
                    min_area=np.asarray(min_area_fraction, float) * h * w)
    key = {"masks": "cam", "cams": str(Path(cache.path).relative_to(ctx.artifacts)),
           "aug_smooth": aug_smooth, "params": params.describe()}

    def fn(rows):
        return apply(_cam_maps(ctx, cache, rows, aug_smooth), labels[np.asarray(rows)], params)

    return Targets(name, key, fn, _memo(ctx))


def confident_targets(ctx: Context, cache, high: float = 0.6, low: float = 0.2,
                      aug_smooth: bool = True) -> Targets:
    """Confident-pixel pseudo-labels (:func:`segment.pseudo_labels`): for a class in the image's
    label, defect above ``high``, background below ``low``, ignored in between; absent classes
    are background everywhere."""
    from .segment import pseudo_labels

    labels = ctx.index.labels.astype(bool)
    key = {"masks": "confident", "cams": str(Path(cache.path).relative_to(ctx.artifacts)),
           "aug_smooth": aug_smooth, "high": high, "low": low}

    def fn(rows):
        rows = np.asarray(rows)
        return pseudo_labels(_cam_maps(ctx, cache, rows, aug_smooth), labels[rows], high, low)

    return Targets("confident", key, fn, _memo(ctx))


def seg_folds(ctx: Context) -> list[int]:
    """The folds whose images are held out and scored (each by a network trained on the rest)."""
    folds = ctx.profile.seg_folds
    folds = list(range(ctx.profile.n_folds)) if folds is None else [int(f) for f in folds]
    bad = [f for f in folds if not 0 <= f < ctx.profile.n_folds]
    if bad:
        raise ValueError(f"seg_folds {bad} out of range for {ctx.profile.n_folds} folds")
    return folds


def train_segmenters(ctx: Context, targets: Targets, cfg=None, classifier: dict | None = None,
                     progress: bool = True, **overrides) -> dict:
    """One segmentation network per held-out fold (:func:`seg_folds`), trained on the other
    folds' images (defective ones only with ``seg_defective_only``) with ``targets``. With
    ``encoder_init="classifier"`` each fold's encoder starts from the ``classifier`` stage's
    model of the same fold (trained on the same training folds, so nothing held out leaks in).
    Cached and resumable under ``artifacts/<profile>/segmentation/<targets>_<arch>_<hash>/
    fold<k>``. Returns ``{"models": {fold: model}, "config", "dir", "seconds"}``."""
    import time

    from .segment import SegConfig, train_segmenter
    from .utils import stable_hash

    cfg = cfg or SegConfig.from_profile(ctx.profile, **overrides)
    ds = seg_images(ctx)
    train_ok = (ctx.index.labels.any(1) if ctx.profile.seg_defective_only
                else np.ones(len(ctx.index), bool))
    key = {"images": stable_hash(list(ctx.index.image_ids)), "folds": stable_hash(ctx.folds.tolist()),
           "labels": stable_hash(ctx.index.labels.tolist()), "size": seg_size(ctx.profile),
           "defective_only": ctx.profile.seg_defective_only, "targets": targets.key,
           "max_train": ctx.profile.seg_max_train,
           "train": cfg.key()}
    encoders = {}
    if cfg.encoder_init == "classifier":
        if classifier is None:
            raise ValueError("encoder_init='classifier' needs the classifier stage's result "
                             "(classifier=pipeline.classifier_stage(ctx))")
        key["classifier"] = Path(classifier["dir"]).name
        encoders = {k: m.encoder.state_dict()
                    for k, m in fold_models(classifier, ctx.index.num_classes).items()}
    enc = "" if cfg.arch == "thesis_unet" else "_" + cfg.encoder.replace("tu-", "")
    run = ctx.artifacts / "segmentation" / f"{targets.name}_{cfg.arch}{enc}_{cfg.loss}_{stable_hash(key)}"
    t0 = time.perf_counter()
    models = {}
    for k in seg_folds(ctx):
        rows = np.flatnonzero((ctx.folds != k) & train_ok)
        if ctx.profile.seg_max_train and len(rows) > ctx.profile.seg_max_train:
            pick = np.random.default_rng(ctx.profile.seed + k).choice(
                len(rows), ctx.profile.seg_max_train, replace=False)
            rows = rows[np.sort(pick)]
        models[k] = train_segmenter(ds, targets, rows, ctx.index.num_classes, cfg, run / f"fold{k}",
                                    progress=progress, fold=k, encoder_state=encoders.get(k))
    return {"models": models, "config": cfg, "dir": run, "seconds": time.perf_counter() - t0}


def eval_rows(ctx: Context) -> np.ndarray:
    """The images scored in the segmentation stage: those of the held-out folds."""
    return np.flatnonzero(np.isin(ctx.folds, seg_folds(ctx)))


def seg_stats(ctx: Context, trained: dict, thresholds=(SEG_THRESHOLD,), batch: int = 32,
              defective_only: bool = False, truth: dict | None = None, score_size=None):
    """Post-processing statistics of the networks' probabilities on their held-out images, scored
    exactly as the CAM masks: upsampled (bilinear) to the scoring size (the profile's input size)
    and compared with the true masks there. ``truth``: a dict shared between calls that keeps the
    (bit-packed) true masks of each batch. ``score_size``: score at another size (e.g. the
    network's own input, for comparisons between networks only). Score with
    ``postprocess.report``."""
    import itertools

    import torch

    from .postprocess import collect_stats
    from .segment import predict_masks

    ds = seg_images(ctx)
    size = tuple(score_size or ctx.profile.image_size)
    loss = trained["config"].loss

    def parts():
        for k, model in trained["models"].items():
            rows = np.flatnonzero((ctx.folds == k) & (ctx.index.labels.any(1) | (not defective_only)))
            for b, p in predict_masks(model, ds, rows, loss=loss, batch_size=batch):
                if p.shape[-2:] != size:
                    p = torch.nn.functional.interpolate(torch.from_numpy(p), size=size,
                                                        mode="bilinear", align_corners=False).numpy()
                yield b, p

    order = []  # zip() below takes a batch of maps before its true masks

    def maps():
        for b, p in parts():
            order.append(b)
            yield p

    def trues():
        for i in itertools.count():
            if truth is None:
                yield true_masks(ctx, order[i], size)
                continue
            key = (size, tuple(int(r) for r in order[i]))
            if key not in truth:  # the same batches recur for every network scored
                truth[key] = np.packbits(true_masks(ctx, order[i], size), axis=-1)
            yield np.unpackbits(truth[key], axis=-1, count=size[1])

    st = collect_stats(maps(), trues(), thresholds)
    st.rows = np.concatenate(order)
    return st


# The thesis's grid (Table 4) and the lecture's toolbox: name -> SegConfig fields. "{cls}" is the
# classifier's encoder (timm, as ``tu-<name>``); "{enc}" is the profile's ``grid_encoder`` (the
# thesis's ResNet), or where that is None the classifier's encoder again. grid_stage starts every
# network whose encoder is the classifier's from the fold's classifier (encoder_init).
THESIS_ARCHS = {"U-Net": dict(arch="thesis_unet"),
                "U-Net with ResNet encoder": dict(arch="unet", encoder="{enc}"),
                "ResNet encoder-decoder": dict(arch="resnet_encdec", encoder="{enc_timm}")}
THESIS_LOSSES = {"BCE": "bce_dice", "CCE": "cce_dice", "Focal loss": "focal"}
LECTURE_RUNS = {
    "FPN": dict(arch="fpn", encoder="{cls}"),
    "DeepLabV3+": dict(arch="deeplabv3plus", encoder="{cls}"),
    "U-Net++": dict(arch="unetplusplus", encoder="{cls}"),
    "U-Net (TernausNet-style)": dict(arch="unet", encoder="{cls}"),
    "U-Net (TernausNet-style), BCE - ln(Dice)": dict(arch="unet", encoder="{cls}",
                                                     loss="bce_logdice"),
    "U-Net (TernausNet-style), Lovasz": dict(arch="unet", encoder="{cls}", loss="lovasz"),
    "U-Net (TernausNet-style), BCE + label smoothing": dict(arch="unet", encoder="{cls}",
                                                            loss="bce_smooth"),
    # decay 0.9 (an average over the last ~10 steps): short CPU runs have only ~40 steps, where
    # 0.99 keeps two thirds of the random initial decoder in the average
    "U-Net (TernausNet-style), EMA 0.9": dict(arch="unet", encoder="{cls}", ema=0.9),
    "U-Net (TernausNet-style), SWA": dict(arch="unet", encoder="{cls}", swa_start=-1),
}


def grid_runs(thesis: bool = True, lecture=tuple(LECTURE_RUNS)) -> dict:
    """The runs of notebook 05 by name: the thesis's 3 architectures x 3 losses, then the named
    lecture runs (all with 0.7 BCE - Dice unless they say otherwise)."""
    runs = {}
    if thesis:
        for a, arch in THESIS_ARCHS.items():
            for lname, loss in THESIS_LOSSES.items():
                runs[f"{a} {lname}"] = {**arch, "loss": loss}
    for name in lecture:
        if name not in LECTURE_RUNS:
            raise KeyError(f"unknown lecture run {name!r}; choose from {list(LECTURE_RUNS)}")
        runs[name] = {"loss": "bce_dice", **LECTURE_RUNS[name]}
    return runs


def grid_context(ctx: Context) -> Context:
    """The context of notebook 05: the grid's input size and epochs (``grid_size``,
    ``grid_epochs``), trained on defective images only as in the thesis."""
    import dataclasses

    p = ctx.profile
    prof = dataclasses.replace(p, seg_size=p.grid_size or p.seg_size,
                               seg_epochs=p.grid_epochs or p.seg_epochs, seg_defective_only=True,
                               seg_max_train=p.grid_max_train or p.seg_max_train)
    return dataclasses.replace(ctx, profile=prof)


def grid_stage(ctx: Context, runs: dict, classifier: dict, threshold: float = 0.5,
               progress: bool = True) -> dict:
    """Train (or reuse) every run of ``runs`` (see :func:`grid_runs`) on the true masks of the
    defective training images, score each on the defective held-out images at ``threshold``
    (the thesis's protocol: it removed clean images), at the networks' input size (these rows
    are compared with each other only), and return the table like the thesis's
    Table 4 plus per-run reports and trained models."""
    import dataclasses

    import pandas as pd
    from tqdm import tqdm

    from . import paper
    from .postprocess import Params, report
    from .segment import SegConfig

    gctx = grid_context(ctx)
    p = gctx.profile
    own = "tu-" + classifier["config"].encoder
    enc = p.grid_encoder or own
    fill = {"{cls}": own, "{enc}": enc, "{enc_timm}": enc.removeprefix("tu-")}
    names = ctx.index.class_names
    targets = true_targets(gctx)
    rows, reports, trained, truth = [], {}, {}, {}
    for name, spec in tqdm(runs.items(), desc="grid", disable=not progress):
        spec = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in spec.items()}
        # networks with the classifier's encoder start from it; the rest from ImageNet weights
        # where the profile has them (``pretrained``), else from random weights
        init = ("classifier" if spec["arch"] != "thesis_unet" and
                spec.get("encoder") in (own, own.removeprefix("tu-")) else None)
        if spec.get("swa_start") == -1:  # average the second half of the epochs
            spec["swa_start"] = p.seg_epochs // 2
        cfg = dataclasses.replace(SegConfig.from_profile(p, **spec), encoder_init=init)
        tr = train_segmenters(gctx, targets, cfg, classifier=classifier, progress=False)
        st = seg_stats(gctx, tr, thresholds=(threshold,), defective_only=True, truth=truth,
                       score_size=seg_size(p))
        rep = report(st, np.ones_like(st.true_area, float), Params(0.0, threshold, 0), names)
        s = rep.summary()
        lost = [c for c in names if s[f"class {c} (non-empty masks)"] < 0.05]
        ref = paper.TABLE4.get(name)
        row = {"model": name, "arch": cfg.arch, "encoder": "-" if cfg.arch == "thesis_unet"
               else cfg.encoder, "loss": cfg.loss, "Dice (all)": s["dice_defective_images"]}
        row.update({f"Dice class {c}": s[f"class {c} (defective images)"] for c in names})
        row["Dice (non-empty masks)"] = s["dice_nonempty_masks"]
        row.update({f"non-empty class {c}": s[f"class {c} (non-empty masks)"] for c in names})
        row["lost classes"] = ", ".join(lost) or "-"
        row["thesis Dice (all)"] = ref["all"] if ref else None
        row["thesis Dice (non-empty)"] = ref["full"] if ref else None
        row["thesis lost classes"] = (ref["lost"] or "-") if ref else None
        row["train s (this session)"] = round(tr["seconds"], 1)
        rows.append(row)
        reports[name], trained[name] = rep, tr
    return {"table": pd.DataFrame(rows), "reports": reports, "trained": trained, "context": gctx}


def tuned_params(ctx: Context, cls_result: dict, cache, progress: bool = False) -> dict:
    """The CAM stage's tuned post-processing (``{"global", "per class"}`` :class:`Params`) of the
    best CAM variant: read from notebook 03's export (``predictions/<run>/postprocess_params.json``)
    or searched again (and saved there) when that is missing."""
    from .postprocess import Params, search
    from .utils import read_json, write_json

    path = ctx.artifacts / "predictions" / Path(cls_result["dir"]).name / "postprocess_params.json"
    saved = read_json(path) if path.is_file() else {}
    if BEST_VARIANT in saved and "per class" in saved:
        return {"global": Params(**saved[BEST_VARIANT]), "per class": Params(**saved["per class"])}
    st = stats_from_cache(ctx, cache, np.arange(len(ctx.index)), THRESHOLDS, VARIANTS[BEST_VARIANT][1],
                          progress=progress)
    out = {"global": search(st, cls_result["oof"], CONFIDENCES, min_areas(ctx))[0],
           "per class": search(st, cls_result["oof"], CONFIDENCES, min_areas(ctx), per_class=True)[0]}
    write_json(path, {**saved, BEST_VARIANT: vars(out["global"]), "per class": vars(out["per class"])})
    return out


def segmentation_stage(ctx: Context, cls_result: dict, cache, high: float = 0.6, low: float = 0.2,
                       progress: bool = True) -> dict:
    """Table 3: the same segmentation network (the profile's ``seg_*``) trained on the true masks,
    on CAM masks (the paper's threshold 0.2; our tuned per-class post-processing) and on
    confident CAM pixels only, each scored on its held-out folds exactly as the CAM masks
    (:func:`seg_stats`), without and with the classifier's gate (a class's mask is kept only where
    the out-of-fold probability reaches the tuned confidence); the raw CAM masks of the same
    images beside them, and the ratio of each to the supervised network (gated, as the CAM masks
    are; the paper's ratio is to its ungated U-Net)."""
    import pandas as pd

    from . import paper
    from .postprocess import Params, report

    names = ctx.index.class_names
    probs = cls_result["oof"]
    aug = VARIANTS[BEST_VARIANT][1]
    tuned = tuned_params(ctx, cls_result, cache)
    pc = tuned["per class"]
    h, w = ctx.profile.image_size
    _, thr, mina = pc.per_class(len(names))
    sets = {
        "true masks": true_targets(ctx),
        "CAM masks (threshold 0.2)": cam_targets(ctx, cache, SEG_THRESHOLD, 0.0, aug, "cam_paper"),
        "CAM masks (tuned per class)": cam_targets(ctx, cache, thr, mina / (h * w), aug, "cam_tuned"),
        "confident CAM pixels": confident_targets(ctx, cache, high, low, aug),
    }
    trained = {k: train_segmenters(ctx, t, classifier=cls_result, progress=progress)
               for k, t in sets.items()}
    rows_eval = eval_rows(ctx)
    used = sorted({paper.PAPER_POSTPROCESS["threshold"], *map(float, thr)})  # the thresholds scored
    cam_st = stats_from_cache(ctx, cache, rows_eval, used, aug)
    truth = {}
    stats = {k: seg_stats(ctx, tr, truth=truth) for k, tr in trained.items()}
    gate = Params(pc.confidence, SEG_THRESHOLD, 0)
    plain = Params(0.0, SEG_THRESHOLD, 0)
    reports = {"CAM masks, the paper's parameters": report(
        cam_st, probs[cam_st.rows], Params(**paper.PAPER_POSTPROCESS), names),
        "CAM masks, tuned per class": report(cam_st, probs[cam_st.rows], pc, names)}
    for k, st in stats.items():
        reports[f"network on {k}"] = report(st, probs[st.rows], plain, names)
        reports[f"network on {k} + classifier gate"] = report(st, probs[st.rows], gate, names)
    ref = {"CAM masks, the paper's parameters": paper.TABLE3["CAM masks (Grad-CAM++ + improvements)"],
           "network on true masks": paper.TABLE3["U-Net on true masks (threshold 0.2, min_seg_len 0)"],
           "network on CAM masks (threshold 0.2)":
               paper.TABLE3["U-Net on CAM masks (threshold 0.2, min_seg_len 0)"]}
    # the reference: the supervised network as it is best used, with the same gate as the CAM masks
    sup = reports["network on true masks + classifier gate"].summary()
    cfg = next(iter(trained.values()))["config"]
    rows = []
    for k, rep in reports.items():
        s = rep.summary()
        rows.append({"experiment": k, "Dice (defective images)": s["dice_defective_images"],
                     "Dice (all images)": s["dice_all_images"],
                     "Dice (non-empty masks)": s["dice_nonempty_masks"],
                     "ratio to supervised (defective)": s["dice_defective_images"] /
                     sup["dice_defective_images"],
                     "ratio to supervised (non-empty)": s["dice_nonempty_masks"] /
                     sup["dice_nonempty_masks"] if sup["dice_nonempty_masks"] else float("nan"),
                     "paper Dice": ref.get(k),
                     "paper ratio": ref[k] / ref["network on true masks"] if k in ref else None})
    per_class = pd.DataFrame([{"experiment": k, **{f"class {c}": rep.summary()[
        f"class {c} (non-empty masks)"] for c in names}} for k, rep in reports.items()])
    return {"table": pd.DataFrame(rows), "per_class": per_class, "reports": reports,
            "trained": trained, "targets": sets, "stats": stats, "cam_stats": cam_st,
            "params": tuned, "config": cfg, "rows": rows_eval}
