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
cached under ``--artifacts`` (a re-run reuses it); the table is written to ``--out``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cam2mask_lib import pipeline
from cam2mask_lib.experiments import refinement_markdown_table, refinement_stage
from cam2mask_lib.report import markdown_table
from cam2mask_lib.utils import atomic_write_text, repo_root

DEFAULT_DATA = repo_root().parent / "shared" / "data" / "neu_seg_dev"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--image-size", type=int, nargs=2, default=(256, 256),
                    help="the classifier's input (default 256 256)")
    ap.add_argument("--seg-size", type=int, nargs=2, default=(128, 128),
                    help="the segmentation networks' input and the scoring size (default 128 128)")
    ap.add_argument("--epochs", type=int, default=10, help="classifier epochs per fold")
    ap.add_argument("--seg-epochs", type=int, default=6, help="segmentation epochs per network")
    ap.add_argument("--score-folds", type=int, nargs="+", default=[0])
    ap.add_argument("--artifacts", default=str(repo_root() / "artifacts" / "real_quality"))
    ap.add_argument("--out", default=str(repo_root() / "figures" / "real_quality"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (the NEU-Seg development set lives "
                         f"at ../shared/data/neu_seg_dev beside the project; give --data DIR)")
    progress = not args.no_progress
    t0 = time.perf_counter()
    ctx = pipeline.context("cpu", data_dir=args.data, artifacts_dir=args.artifacts, **{
        "classifier.image_size": tuple(args.image_size), "classifier.epochs": args.epochs,
        "segmentation.size": tuple(args.seg_size), "segmentation.folds": tuple(args.score_folds),
        "segmentation.defective_only": False, "segmentation.net.epochs": args.seg_epochs})
    print(ctx.describe(), flush=True)
    run = pipeline.classifier_stage(ctx, progress=progress)
    cache = pipeline.cam_stage(ctx, run, progress=progress)
    t_cls = time.perf_counter() - t0
    print(f"classifier and CAMs: {t_cls:.0f} s; out-of-fold AUC "
          + ", ".join(f"{c} {a:.3f}" for c, a in zip(ctx.index.class_names, run.auc)), flush=True)
    res = refinement_stage(ctx, run, cache, progress=progress)
    rows, size, df = res.rows, ctx.seg_size, res.table
    for name, sec in res.seconds.items():
        print(f"{name}: {sec:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    atomic_write_text(out / "real_quality.csv", df.to_csv(index=False))
    fmt = refinement_markdown_table(df)
    text = (f"### Label-only masks on {Path(args.data).name}, against a supervised U-Net\n\n"
            f"{len(rows)} images of fold(s) {args.score_folds} scored at {size[0]}x{size[1]}; "
            f"classifier {ctx.profile.classifier.encoder} at {args.image_size[0]}x"
            f"{args.image_size[1]}, {args.epochs} epochs x {ctx.profile.n_folds} folds; "
            f"U-Nets (encoder from the fold's classifier, slim decoder) {args.seg_epochs} epochs. "
            f"Wall time {wall / 60:.1f} min (classifier and CAMs {t_cls / 60:.1f} min"
            f"{', reused from the artifacts folder' if t_cls < 60 else ''}).\n\n"
            f"{markdown_table(fmt)}\n\n{ctx.prov.line()}\n")
    atomic_write_text(out / "real_quality.md", text)
    print("\n" + text)


if __name__ == "__main__":
    main()
