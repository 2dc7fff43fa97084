"""The experiments behind the paper's tables, built from the stages of :mod:`pipeline`.

* Table 2 (:func:`postprocessing_stage`): every CAM variant with tuned post-processing, the
  paper's parameters, other CAM methods and two baselines.
* Table 3 (:func:`segmentation_stage`): one segmentation network trained on true masks, on CAM
  masks and on confident CAM pixels, beside the CAM masks themselves.
* Table 4 (:func:`grid_stage`): the thesis's architectures x losses and the lecture's toolbox.
* Beyond the paper (:func:`refinement_stage`): the label-only refinement techniques, a network
  self-trained on the best, and a supervised network of the same budget.

Each returns a small dataclass holding its table and what the notebook draws from.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import distributed, paper
from .cams import BEST_VARIANT, FAST_METHODS, VARIANTS, CamCache, compute_cams, fast_cams
from .classify import ClassifierRun
from .data import resize_image
from .device import to_model
from .metrics import DiceReport, dice_report
from .pipeline import Context, stats_from_cache
from .postprocess import (CONFIDENCES, THRESHOLDS, Params, Stats, apply, baseline_empty,
                          baseline_fill, collect_stats, min_area_grid, report, search,
                          write_predictions)
from .profiles import Profile
from .report import per_class_table  # noqa: F401  (notebook 03 calls it from here)
from .refine import GreyConfig, Refined, RefineConfig, RegionConfig, refine_stage
from .seg_stage import (SEG_THRESHOLD, SegRun, Targets, cam_targets,
                        confident_targets, eval_rows, predict_masks_at, refined_targets,
                        seg_folds, seg_stats, segmenter_dir, teacher_thresholds,
                        train_segmenter_sets, train_segmenters, true_targets)
from .segment import SegConfig
from .utils import ConfigError, bars, chunks, read_json, say, write_json

# ------------------------------------------------------------------------------------------------
# Table 2: masks from CAMs
# ------------------------------------------------------------------------------------------------

# The paper's Dice values cannot be the metric it states (an empty prediction alone scores 0.734
# on Severstal under it; notebook 03); they are closest to our Dice on non-empty masks, so the
# tables set them beside that column, under this name.
PAPER_DICE = "paper Dice (compare: non-empty masks)"
PAPER_RATIO = "paper ratio (compare: non-empty)"


def stats_from_method(ctx: Context, run: ClassifierRun, method: str, rows, thresholds,
                      weights: str = "averaged", batch: int = 16, progress: bool = False) -> Stats:
    """Statistics for a CAM method computed directly (e.g. through pytorch-grad-cam), no cache."""
    rows = np.asarray(rows)
    ds = ctx.images()
    models = ctx.fold_models(run, weights)
    rows = rows[np.argsort(ctx.folds[rows], kind="stable")]
    parts = list(chunks(rows, batch))

    fast = method in FAST_METHODS  # maps made and counted on the models' device

    def maps():
        for c in tqdm(parts, desc=method, disable=not bars(progress)):
            shape = (len(c), ctx.index.num_classes, *ctx.profile.image_size)
            out = torch.empty(shape, device=ctx.device) if fast else np.empty(shape, np.float32)
            for f in np.unique(ctx.folds[c]):
                sel = np.flatnonzero(ctx.folds[c] == f)
                model = models[int(f)]
                x = to_model(ds.uint8_batch(c[sel]), model)
                if fast:
                    out[torch.from_numpy(sel).to(ctx.device)] = fast_cams(model, x, method)
                else:
                    out[sel] = compute_cams(model, x, method=method)
            yield out

    return collect_stats(maps(), (ctx.true_masks(c) for c in parts), thresholds, rows=rows)


@dataclass
class PostprocessingResult:
    """Table 2 and what its pictures need: statistics and reports per variant, tuned
    parameters (``params["per class"]`` is the best variant's per-class search), probabilities."""

    table: pd.DataFrame
    stats: dict[str, Stats]
    params: dict[str, Params]
    reports: dict[str, DiceReport]
    probs: np.ndarray


def postprocessing_stage(ctx: Context, run: ClassifierRun, caches: dict[str, CamCache],
                         other_methods=("layercam",), progress: bool = True) -> PostprocessingResult:
    """Table 2: every CAM variant with tuned post-processing, the paper's parameters, the other
    grad-cam methods, and two baselines, scored with the paper's protocol (defective images) and
    on all images and non-empty masks."""
    probs = run.oof
    names = ctx.index.class_names
    all_rows = np.arange(len(ctx.index))
    mins = min_area_grid(ctx.profile.image_size)
    stats = {name: stats_from_cache(ctx, caches[name], all_rows, THRESHOLDS, VARIANTS[name][1],
                                    progress=progress) for name in caches}
    rows, tuned, reports = [], {}, {}

    def add(name, rep, params, paper_value=None, note="", all_images=True):
        s = rep.summary()
        rows.append({"experiment": name, "post-processing": params, "Dice (defective images)":
                     s["dice_defective_images"], "Dice (all images)":
                     s["dice_all_images"] if all_images else float("nan"),
                     "Dice (non-empty masks)": s["dice_nonempty_masks"],
                     PAPER_DICE: paper_value, "note": note})

    st0 = next(iter(stats.values()))
    add("baseline: no mask anywhere", baseline_empty(st0, names), "-")
    fill_scores = {c: baseline_fill(st0, probs, c, names).summary()["dice_defective_images"]
                   for c in CONFIDENCES}
    best_c = max(fill_scores, key=fill_scores.get)
    add("baseline: whole image where the classifier fires", baseline_fill(st0, probs, best_c, names),
        f"confidence={best_c:g} (tuned)")
    for name, st in stats.items():
        params, _ = search(st, probs, CONFIDENCES, mins)
        tuned[name] = params
        reports[name] = report(st, probs, params, names)
        add(f"{name} + {run.config.encoder}", reports[name], params.describe() + " (tuned)",
            paper.TABLE2.get(name))
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
    defective = np.flatnonzero(ctx.index.labels.any(1))
    for m in other_methods:
        fast = m in FAST_METHODS  # cheap: every image; else pytorch-grad-cam on defective images
        st = stats_from_method(ctx, run, m, all_rows if fast else defective, THRESHOLDS,
                               progress=progress)
        params, _ = search(st, probs[st.rows], CONFIDENCES, mins, rows=np.arange(len(st.rows)))
        add(f"{m} ({'fast path, equal to ' if fast else 'through '}pytorch-grad-cam) + "
            f"{run.config.encoder}", report(st, probs[st.rows], params, names),
            params.describe() + " (tuned)", all_images=fast,
            note="SWA weights, no aug smoothing" + ("" if fast else ", defective images only"))
    return PostprocessingResult(pd.DataFrame(rows), stats, tuned, reports, probs)


def _params_path(ctx: Context, run: ClassifierRun) -> Path:
    return ctx.artifacts / "predictions" / Path(run.dir).name / "postprocess_params.json"


def export_predictions(ctx: Context, run: ClassifierRun, post: PostprocessingResult,
                       cache: CamCache) -> Path:
    """Write the best variant's masks with its per-class parameters (Kaggle RLE CSV and PNGs
    under ``artifacts/<profile>/predictions/<classifier run>/``) and every tuned parameter set
    (``postprocess_params.json``, which :func:`tuned_params` reads). Returns the CSV path."""
    params = post.params["per class"]
    aug = VARIANTS[BEST_VARIANT][1]
    out = _params_path(ctx, run).parent
    parts = np.array_split(np.arange(len(ctx.index)), max(1, len(ctx.index) // 64))
    batches = ((c, apply(cache.maps(c, ctx.profile.image_size, aug_smooth=aug), run.oof[c], params))
               for c in parts)
    csv = write_predictions(ctx.index, batches, out)
    write_json(_params_path(ctx, run), {k: vars(v) for k, v in post.params.items()})
    return csv


def tuned_params(ctx: Context, run: ClassifierRun, cache: CamCache,
                 progress: bool = False) -> dict[str, Params]:
    """The CAM stage's tuned post-processing (``{"global", "per class"}``) of the best CAM
    variant: read from :func:`export_predictions`' file, or searched again (and saved) when that
    is missing."""
    path = _params_path(ctx, run)
    saved = read_json(path) if path.is_file() else {}
    if BEST_VARIANT in saved and "per class" in saved:
        return {"global": Params(**saved[BEST_VARIANT]), "per class": Params(**saved["per class"])}
    st = stats_from_cache(ctx, cache, np.arange(len(ctx.index)), THRESHOLDS,
                          VARIANTS[BEST_VARIANT][1], progress=progress)
    out = {"global": search(st, run.oof, CONFIDENCES, min_area_grid(ctx.profile.image_size))[0],
           "per class": search(st, run.oof, CONFIDENCES, min_area_grid(ctx.profile.image_size), per_class=True)[0]}
    write_json(path, {**saved, BEST_VARIANT: vars(out["global"]), "per class": vars(out["per class"])})
    return out


# ------------------------------------------------------------------------------------------------
# Table 3: segmentation networks on true vs CAM masks
# ------------------------------------------------------------------------------------------------

# the training sets of Table 3 (the row "network on <set>" and "network on <set> + classifier gate")
TRUE_MASKS = "true masks"
CAM_MASKS_PAPER = "CAM masks (threshold 0.2)"
CAM_MASKS_TUNED = "CAM masks (tuned per class)"
CONFIDENT_PIXELS = "confident CAM pixels"
# rows of the raw CAM masks
CAM_PAPER_ROW = "CAM masks, the paper's parameters"
CAM_TUNED_ROW = "CAM masks, tuned per class"


def network_row(training_set: str, gate: bool = False) -> str:
    """The Table 3 row of a network trained on ``training_set``, with or without the gate."""
    return f"network on {training_set}" + (" + classifier gate" if gate else "")


SUPERVISED_ROW = network_row(TRUE_MASKS, gate=True)  # the reference of every ratio


@dataclass
class SegmentationResult:
    """Table 3, its per-class table, and what the pictures need."""

    table: pd.DataFrame
    per_class: pd.DataFrame
    reports: dict[str, DiceReport]
    trained: dict[str, SegRun]
    targets: dict[str, Targets]
    stats: dict[str, Stats]
    cam_stats: Stats
    params: dict[str, Params]
    config: SegConfig
    rows: np.ndarray

    def gate(self) -> Params:
        """The post-processing of the gated network rows: the tuned per-class confidence on the
        classifier's probability, the paper's output threshold, no minimum area."""
        return Params(self.params["per class"].confidence, SEG_THRESHOLD, 0)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def segmentation_sets(ctx: Context, run: ClassifierRun, cache: CamCache, high: float = 0.6,
                      low: float = 0.2, tuned: dict[str, Params] | None = None
                      ) -> dict[str, Targets]:
    """Table 3's training sets by name: the true masks, the CAM masks at the paper's threshold
    and with the tuned per-class post-processing (``tuned``, default :func:`tuned_params`),
    and the confident CAM pixels."""
    aug = VARIANTS[BEST_VARIANT][1]
    pc = (tuned or tuned_params(ctx, run, cache))["per class"]
    h, w = ctx.profile.image_size
    _, thr, mina = pc.per_class(ctx.index.num_classes)
    return {
        TRUE_MASKS: true_targets(ctx),
        CAM_MASKS_PAPER: cam_targets(ctx, cache, SEG_THRESHOLD, 0.0, aug, "cam_paper"),
        CAM_MASKS_TUNED: cam_targets(ctx, cache, thr, mina / (h * w), aug, "cam_tuned"),
        CONFIDENT_PIXELS: confident_targets(ctx, cache, high, low, aug),
    }


def segmentation_stage(ctx: Context, run: ClassifierRun, cache: CamCache, high: float = 0.6,
                       low: float = 0.2, progress: bool = True) -> SegmentationResult:
    """Table 3: the same segmentation network (the profile's ``segmentation``) trained on the
    true masks, on CAM masks (the paper's threshold 0.2; our tuned per-class post-processing)
    and on confident CAM pixels only, each scored on its held-out folds exactly as the CAM masks
    (:func:`seg_stage.seg_stats`), without and with the classifier's gate (a class's mask is
    kept only where the out-of-fold probability reaches the tuned confidence); the raw CAM masks
    of the same images beside them, and the ratio of each to the supervised network (gated, as
    the CAM masks are; the paper's ratio is to its ungated U-Net)."""
    names = ctx.index.class_names
    probs = run.oof
    aug = VARIANTS[BEST_VARIANT][1]
    tuned = tuned_params(ctx, run, cache)
    pc = tuned["per class"]
    _, thr, _ = pc.per_class(len(names))
    sets = segmentation_sets(ctx, run, cache, high, low, tuned)
    trained = {k: train_segmenters(ctx, t, classifier=run, progress=progress)
               for k, t in sets.items()}
    rows_eval = eval_rows(ctx)
    used = sorted({paper.PAPER_POSTPROCESS["threshold"], *map(float, thr)})  # the thresholds scored
    cam_st = stats_from_cache(ctx, cache, rows_eval, used, aug)
    truth: dict = {}
    stats = {k: seg_stats(ctx, tr, truth=truth) for k, tr in trained.items()}
    gate = Params(pc.confidence, SEG_THRESHOLD, 0)
    plain = Params(0.0, SEG_THRESHOLD, 0)
    reports = {CAM_PAPER_ROW: report(cam_st, probs[cam_st.rows],
                                     Params(**paper.PAPER_POSTPROCESS), names),
               CAM_TUNED_ROW: report(cam_st, probs[cam_st.rows], pc, names)}
    for k, st in stats.items():
        reports[network_row(k)] = report(st, probs[st.rows], plain, names)
        reports[network_row(k, gate=True)] = report(st, probs[st.rows], gate, names)
    # the paper's numbers on the rows they measure: its networks are compared as they are best
    # used, which for ours (trained on defective images only) is with the classifier's gate
    ref = {CAM_PAPER_ROW: paper.TABLE3["CAM masks (Grad-CAM++ + improvements)"],
           SUPERVISED_ROW: paper.TABLE3["U-Net on true masks (threshold 0.2, min_seg_len 0)"],
           network_row(CAM_MASKS_PAPER, gate=True):
               paper.TABLE3["U-Net on CAM masks (threshold 0.2, min_seg_len 0)"]}
    # the reference: the supervised network as it is best used, with the same gate as the CAM masks
    sup = reports[SUPERVISED_ROW].summary()
    rows = []
    for k, rep in reports.items():
        s = rep.summary()
        rows.append({"experiment": k, "Dice (defective images)": s["dice_defective_images"],
                     "Dice (all images)": s["dice_all_images"],
                     "Dice (non-empty masks)": s["dice_nonempty_masks"],
                     PAPER_DICE: ref.get(k),
                     "ratio to supervised (non-empty)": _ratio(s["dice_nonempty_masks"],
                                                               sup["dice_nonempty_masks"]),
                     PAPER_RATIO: ref[k] / ref[SUPERVISED_ROW] if k in ref else None,
                     "ratio to supervised (defective)": _ratio(s["dice_defective_images"],
                                                               sup["dice_defective_images"])})
    per_class = pd.DataFrame([{"experiment": k, **{f"class {c}": rep.summary()[
        f"class {c} (non-empty masks)"] for c in names}} for k, rep in reports.items()])
    cfg = next(iter(trained.values())).config
    return SegmentationResult(pd.DataFrame(rows), per_class, reports, trained, sets, stats, cam_st,
                              tuned, cfg, rows_eval)


def _example_per_class(ctx: Context, rows, pick) -> list[tuple[int, int]]:
    """``(class, row)``: for every class with an image among ``rows``, ``pick(class, rows whose
    label has it)``."""
    rows = np.asarray(rows)
    out = []
    for c in range(ctx.index.num_classes):
        cand = rows[ctx.index.labels[rows, c] > 0]
        if len(cand):
            out.append((c, int(pick(c, cand))))
    return out


def first_example_per_class(ctx: Context, rows) -> list[tuple[int, int]]:
    """``(class, row)``: for every class, the first of ``rows`` whose label has it."""
    return _example_per_class(ctx, rows, lambda c, cand: cand[0])


def segmentation_examples(ctx: Context, run: ClassifierRun, seg: SegmentationResult,
                          cache: CamCache) -> list[dict]:
    """One held-out image per class with its true masks, the tuned CAM masks and every gated
    network's masks at the scoring size: ``[{"row", "class", "image", "truth", "preds"}]``."""
    size = ctx.profile.image_size
    pc = seg.params["per class"]
    aug = VARIANTS[BEST_VARIANT][1]
    out = []
    for c, r in first_example_per_class(ctx, seg.rows):
        preds = {CAM_MASKS_TUNED: apply(cache.maps([r], size, aug_smooth=aug),
                                             run.oof[[r]], pc)[0]}
        preds.update({f"network on {k} (gated)": predict_masks_at(ctx, tr, [r], seg.gate(),
                                                                  run.oof[[r]])[0]
                      for k, tr in seg.trained.items()})
        out.append({"row": r, "class": ctx.index.class_names[c], "preds": preds,
                    "image": resize_image(ctx.index.image(r), size),
                    "truth": ctx.true_masks([r])[0]})
    return out


# ------------------------------------------------------------------------------------------------
# Table 4: the thesis's grid and the lecture's toolbox
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridRun:
    """One run of the grid. ``encoder``: ``"classifier"`` (the classifier's own timm encoder,
    started from the fold's classifier), ``"thesis"`` (the grid's ResNet, :class:`GridConfig`'s
    ``encoder``; where that is None, the classifier's again) or None (the thesis's plain U-Net
    has no encoder). ``swa_from``: average the weights of the epochs from this fraction of the
    run on (0.5: the second half)."""

    arch: str
    encoder: str | None = "classifier"
    loss: str = "bce_dice"
    ema: float | None = None
    swa_from: float | None = None


THESIS_ARCHS = {"U-Net": GridRun("thesis_unet", encoder=None),
                "U-Net with ResNet encoder": GridRun("unet", encoder="thesis"),
                "ResNet encoder-decoder": GridRun("resnet_encdec", encoder="thesis")}
THESIS_LOSSES = {"BCE": "bce_dice", "CCE": "cce_dice", "Focal loss": "focal"}
LECTURE_RUNS = {
    "FPN": GridRun("fpn"),
    "DeepLabV3+": GridRun("deeplabv3plus"),
    "U-Net++": GridRun("unetplusplus"),
    "U-Net (TernausNet-style)": GridRun("unet"),
    "U-Net (TernausNet-style), BCE - ln(Dice)": GridRun("unet", loss="bce_logdice"),
    "U-Net (TernausNet-style), Lovasz": GridRun("unet", loss="lovasz"),
    "U-Net (TernausNet-style), BCE + label smoothing": GridRun("unet", loss="bce_smooth"),
    # decay 0.9 (an average over the last ~10 steps): short CPU runs have only ~40 steps, where
    # 0.99 keeps two thirds of the random initial decoder in the average
    "U-Net (TernausNet-style), EMA 0.9": GridRun("unet", ema=0.9),
    "U-Net (TernausNet-style), SWA": GridRun("unet", swa_from=0.5),
}


# notebook 05's lecture runs (its parameters cell lists the same; a test keeps them equal): every
# one but the plain U-Net, which is the segmentation stage's own network
NOTEBOOK_LECTURE_RUNS = tuple(k for k in LECTURE_RUNS if k != "U-Net (TernausNet-style)")


def grid_runs(thesis: bool = True, lecture=tuple(LECTURE_RUNS)) -> dict[str, GridRun]:
    """The runs of notebook 05 by name: the thesis's 3 architectures x 3 losses, then the named
    lecture runs."""
    runs = {}
    if thesis:
        for a, arch in THESIS_ARCHS.items():
            for lname, loss in THESIS_LOSSES.items():
                runs[f"{a} {lname}"] = dataclasses.replace(arch, loss=loss)
    for name in lecture:
        if name not in LECTURE_RUNS:
            raise ConfigError(f"unknown lecture run {name!r}; choose from {list(LECTURE_RUNS)}")
        runs[name] = LECTURE_RUNS[name]
    return runs


def grid_profile(profile: Profile) -> Profile:
    """The profile whose segmentation stage is notebook 05's grid: the grid's input size, epochs,
    training images and held-out folds, trained on defective images only as in the thesis."""
    seg, g = profile.segmentation, profile.grid
    stage = dataclasses.replace(
        seg, size=g.size or seg.size, defective_only=True, max_train=g.max_train or seg.max_train,
        folds=seg.folds if g.folds is None else g.folds,
        net=dataclasses.replace(seg.net, epochs=g.epochs or seg.net.epochs))
    return dataclasses.replace(profile, segmentation=stage)


def grid_context(ctx: Context) -> Context:
    """The context of notebook 05 (:func:`grid_profile`)."""
    return dataclasses.replace(ctx, profile=grid_profile(ctx.profile))


def grid_config(gctx: Context, spec: GridRun, classifier: ClassifierRun) -> SegConfig:
    """The segmentation configuration of one grid run: encoders resolved (networks with the
    classifier's encoder start from it; the rest from ImageNet weights where the profile has
    them, else from random weights), SWA's first epoch from ``swa_from``."""
    net = gctx.profile.segmentation.net
    own = "tu-" + classifier.config.encoder
    thesis = gctx.profile.grid.encoder or own
    encoder = {"classifier": own, "thesis": thesis, None: net.encoder}[spec.encoder]
    if spec.arch == "resnet_encdec":
        encoder = encoder.removeprefix("tu-")  # the thesis's network takes a plain timm name
    init = ("classifier" if spec.arch != "thesis_unet" and
            encoder in (own, own.removeprefix("tu-")) else None)
    # a weights file belongs to one encoder: the grid's own for its ResNet, none for the rest
    weights = (gctx.profile.grid.weights_path
               if init is None and spec.arch != "thesis_unet" and spec.encoder == "thesis" else None)
    swa = None if spec.swa_from is None else int(net.epochs * spec.swa_from)
    return dataclasses.replace(net, arch=spec.arch, encoder=encoder, loss=spec.loss, ema=spec.ema,
                               swa_start=swa, encoder_init=init, weights_path=weights)


@dataclass
class GridResult:
    """Table 4, a report and trained networks per run, and the grid's context."""

    table: pd.DataFrame
    reports: dict[str, DiceReport]
    trained: dict[str, SegRun]
    context: Context


GRID_NO_MASK = "baseline: no mask anywhere"


def grid_stage(ctx: Context, runs: dict[str, GridRun], classifier: ClassifierRun,
               threshold: float = 0.5, progress: bool = True) -> GridResult:
    """Train (or reuse) every run of ``runs`` (see :func:`grid_runs`) on the true masks of the
    defective training images, score each on the defective held-out images at ``threshold``
    (the thesis's protocol: it removed clean images), at the networks' input size (these rows
    are compared with each other only), and return the table like the thesis's Table 4, headed by
    what drawing no mask scores on the same images (:data:`GRID_NO_MASK`)."""
    gctx = grid_context(ctx)
    names = ctx.index.class_names
    targets = true_targets(gctx)
    rows, reports, trained, truth = [], {}, {}, {}

    def add(name: str, rep: DiceReport, arch="-", encoder="-", loss="-", seconds=None):
        s = rep.summary()
        lost = [c for c in names if s[f"class {c} (non-empty masks)"] < 0.05]
        ref = paper.TABLE4.get(name)
        row = {"model": name, "arch": arch, "encoder": encoder, "loss": loss,
               "Dice (all)": s["dice_defective_images"],
               "thesis Dice (all)": ref["all"] if ref else None}
        row.update({f"Dice class {c}": s[f"class {c} (defective images)"] for c in names})
        row["Dice (non-empty masks)"] = s["dice_nonempty_masks"]
        row["thesis Dice (non-empty)"] = ref["full"] if ref else None
        row.update({f"non-empty class {c}": s[f"class {c} (non-empty masks)"] for c in names})
        row["lost classes"] = ", ".join(lost) or "-"
        row["thesis lost classes"] = (ref["lost"] or "-") if ref else None
        row["train s (this session)"] = seconds
        rows.append(row)
        reports[name] = rep

    st = None
    for name, spec in tqdm(runs.items(), desc="grid", disable=not bars(progress)):
        cfg = grid_config(gctx, spec, classifier)
        tr = train_segmenters(gctx, targets, cfg, classifier=classifier, progress=False)
        st = seg_stats(gctx, tr, thresholds=(threshold,), defective_only=True, truth=truth,
                       score_size=gctx.seg_size)
        add(name, report(st, np.ones_like(st.true_area, float), Params(0.0, threshold, 0), names),
            cfg.arch, "-" if cfg.arch == "thesis_unet" else cfg.encoder, cfg.loss,
            round(tr.seconds, 1))
        trained[name] = tr
    if st is not None:  # what drawing nothing scores on the same images: a run that equals it
        add(GRID_NO_MASK, baseline_empty(st, names))  # learnt nothing it shows
        rows.insert(0, rows.pop())
    return GridResult(pd.DataFrame(rows), reports, trained, gctx)


def grid_examples(ctx: Context, grid: GridResult, threshold: float = 0.5, n: int = 2) -> list[dict]:
    """Up to ``n`` held-out images (the first of each class) with every grid run's masks at the
    scoring size: ``[{"row", "image", "truth", "preds"}]``."""
    size = ctx.profile.image_size
    shown = list(dict.fromkeys(r for _, r in first_example_per_class(ctx, eval_rows(ctx))))[:n]
    ones = np.ones((1, ctx.index.num_classes))
    out = []
    for r in shown:
        preds = {name: predict_masks_at(grid.context, tr, [r], Params(0.0, threshold, 0), ones,
                                        size)[0] for name, tr in grid.trained.items()}
        out.append({"row": r, "image": resize_image(ctx.index.image(r), size),
                    "truth": ctx.true_masks([r])[0], "preds": preds})
    return out


def gallery_items(ctx: Context, run: ClassifierRun, cache: CamCache, rep: DiceReport,
                  params: Params) -> list[dict]:
    """For every class, the defective image with the median Dice under ``params``: the image,
    its true mask, CAM, post-processed mask, probability and Dice (for ``viz.plot_gallery``)."""
    size = ctx.profile.image_size
    aug = VARIANTS[BEST_VARIANT][1]
    items = []
    for c in range(ctx.index.num_classes):
        rows = np.flatnonzero(ctx.index.labels[:, c])
        if not len(rows):
            continue
        r = int(rows[np.argsort(rep.values[rows, c])[len(rows) // 2]])
        cam = cache.maps([r], size, aug_smooth=aug)[0]
        pred = apply(cam[None], run.oof[[r]], params)[0]
        items.append({"image": resize_image(ctx.index.image(r), size), "cls": c,
                      "image_id": ctx.index.image_ids[r], "truth": ctx.true_masks([r])[0, c],
                      "cam": cam[c], "pred": pred[c], "prob": run.oof[r, c],
                      "dice": rep.values[r, c]})
    return items


# ------------------------------------------------------------------------------------------------
# Beyond the paper: label-only refinement (notebook 06, benchmarks/real_quality.py)
# ------------------------------------------------------------------------------------------------

PAPER_TECHNIQUE = "CAM masks, the paper's post-processing (per-image scaled CAM > 0.3)"
DEFAULT_TECHNIQUE = ("the same, a class with a grey cue in its region measured from its "
                     "neighbourhood there (the default)")
# each row changes one thing against the paper's post-processing or against the default
TECHNIQUES = {
    PAPER_TECHNIQUE: RefineConfig(region="image", grey="off"),
    "absolute CAMs, cut at the negatives' median peak":
        RefineConfig(region="negatives", grey="off"),
    "Otsu threshold per image": RefineConfig(region="otsu", grey="off"),
    "PAR (10 iterations), then > 0.3":
        RefineConfig(region=RegionConfig("image", par_iterations=10), grey="off"),
    "grey-level departure > 1 robust sd inside the CAM > 0.3, either sign":
        RefineConfig(grey="either"),
    "the same, of each class's sign by a t-test of its images against the others'":
        RefineConfig(grey="labels"),
    "sign and sds of each class from where its departures concentrate, inside its CAM region":
        RefineConfig(grey=GreyConfig(whole_image=False, local_region=False)),
    "the same, or local departures anywhere in the image for a class its region misses":
        RefineConfig(grey=GreyConfig(local_region=False)),
    DEFAULT_TECHNIQUE: RefineConfig(),
    "the default inside the negatives-calibrated region": RefineConfig(region="negatives"),
}
NO_MASK = "no mask"
PAPER_MAPS = "the paper's masks: the last layer's Grad-CAM++, per-image scaled > 0.3"
DEFECT_FREE = "defect-free images with a mask"  # a column where the scored images hold some
SELF_TRAINED = ("U-Net self-trained on the default's masks, + classifier gate, threshold fitted "
                "to its teacher")
SELF_TRAINED_05 = "the same U-Net, output > 0.5"
SUPERVISED_NET = "supervised U-Net (true masks), same encoder and budget"
SUPERVISED_GATED = "supervised U-Net + the same classifier gate (the reference)"
SUPERVISED_GATED_05 = "the same supervised U-Net, output > 0.5"
U_NETS = "the self-trained and the supervised U-Net, trained"  # a key of the stage's seconds


@dataclass
class RefinementResult:
    """The techniques' and networks' Dice on the held-out rows, the gap to the supervised network
    each closes, and what the pictures need."""

    table: pd.DataFrame
    reports: dict[str, DiceReport]
    refined: Refined
    nets: dict[str, SegRun]
    rows: np.ndarray
    seconds: dict[str, float]  # each technique's, the two networks' training, each one's scoring
    net_gate: Params  # the self-trained network's post-processing (thresholds fitted to the teacher)
    techniques: dict[str, Refined] = dataclasses.field(default_factory=dict)  # calibrated, by row


def refinement_stage(ctx: Context, run: ClassifierRun, cache: CamCache,
                     techniques: dict[str, RefineConfig] | None = None,
                     progress: bool = True, paper_maps: CamCache | None = None
                     ) -> RefinementResult:
    """Every technique of :mod:`refine` on the held-out rows of the segmentation stage
    (:func:`seg_stage.eval_rows`), label-only, scored at the segmentation input size; a U-Net
    self-trained on the default combination's masks (:func:`seg_stage.refined_targets`), gated
    by the classifier; and the same U-Net trained on the true masks, as it is and with the same
    gate (the reference: every label-only row is gated too), its output cut at the paper's 0.2 as
    in Table 3 (and at 0.5 in a row of its own: a network of a few epochs can sit just under 0.5
    and find nothing there). "gap closed" = (Dice - no mask) / (reference - no mask), on
    defective images. ``cache`` may be the refined method's maps (:class:`fusion.
    FusedMaps`); ``paper_maps``: then the last layer's, scored first with the paper's
    post-processing (:data:`PAPER_MAPS`)."""
    techniques = TECHNIQUES if techniques is None else techniques
    rows, size, probs = eval_rows(ctx), ctx.seg_size, run.oof
    reports: dict[str, DiceReport] = {}
    seconds: dict[str, float] = {}
    true = ctx.true_masks(rows, size)
    reports[NO_MASK] = dice_report(np.zeros_like(true), true, ctx.index.class_names)
    if paper_maps is not None:
        reports[PAPER_MAPS] = refine_stage(ctx, paper_maps, TECHNIQUES[PAPER_TECHNIQUE]).score(
            rows, probs)
    default, calibrated = None, {}
    for name, cfg in techniques.items():
        t = time.perf_counter()
        ref = calibrated[name] = refine_stage(ctx, cache, cfg)
        reports[name] = ref.score(rows, probs)
        seconds[name] = time.perf_counter() - t
        say(progress, f"refinement: {name}: {seconds[name]:.0f} s")
        if cfg == RefineConfig():
            default = ref
    default = default or refine_stage(ctx, cache, RefineConfig())
    targets = {SELF_TRAINED: refined_targets(ctx, default), SUPERVISED_NET: true_targets(ctx)}
    conf = default.config.confidence
    t = time.perf_counter()  # trained together: side by side where the profile asks for it
    nets = dict(zip(targets, train_segmenter_sets([(ctx, tg, None) for tg in targets.values()],
                                                  run, progress)))
    seconds[U_NETS] = time.perf_counter() - t
    say(progress, f"refinement: {U_NETS}: {seconds[U_NETS]:.0f} s")
    for name in targets:
        t = time.perf_counter()
        if name == SELF_TRAINED:
            net_gate = Params(conf, teacher_thresholds(ctx, nets[name], default).tolist(), 0)
            st = seg_stats(ctx, nets[name], thresholds=sorted({0.5, *net_gate.threshold}),
                           score_size=size)
            reports[name] = report(st, probs[st.rows], net_gate, ctx.index.class_names)
            reports[SELF_TRAINED_05] = report(st, probs[st.rows], Params(conf, 0.5, 0),
                                              ctx.index.class_names)
        else:
            st = seg_stats(ctx, nets[name], thresholds=(SEG_THRESHOLD, 0.5), score_size=size)
            for row, params in ((name, Params(0.0, SEG_THRESHOLD, 0)),
                                (SUPERVISED_GATED, Params(conf, SEG_THRESHOLD, 0)),
                                (SUPERVISED_GATED_05, Params(conf, 0.5, 0))):
                reports[row] = report(st, probs[st.rows], params, ctx.index.class_names)
        seconds[f"{name}, scored"] = time.perf_counter() - t
        say(progress, f"refinement: {name}, scored: {seconds[f'{name}, scored']:.0f} s")
    return RefinementResult(refinement_table(reports, ctx.index.class_names), reports, default,
                            nets, rows, seconds, net_gate, calibrated)


def refinement_table(reports: dict[str, DiceReport], class_names) -> pd.DataFrame:
    """One row per report: Dice on defective images, the share of the no-mask -> reference gap
    closed, Dice on non-empty masks and its share of the reference's (the gated supervised
    network), per class too."""
    sup = reports[SUPERVISED_GATED].summary()
    empty = reports[NO_MASK].summary()["dice_defective_images"]
    gap = sup["dice_defective_images"] - empty
    table = []
    for name, rep in reports.items():
        s = rep.summary()
        table.append({
            "masks": name, "Dice (defective images)": s["dice_defective_images"],
            "gap closed": _ratio(s["dice_defective_images"] - empty, gap),
            "Dice (non-empty masks)": s["dice_nonempty_masks"],
            "non-empty, share of supervised": _ratio(s["dice_nonempty_masks"],
                                                     sup["dice_nonempty_masks"]),
            **{f"{c}, share of supervised": _ratio(s[f"class {c} (non-empty masks)"],
                                                   sup[f"class {c} (non-empty masks)"])
               for c in class_names},
            DEFECT_FREE: rep.defect_free_with_mask()})
    out = pd.DataFrame(table)
    return out if out[DEFECT_FREE].notna().any() else out.drop(columns=DEFECT_FREE)


def refinement_markdown_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`refinement_table` for reading: Dice to 3 decimals, shares as percentages."""
    out = table.copy()
    for col in out.columns[1:]:
        pct = "share" in col or "gap" in col or col == DEFECT_FREE
        out[col] = [f"{v + 0.0:.0%}" if pct else f"{v:.3f}" for v in out[col]]  # no "-0%"
    return out


@dataclass
class CommittedTable:
    """A refinement table another command made and committed (``benchmarks/real_quality.py`` on
    real data this repository does not hold): the table, its header and provenance line."""

    table: pd.DataFrame
    header: str
    provenance: str


def committed_real_table(folder: str | Path) -> CommittedTable | None:
    """The table ``benchmarks/real_quality.py`` wrote to ``folder`` (its ``real_quality.csv``,
    the first paragraph and the provenance line of its ``real_quality.md``), or None where there
    is none: read, never recomputed, so a notebook can set it beside its own table."""
    folder = Path(folder)
    csv, md = folder / "real_quality.csv", folder / "real_quality.md"
    if not (csv.is_file() and md.is_file()):
        return None
    paragraphs = [p.strip() for p in md.read_text().split("\n\n") if p.strip()]
    header = next((p for p in paragraphs if not p.startswith(("#", "|"))), "")
    return CommittedTable(pd.read_csv(csv), header, paragraphs[-1])


def _example(ctx: Context, run: ClassifierRun, res: RefinementResult, row: int,
             sources: dict) -> dict:
    """One image at the segmentation size with, per label of ``sources``, the masks of a
    calibrated :class:`Refined` or of the self-trained network (:data:`SELF_TRAINED`, gated):
    ``{"image", "truth", "preds"}``."""
    size, preds = ctx.seg_size, {}
    for label, src in sources.items():
        preds[label] = (predict_masks_at(ctx, res.nets[SELF_TRAINED], [row], res.net_gate,
                                         run.oof[[row]], size)[0] if src == SELF_TRAINED
                        else next(src.batches([row], run.oof))[2][0])
    return {"image": resize_image(ctx.index.image(row), size),
            "truth": ctx.true_masks([row], size)[0], "preds": preds}


def median_example_per_class(ctx: Context, rows) -> list[tuple[int, int]]:
    """``(class, row)``: for every class, the one of ``rows`` whose true mask of the class has the
    median area among those that hold it (a typical defect for a picture, not the first)."""
    def median(c, cand):
        area = np.array([ctx.index.mask_area(int(r), c) for r in cand])
        return cand[np.argsort(area, kind="stable")[len(cand) // 2]]
    return _example_per_class(ctx, rows, median)


def refinement_examples(ctx: Context, run: ClassifierRun, res: RefinementResult,
                        cache: CamCache, picks: list[tuple[int, int]] | None = None
                        ) -> list[dict]:
    """One held-out image per class (``picks``: ``(class, row)`` pairs; default the first of
    each class): the image, its true masks, the paper's CAM masks, the default refinement's
    masks and the self-trained network's (gated), at the segmentation size:
    ``[{"row", "class", "image", "truth", "preds"}]``."""
    paper_ref = (res.techniques.get(PAPER_TECHNIQUE)
                 or refine_stage(ctx, cache, TECHNIQUES[PAPER_TECHNIQUE]))
    sources = {"CAM masks (the paper's)": paper_ref, "refined (the default)": res.refined,
               "self-trained U-Net": SELF_TRAINED}
    return [{"row": r, "class": ctx.index.class_names[c], **_example(ctx, run, res, r, sources)}
            for c, r in (picks or first_example_per_class(ctx, res.rows))]


def lesson_row(ctx: Context, res: RefinementResult) -> tuple[int, int]:
    """``(class, row)``: the held-out image notebook 06 shows every technique on: the first one
    of the class most held-out images have."""
    counts = ctx.index.labels[res.rows].sum(0)
    c = int(np.argmax(counts))
    return c, int(res.rows[ctx.index.labels[res.rows, c] > 0][0])


def technique_example(ctx: Context, run: ClassifierRun, res: RefinementResult, row: int,
                      names: list[str]) -> dict:
    """One image at the segmentation size with the masks of each technique in ``names`` (rows
    of Table 5 computed by :func:`refinement_stage`, or :data:`SELF_TRAINED`):
    ``{"image", "truth", "preds"}``."""
    return _example(ctx, run, res, row, {n: n if n == SELF_TRAINED else res.techniques[n]
                                         for n in names})


# ------------------------------------------------------------------------------------------------
# Every segmentation network of notebooks 04-06, for training ahead of them (several ranks)
# ------------------------------------------------------------------------------------------------

NETWORK_STAGES = ("segmentation", "grid")


@dataclass
class NetworkJob:
    """One set-up of segmentation networks (one per held-out fold) that a notebook trains: its
    name, context (the grid's has its own size, epochs and training images), targets and
    configuration (None: the profile's)."""

    name: str
    ctx: Context
    targets: Targets
    cfg: SegConfig | None = None


def network_jobs(ctx: Context, run: ClassifierRun, cache: CamCache,
                 stages=NETWORK_STAGES) -> list[NetworkJob]:
    """The networks that notebooks 04 and 06 (``"segmentation"``: Table 3's training sets, the
    self-trained and the supervised network of Table 5) and 05 (``"grid"``: Table 4's runs, with
    the notebook's default runs) train with their default parameters, each set-up once."""
    bad = sorted(set(stages) - set(NETWORK_STAGES))
    if bad:
        raise ConfigError(f"unknown network stage(s) {bad}; choose from {list(NETWORK_STAGES)}")
    jobs = []
    if "segmentation" in stages:
        jobs += [NetworkJob(k, ctx, t) for k, t in segmentation_sets(ctx, run, cache).items()]
        jobs.append(NetworkJob(SELF_TRAINED, ctx, refined_targets(ctx, refine_stage(ctx, cache))))
    if "grid" in stages:
        gctx = grid_context(ctx)
        targets = true_targets(gctx)
        jobs += [NetworkJob(name, gctx, targets, grid_config(gctx, spec, run))
                 for name, spec in grid_runs(True, NOTEBOOK_LECTURE_RUNS).items()]
    seen, out = set(), []
    for job in jobs:  # Table 5's supervised network is Table 3's: trained once
        d = segmenter_dir(job.ctx, job.targets, job.cfg, run)
        if d not in seen:
            seen.add(d)
            out.append(job)
    return out


def train_networks(jobs: list[NetworkJob], run: ClassifierRun, progress: bool = True) -> int:
    """Train (or reuse) every job's networks, one (job, held-out fold) pair at a time; under
    torchrun this rank takes every G-th pair (:func:`distributed.my_share`), so G ranks train
    them between them, each network exactly as a single process would (each is seeded by its
    fold; the caller waits for the others). Returns the number of pairs this rank did."""
    units = [(job, k) for job in jobs for k in seg_folds(job.ctx)]
    mine = distributed.my_share(units)
    for i, (job, k) in enumerate(mine):
        t = time.perf_counter()
        tr = train_segmenters(job.ctx, job.targets, job.cfg, classifier=run, progress=progress,
                              only_folds=[k])
        say(progress, f"segmentation networks: {i + 1}/{len(mine)} on rank {distributed.rank()}: "
                      f"{job.name}, fold {k} ({tr.dir.name}, {time.perf_counter() - t:.0f} s)")
    return len(mine)
