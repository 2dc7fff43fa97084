"""``cam2mask masks``: image-level labels in, segmentation masks out, for anyone's data.

Given a dataset folder (generic ``images/`` + ``labels.csv`` [+ ``masks/``], or Severstal format):

1. train the classifier with cross-validation on the image labels (the profile's recipe), or, with
   ``model``, load a finished classifier run (its fold models are used as an ensemble: the
   probabilities and the CAMs are the means over the folds' models, no training, and the labels
   of the data are then only needed for tuning and scoring);
2. compute out-of-fold Grad-CAM++ maps (averaged weights, aug smoothing) for every image;
3. choose the post-processing: tuned per class on the data when true masks exist, otherwise the
   paper's defaults (confidence 0.5, threshold 0.3, no minimum area), and say which;
4. write, at each image's own size: ``masks/<class>/<image>.png`` for every (image, class)
   (255 = defect, an all-black PNG = no mask), ``masks.csv`` (Kaggle RLE, non-empty masks),
   ``previews/`` (overlays of the first 100 images), ``params.json`` and, with true masks, ``dice_report.{md,csv}``.

Work (folds, checkpoints, CAMs) lives in ``OUT/work`` so an interrupted run resumes. An existing
``OUT`` made by another command or with other settings is refused unless ``force``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .utils import write_json

STATE_FILE = "cam2mask_masks.json"
MAX_PREVIEWS = 100


def _preview(index, i: int, masks: np.ndarray, folder: Path) -> None:
    """The image at its own size with its predicted masks tinted (JPEG)."""
    import io

    from PIL import Image

    from .data import resize_mask
    from .eda import overlay
    from .utils import atomic_write_bytes

    img = index.image(i)
    full = resize_mask(np.ascontiguousarray(masks), img.shape[:2])
    buf = io.BytesIO()
    Image.fromarray((overlay(img, full) * 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    atomic_write_bytes(folder / f"{Path(index.image_ids[i]).stem}.jpg", buf.getvalue())


def _claim_output(out: Path, settings: dict, force: bool) -> None:
    state = out / STATE_FILE
    if out.exists() and any(out.iterdir()):
        mine = False
        if state.is_file():
            try:
                mine = json.loads(state.read_text()).get("settings") == settings
            except json.JSONDecodeError:
                mine = False
        if not mine:
            if not force:
                raise FileExistsError(
                    f"{out} exists and holds something else (another run's settings or other "
                    f"files); choose another --out or pass --force to replace it")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not state.is_file():
        write_json(state, {"settings": settings, "complete": False})


class _Ensemble:
    """Probabilities and CAMs of a loaded classifier run: means over its fold models."""

    def __init__(self, run: dict, ds, batch: int = 16):
        self.models, self.ds, self.batch = list(run["models"].values()), ds, batch

    def probs(self, rows) -> np.ndarray:
        """``[len(rows), C]``: the mean of the fold models' sigmoid probabilities."""
        import torch

        from .classify import predict_logits

        rows = np.asarray(rows)
        return np.mean([1 / (1 + np.exp(-predict_logits(m, self.ds, rows, self.batch,
                                                          torch.device("cpu"))))
                        for m in self.models], axis=0).astype(np.float64)

    def maps(self, rows) -> np.ndarray:
        """``[len(rows), C, H, W]``: the mean of the fold models' Grad-CAM++ (aug smoothing)."""
        import torch

        from .cams import compute_cams

        x = torch.stack([self.ds[int(i)]["image"] for i in np.asarray(rows)])
        return np.mean([compute_cams(m, x, "gradcam++", aug_smooth=True, batch_size=self.batch)
                        for m in self.models], axis=0)


