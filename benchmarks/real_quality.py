"""Label-only masks on real data: every refinement technique (cam2mask_lib.refine), their
combination and a network self-trained on it, against a supervised U-Net of the same encoder and
budget trained on the same folds in the same run.

    .venv/bin/python benchmarks/real_quality.py                  # ../shared/data/neu_seg_dev
    .venv/bin/python benchmarks/real_quality.py --data DIR       # any generic/Severstal folder

The classifier (the cpu profile's recipe) is trained with cross-validation on the image labels
only; every image's CAM comes from the fold model that did not see it. Nothing below is tuned on
the true masks: they are read only to score. The masks of ``--score-folds`` (default fold 0) are
scored at the segmentation input size against the true masks: Kaggle Dice per (image, class),
averaged over the defective images, and over the non-empty true masks. "gap closed" is
``(Dice - no mask) / (supervised - no mask)`` on defective images. The segmentation networks are
trained on the other folds' images (all of them: a label says where a class is absent). Work is
cached under ``--artifacts`` (a re-run reuses it; the caches are keyed by the data's bytes);
the table is written to ``--out``, by default ``figures/real_quality/<the data folder's name>/``,
and a folder holding the table of other data (by the images', labels' and masks' bytes) is
refused unless ``--force``.

The inputs follow the data: by default the classifier's input has the images' median aspect
ratio at 256x256 pixels and the segmentation networks' at 128x128 (sides multiples of 32, as
``cam2mask masks`` fits them), so 200x200 images get 256x256 and 128x128.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cam2mask_lib import pipeline
from cam2mask_lib.data import load_dataset
from cam2mask_lib.experiments import refinement_markdown_table, refinement_stage
from cam2mask_lib.masks import fit_input_size
from cam2mask_lib.profiles import get_profile
from cam2mask_lib.refine import RefineConfig
from cam2mask_lib.report import markdown_table
from cam2mask_lib.utils import (ConfigError, atomic_write_text, dev_data, read_json, repo_root,
                                write_json)

DEFAULT_DATA = dev_data()
CLASSIFIER_BUDGET, SEGMENTATION_BUDGET = (256, 256), (128, 128)
RUN_FILE = "real_quality.json"


def input_sizes(shapes, image_size=None, seg_size=None) -> tuple[tuple, tuple]:
    """The classifier's and the segmentation networks' inputs: as given, or the images' median
    aspect ratio at :data:`CLASSIFIER_BUDGET` and :data:`SEGMENTATION_BUDGET` pixels."""
    return (tuple(image_size or fit_input_size(shapes, CLASSIFIER_BUDGET)),
            tuple(seg_size or fit_input_size(shapes, SEGMENTATION_BUDGET)))


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--image-size", type=int, nargs=2, default=None,
                    help="the classifier's input (default: the images' median aspect ratio at "
                         "256x256 pixels)")
    ap.add_argument("--seg-size", type=int, nargs=2, default=None,
                    help="the segmentation networks' input and the scoring size (default: the "
                         "images' median aspect ratio at 128x128 pixels)")
    ap.add_argument("--epochs", type=int, default=10, help="classifier epochs per fold")
    ap.add_argument("--seg-epochs", type=int, default=6, help="segmentation epochs per network")
    ap.add_argument("--seg-batch", type=int, default=None,
                    help="segmentation networks' batch (default: the cpu recipe's)")
    ap.add_argument("--core", type=float, default=1.0,
                    help="the self-trained U-Net's defect targets of a class no grey-level "
                         "test narrows: its region cut at this factor x its threshold (1: the "
                         "whole refined mask)")
    ap.add_argument("--vflip", action="store_true",
                    help="segmentation networks also trained on images flipped top to bottom")
    ap.add_argument("--shift", action="store_true",
                    help="segmentation networks also trained on images rolled along their width")
    ap.add_argument("--score-folds", type=int, nargs="+", default=[0])
    ap.add_argument("--artifacts", default=str(repo_root() / "artifacts" / "real_quality"))
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
    if args.seg_batch is not None and args.seg_batch < 1:
        raise SystemExit(f"--seg-batch {args.seg_batch}: must be at least 1")
    try:  # the refinement's own check, before any work (the stage builds it after the classifier)
        RefineConfig(core=args.core)
    except ConfigError as e:
        raise SystemExit(f"--core {args.core}: {e}") from None
    k = get_profile("cpu").n_folds
    bad = [f for f in args.score_folds if not 0 <= f < k]
    if bad:
        raise SystemExit(f"--score-folds {bad}: the cpu recipe has folds 0 to {k - 1}")
    image_size, seg_size = input_sizes(index.shapes, args.image_size, args.seg_size)
    out = Path(args.out) if args.out else repo_root() / "figures" / "real_quality" / data.name
    _claim(out, index, args.force)
    progress = not args.no_progress
    t0 = time.perf_counter()
    ctx = pipeline.context("cpu", data_dir=data, artifacts_dir=args.artifacts, index=index, **{
        "classifier.image_size": image_size, "classifier.epochs": args.epochs,
        "segmentation.size": seg_size, "segmentation.folds": tuple(args.score_folds),
        "segmentation.defective_only": False, "segmentation.net.epochs": args.seg_epochs,
        "segmentation.net.batch_size": args.seg_batch,  # None (a flag not given): the recipe's
        "segmentation.net.vflip": args.vflip or None, "segmentation.net.shift": args.shift or None})
    print(ctx.describe(), flush=True)
    fitted = [what for what, given in (("classifier", args.image_size),
                                       ("segmentation", args.seg_size)) if not given]
    print(f"inputs: classifier {image_size[0]}x{image_size[1]}, segmentation and scoring "
          f"{seg_size[0]}x{seg_size[1]}" + (f" ({' and '.join(fitted)}: the images' median "
          f"aspect ratio at the default pixel budget)" if fitted else ""), flush=True)
    run = pipeline.classifier_stage(ctx, progress=progress)
    cache = pipeline.cam_stage(ctx, run, progress=progress)
    t_cls = time.perf_counter() - t0
    print(f"classifier and CAMs: {t_cls:.0f} s; out-of-fold AUC "
          + ", ".join(f"{c} {a:.3f}" for c, a in zip(ctx.index.class_names, run.auc)), flush=True)
    res = refinement_stage(ctx, run, cache, progress=progress, core=args.core)
    rows, size, df = res.rows, ctx.seg_size, res.table
    for name, sec in res.seconds.items():
        print(f"{name}: {sec:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    write_json(out / RUN_FILE, {"data": data.name, "fingerprint": index.fingerprint(),
                                "images": len(index), "image_size": list(image_size),
                                "seg_size": list(seg_size), "epochs": args.epochs,
                                "seg_epochs": args.seg_epochs, "score_folds": args.score_folds,
                                "seg_batch": ctx.profile.segmentation.net.batch_size,
                                "core": args.core, "vflip": args.vflip, "shift": args.shift})
    atomic_write_text(out / "real_quality.csv", df.to_csv(index=False))
    fmt = refinement_markdown_table(df)
    core = ("" if args.core == 1 else f", the self-trained one on the core of a region no "
            f"grey-level test narrows (above {args.core:g} x its cut)")
    aug = [what for what, on in (("flipped top to bottom", args.vflip),
                                 ("rolled along their width", args.shift)) if on]
    aug = f"; their images also {' and '.join(aug)}" if aug else ""
    text = (f"### Label-only masks on {Path(args.data).name}, against a supervised U-Net\n\n"
            f"{len(rows)} images of fold(s) {args.score_folds} scored at {size[0]}x{size[1]}; "
            f"classifier {ctx.profile.classifier.encoder} at {image_size[0]}x"
            f"{image_size[1]}, {args.epochs} epochs x {ctx.profile.n_folds} folds; "
            f"U-Nets (encoder from the fold's classifier, slim decoder) {args.seg_epochs} epochs"
            f"{'' if args.seg_batch is None else f', batch {args.seg_batch}'}{core}{aug}. "
            f"Wall time {wall / 60:.1f} min (classifier and CAMs {t_cls / 60:.1f} min"
            f"{'' if run.trained else '; the classifier reused from the artifacts folder'})"
            f". The default learnt from the labels: {res.refined.calibration.describe()}.\n\n"
            f"{markdown_table(fmt)}\n\n{ctx.prov.line()}\n")
    atomic_write_text(out / "real_quality.md", text)
    print("\n" + text)


if __name__ == "__main__":
    main()
