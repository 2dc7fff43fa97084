"""Label-only masks on real data, made as ``cam2mask masks`` makes them by default: the default
refinement (cam2mask_lib.refine) and its self-trained U-Net, beside the paper's masks and a
supervised U-Net of the same encoder and budget trained on the same folds in the same run.

    .venv/bin/python benchmarks/real_quality.py                  # ../shared/data/neu_seg_dev
    .venv/bin/python benchmarks/real_quality.py --data DIR       # any generic/Severstal folder

The classifier is ``cam2mask masks``' default (:func:`cam2mask_lib.masks.classifier_recipe`:
EfficientNet-Lite0 from the ImageNet weights that install with the project; ``--random-weights``:
the cpu profile's MobileNetV3 from random weights), trained with cross-validation on the image
labels only; every image's CAM comes from the fold model that did not see it. The refinement
reads the maps ``cam2mask masks`` reads (the last layer's Grad-CAM++ times LayerCAM at the
encoder's last stride-8 stage: cam2mask_lib.fusion); the paper's masks from the last layer alone
are scored beside them, and so is the paper's cut of the refined method's maps.
``--all-techniques`` adds a row for every other refinement technique of notebook 06's Table 5
(about 2 minutes more on NEU-Seg on 2 cores). The inputs are the
masks command's: the images' median aspect ratio at the cpu profile's pixel budgets, never
larger than the images. Nothing below is tuned on the true masks: they are read only to score.
The masks of ``--score-folds`` (default fold 0) are scored at the segmentation input size: Kaggle
Dice per (image, class), averaged over the defective images and over the non-empty true masks.
"gap closed" is ``(Dice - no mask) / (supervised - no mask)`` on defective images. The
segmentation networks train on the other folds' images (all of them), as many epochs as
``cam2mask masks`` gives its self-trained U-Nets. Work is cached under ``--artifacts`` (default
``artifacts/real_quality/<the data folder's name>``; a re-run reuses it; the caches are keyed by
the data's bytes). The table goes to ``--out``, by default
``figures/real_quality/<the data folder's name>/``, with ``real_quality.json``, whose key
``default`` holds the numbers of the masks command's default row (``gap_closed``,
``nonempty_share``, ``defect_free_with_mask``: null where every image holds a defect), and a
picture per class (image, CAM, refined mask, self-trained mask, truth). A folder holding the
table of other data (by the images', labels' and masks' bytes) is refused unless ``--force``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from cam2mask_lib import pipeline
from cam2mask_lib.data import load_dataset
from cam2mask_lib.experiments import (DEFAULT_TECHNIQUE, DEFECT_FREE, PAPER_TECHNIQUE,
                                      SELF_TRAINED, TECHNIQUES, median_example_per_class,
                                      refinement_examples, refinement_markdown_table,
                                      refinement_stage)
from cam2mask_lib.fusion import describe_maps, fused_maps_stage
from cam2mask_lib.masks import classifier_recipe, fit_input_size, masks_profile
from cam2mask_lib.profiles import get_profile
from cam2mask_lib.report import markdown_table, save_figure
from cam2mask_lib.utils import atomic_write_text, dev_data, read_json, repo_root, write_json
from cam2mask_lib.viz import plot_class_examples

DEFAULT_DATA = dev_data()
RUN_FILE = "real_quality.json"
BASE = "cpu"  # the profile whose pixel budgets and folds cam2mask masks uses by default
# the refinement rows of a run without --all-techniques: what cam2mask masks makes, and the paper's
# cut of the same maps (the README's and notebook 06's rows); the others took 108 of NEU-Seg's
# 133 s of refinement on 2 cores (measured)
DEFAULT_ROWS = (PAPER_TECHNIQUE, DEFAULT_TECHNIQUE)


def input_sizes(shapes, image_size=None, seg_size=None) -> tuple[tuple, tuple]:
    """The classifier's and the segmentation networks' inputs: as given, or as ``cam2mask
    masks`` fits them (the images' median aspect ratio at the cpu profile's pixel budgets)."""
    base = get_profile(BASE)
    return (tuple(image_size or fit_input_size(shapes, base.image_size)),
            tuple(seg_size or fit_input_size(shapes, base.segmentation.size)))


def _claim(out: Path, index, force: bool) -> None:
    """Refuse an ``out`` whose table was made from other data (another set, or this one with an
    image, label or mask changed since), unless ``force``."""
    made = read_json(out / RUN_FILE) if (out / RUN_FILE).is_file() else None
    if made is not None and made.get("fingerprint") != index.fingerprint() and not force:
        raise SystemExit(f"--out {out}: holds the table of other data ({made.get('data')}, "
                         f"fingerprint {made.get('fingerprint')}; {index.root.name} is "
                         f"{index.fingerprint()}); give another --out, or --force to replace it")
    if made is None and (out / "real_quality.md").is_file() and not force:
        raise SystemExit(f"--out {out}: holds a real_quality.md of unknown data; give another "
                         f"--out, or --force to replace it")


def _number(v: float):
    return None if v is None or math.isnan(v) else round(float(v), 4)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--image-size", type=int, nargs=2, default=None,
                    help="the classifier's input (default: as cam2mask masks fits it)")
    ap.add_argument("--seg-size", type=int, nargs=2, default=None,
                    help="the segmentation networks' input and the scoring size (default: as "
                         "cam2mask masks fits it)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="classifier epochs per fold (default: cam2mask masks')")
    ap.add_argument("--seg-epochs", type=int, default=None,
                    help="segmentation epochs per network (default: cam2mask masks')")
    ap.add_argument("--seg-batch", type=int, default=None,
                    help="segmentation networks' batch (default: the cpu recipe's)")
    ap.add_argument("--random-weights", action="store_true",
                    help="the classifier of the cpu profile from random weights instead of the "
                         "masks command's ImageNet-pretrained default")
    ap.add_argument("--all-techniques", action="store_true",
                    help="a row for every refinement technique of notebook 06's Table 5, not "
                         "only the paper's cut and the default")
    ap.add_argument("--score-folds", type=int, nargs="+", default=[0])
    ap.add_argument("--artifacts", default=None,
                    help="where the work is cached (default artifacts/real_quality/<data folder "
                         "name>: each set keeps its own folds)")
    ap.add_argument("--out", default=None,
                    help="where the table goes (default figures/real_quality/<data folder name>)")
    ap.add_argument("--force", action="store_true",
                    help="replace an --out holding another data set's table")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    data = Path(args.data).resolve()
    if not data.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (the NEU-Seg development set lives "
                         f"at ../shared/data/neu_seg_dev beside the project; give --data DIR)")
    index = load_dataset(data)  # fails early, naming the file, on bad input
    if not index.has_masks:
        raise SystemExit(f"--data {args.data}: no true masks (a generic folder needs masks/, a "
                         f"Severstal one its train.csv); this benchmark scores against them")
    for name in ("epochs", "seg_epochs", "seg_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at "
                             f"least 1")
    base = get_profile(BASE)
    bad = [f for f in args.score_folds if not 0 <= f < base.n_folds]
    if bad:
        raise SystemExit(f"--score-folds {bad}: the cpu recipe has folds 0 to {base.n_folds - 1}")
    image_size, seg_size = input_sizes(index.shapes, args.image_size, args.seg_size)
    out = Path(args.out) if args.out else repo_root() / "figures" / "real_quality" / data.name
    _claim(out, index, args.force)
    given = {"image_size": image_size, "epochs": args.epochs, "seg_epochs": args.seg_epochs,
             "random_weights": args.random_weights or None}
    recipe = classifier_recipe(base, {k: v for k, v in given.items() if v is not None})
    prof = masks_profile(base, index, base.n_folds, recipe, "refined")
    prof = get_profile(prof, segmentation={"size": seg_size, "folds": tuple(args.score_folds),
                                           "net": {"batch_size": args.seg_batch}})
    progress = not args.no_progress
    t0 = time.perf_counter()
    artifacts = args.artifacts or repo_root() / "artifacts" / "real_quality" / data.name
    ctx = pipeline.context(prof, data_dir=data, artifacts_dir=artifacts, index=index)
    print(ctx.describe(), flush=True)
    cls_cfg, net_cfg = prof.classifier, prof.segmentation.net
    print(f"inputs: classifier {image_size[0]}x{image_size[1]}, segmentation and scoring "
          f"{seg_size[0]}x{seg_size[1]}; classifier {cls_cfg.encoder} ({cls_cfg.weights()}), "
          f"{cls_cfg.epochs} epochs; U-Nets {net_cfg.epochs} epochs", flush=True)
    run = pipeline.classifier_stage(ctx, progress=progress)
    t_cls = time.perf_counter() - t0
    print(f"classifier: {t_cls:.0f} s; out-of-fold AUC "
          + ", ".join(f"{c} {a:.3f}" for c, a in zip(ctx.index.class_names, run.auc)), flush=True)
    maps = fused_maps_stage(ctx, run, progress=progress)
    cache = pipeline.cam_stage(ctx, run, progress=progress)  # made in the same passes: reused
    t_maps = time.perf_counter() - t0 - t_cls
    print(f"CAMs (the last layer's and the stride-8 stage's, one pass): {t_maps:.0f} s", flush=True)
    techniques = (TECHNIQUES if args.all_techniques
                  else {k: v for k, v in TECHNIQUES.items() if k in DEFAULT_ROWS})
    res = refinement_stage(ctx, run, maps, techniques, progress=progress, paper_maps=cache)
    rows, size, df = res.rows, ctx.seg_size, res.table
    for name, sec in res.seconds.items():
        print(f"{name}: {sec:.0f} s", flush=True)
    default = df.set_index("masks").loc[SELF_TRAINED]
    examples = refinement_examples(ctx, run, res, cache, median_example_per_class(ctx, rows))
    names = list(ctx.index.class_names)
    cams = [maps.maps([e["row"]], size)[0, names.index(e["class"])] for e in examples]
    save_figure(plot_class_examples(examples, cams, names), out, "examples")
    wall = time.perf_counter() - t0
    write_json(out / RUN_FILE, {
        "data": data.name, "fingerprint": index.fingerprint(), "images": len(index),
        "image_size": list(image_size), "seg_size": list(seg_size),
        "classifier": f"{cls_cfg.encoder}, {cls_cfg.weights()}", "epochs": cls_cfg.epochs,
        "seg_epochs": net_cfg.epochs, "score_folds": args.score_folds,
        "seg_batch": net_cfg.batch_size, "techniques": list(techniques),
        "auc": [_number(a) for a in run.auc],
        "maps": describe_maps(maps),
        "default": {"masks": SELF_TRAINED, "gap_closed": _number(default["gap closed"]),
                    "nonempty_share": _number(default["non-empty, share of supervised"]),
                    "defect_free_with_mask": _number(default.get(DEFECT_FREE))},
        "wall_s": round(wall), "classifier_s": round(t_cls), "cams_s": round(t_maps),
        "classifier_trained_folds": [int(f) for f in run.trained]})
    atomic_write_text(out / "real_quality.csv", df.to_csv(index=False))
    fmt = refinement_markdown_table(df)
    others = "" if args.all_techniques else " (the other refinement techniques: --all-techniques)"
    text = (f"### Label-only masks on {data.name}, against a supervised U-Net\n\n"
            f"{len(rows)} images of fold(s) {args.score_folds} scored at {size[0]}x{size[1]}; "
            f"classifier {cls_cfg.encoder} ({cls_cfg.weights()}) at {image_size[0]}x"
            f"{image_size[1]}, {cls_cfg.epochs} epochs x {ctx.profile.n_folds} folds, "
            f"out-of-fold ROC-AUC " + ", ".join(f"{c} {a:.3f}" for c, a in zip(
                ctx.index.class_names, run.auc)) +
            f"; U-Nets (encoder {net_cfg.weights()}, slim decoder) {net_cfg.epochs} "
            f"epochs{'' if args.seg_batch is None else f', batch {args.seg_batch}'}. "
            f"Wall time {wall / 60:.1f} min (classifier {t_cls / 60:.1f} min"
            f"{'' if run.trained else ', reused from the artifacts folder'}"
            f", CAMs {t_maps / 60:.1f} min). Maps: {describe_maps(maps)}; "
            f"every row below the paper's masks reads them{others}. The default learnt from "
            f"the labels: "
            f"{res.refined.calibration.describe()}.\n\n"
            f"{markdown_table(fmt)}\n\n{ctx.prov.line()}\n")
    atomic_write_text(out / "real_quality.md", text)
    print("\n" + text)


if __name__ == "__main__":
    main()