def make_masks(data: str | Path, out: str | Path, profile: str = "cpu", force: bool = False,
               progress: bool = True, model: str | Path | None = None, **overrides) -> dict:
    """Run the whole method on ``data`` and write masks to ``out``; returns a summary dict.
    ``model``: a finished classifier run folder to use instead of training one."""
    from . import paper
    from . import postprocess as pp
    from .data import load_dataset
    from .pipeline import (BEST_VARIANT, CONFIDENCES, THRESHOLDS, VARIANTS, cam_stage,
                           classifier_stage, context, min_areas, per_class_table,
                           stats_from_cache, true_masks)
    from .profiles import get_profile
    from .report import markdown_table

    data, out = Path(data), Path(out)
    index = load_dataset(data)  # fails early, naming the file, on bad input
    overrides = {k: v for k, v in overrides.items() if v is not None}
    prof = get_profile(profile, **overrides)
    n_folds = min(prof.n_folds, len(index))
    if n_folds < 2:
        raise ValueError(f"{data}: {len(index)} image(s); cross-validation needs at least 2")
    run = None
    if model is not None:
        from .classify import load_run

        fixed = sorted(set(overrides) & {"image_size", "encoder", "epochs"})
        if fixed:
            raise ValueError(f"--model fixes the classifier; do not also give {fixed}")
        run = load_run(model, index.class_names)
        overrides["image_size"] = run["config"].image_size
        prof = get_profile(profile, **overrides)
    settings = {"data": str(data.resolve()), "profile": prof.name,
                "overrides": {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in sorted(overrides.items())},
                "n_folds": n_folds, "model": str(Path(model).resolve()) if model else None}
    _claim_output(out, settings, force)
    ctx = context(prof, data, artifacts_dir=out / "work", figures_dir=out, n_folds=n_folds,
                  progress=progress, index=index)
    say = print if progress else (lambda *a, **k: None)
    say(ctx.describe())
    rows = np.arange(len(ctx.index))
    size = ctx.profile.image_size
    aug = VARIANTS[BEST_VARIANT][1]
    if run is None:
        cls = classifier_stage(ctx, progress=progress)
        method, _, weights = VARIANTS[BEST_VARIANT]
        cache = cam_stage(ctx, cls, method, aug, weights, progress=progress)
        probs = cls["oof"]
        auc = cls["auc"]

        def maps_of(c):
            return cache.maps(c, size)
    else:
        from .classify import roc_auc_per_class

        say(f"classifier: loaded from {run['dir']} ({len(run['models'])} fold models, their "
            f"mean), not trained")
        ens = _Ensemble(run, ctx.images())
        probs = ens.probs(rows)
        auc = roc_auc_per_class(ctx.index.labels, probs)
        maps_of = ens.maps
    summary: dict = {"images": len(ctx.index), "classes": ctx.index.class_names,
                     "classifier": str(run["dir"]) if run else "trained with cross-validation",
                     "classifier_auc": dict(zip(ctx.index.class_names, [float(a) for a in auc]))}
    if ctx.index.has_masks:
        if run is None:
            stats = stats_from_cache(ctx, cache, rows, THRESHOLDS, aug)
        else:
            chunks = np.array_split(rows, max(1, len(rows) // 32))
            stats = pp.collect_stats((maps_of(c) for c in chunks),
                                     (true_masks(ctx, c) for c in chunks), THRESHOLDS)
        params, _ = pp.search(stats, probs, CONFIDENCES, min_areas(ctx), per_class=True)
        rep = pp.report(stats, probs, params, ctx.index.class_names)
        summary["postprocessing"] = ("tuned per class on the true masks (" +
                                     ("out-of-fold CAMs)" if run is None else
                                      "CAMs of the loaded classifier)"))
        table = per_class_table(rep, ctx.index.class_names)
        s = rep.summary()
        table.loc[len(table)] = {"class": "all", "Dice (defective images)":
                                 s["dice_defective_images"], "Dice (non-empty masks)":
                                 s["dice_nonempty_masks"], "non-empty masks":
                                 int(rep.true_nonempty.sum())}
        table.to_csv(out / "dice_report.csv", index=False)
        (out / "dice_report.md").write_text(
            f"### Dice of the masks against {data}/masks\n\n"
            f"Post-processing {params.describe()} (tuned per class on these masks: an optimistic "
            f"estimate). Kaggle Dice per (image, class), 1 when both are empty, at "
            f"{size[0]}x{size[1]}.\n\n{markdown_table(table)}\n")
        summary["dice"] = {k: float(v) for k, v in s.items() if isinstance(v, float)}
    else:
        params = pp.Params(**paper.PAPER_POSTPROCESS)
        summary["postprocessing"] = ("no true masks: the paper's defaults (confidence 0.5, "
                                     "threshold 0.3, min area 0), not tuned")
    say(f"post-processing: {params.describe()} - {summary['postprocessing']}")
    write_json(out / "params.json", {"params": vars(params), "note": summary["postprocessing"]})
    # masks at each image's own size: every (image, class) as PNG, non-empty ones in the CSV;
    # batches are streamed, so memory does not grow with the number of images
    def batches():
        for c in np.array_split(rows, max(1, len(rows) // 32)):
            m = pp.apply(maps_of(c), probs[c], params)
            for k, i in enumerate(c):
                if i < MAX_PREVIEWS:
                    _preview(ctx.index, int(i), m[k], out / "previews")
            yield c, m

    pp.write_predictions(ctx.index, batches(), out, png=True, empty_png=True, csv_name="masks.csv")
    summary["out"] = str(out)
    write_json(out / STATE_FILE, {"settings": settings, "complete": True, "summary": summary})
    return summary
