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


def true_masks(ctx: Context, rows) -> "np.ndarray":
    """True masks ``[len(rows), C, H, W]`` at the profile's input size (the scoring resolution)."""
    from .data import resize_mask

    size = ctx.profile.image_size
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
    models = fold_models(cls_result, ctx.index.num_classes, weights)
    order = np.argsort(ctx.folds[rows], kind="stable")
    rows = rows[order]
    chunks = [rows[s:s + batch] for s in range(0, len(rows), batch)]

    def maps():
        for c in tqdm(chunks, desc=method, disable=not progress):
            out = np.empty((len(c), ctx.index.num_classes, *ctx.profile.image_size), np.float32)
            for f in np.unique(ctx.folds[c]):
                sel = np.flatnonzero(ctx.folds[c] == f)
                x = torch.stack([ds[int(r)]["image"] for r in c[sel]])
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
    defective = np.flatnonzero(ctx.index.labels.any(1))
    for m in other_methods:
        st = stats_from_method(ctx, cls_result, m, defective, THRESHOLDS, progress=progress)
        params, _ = search(st, probs[st.rows], CONFIDENCES, mins, rows=np.arange(len(st.rows)))
        add(f"{m} (pytorch-grad-cam) + {cls_result['config'].encoder}",
            report(st, probs[st.rows], params, names), params.describe() + " (tuned)",
            note="SWA weights, no aug smoothing, defective images only", all_images=False)
    table = pd.DataFrame(rows)
    return {"table": table, "stats": stats, "params": tuned, "reports": reports, "probs": probs}


def per_class_table(rep, class_names):
    import pandas as pd

    s = rep.summary()
    return pd.DataFrame([{"class": c, "Dice (defective images)": s[f"class {c} (defective images)"],
                          "Dice (non-empty masks)": s[f"class {c} (non-empty masks)"],
                          "non-empty masks": int(rep.true_nonempty[:, k].sum())}
                         for k, c in enumerate(class_names)])
