"""How far the headline numbers move with the seed: the whole profile (synthetic data, folds,
initialisation, training) run clean once per seed, and each headline number's spread printed, so
a reviewer whose re-run differs from the committed tables can tell agreement from a bug.

    .venv/bin/python benchmarks/seed_spread.py --profile smoke --seeds 0 1 2     # ~5 minutes
    .venv/bin/python benchmarks/seed_spread.py --profile cpu --seeds 0 1 2       # ~1 hour, 2 cores

Each seed runs every notebook into a temporary folder (``--keep DIR`` keeps them).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from cam2mask_lib.runner import reproduce


def headline(fig: Path) -> dict[str, float]:
    """The numbers the README quotes, read from one run's tables."""
    t1 = pd.read_csv(fig / "table1_classification_auc.csv")
    t2 = pd.read_csv(fig / "table2_cam_dice.csv").set_index("experiment")
    t3 = pd.read_csv(fig / "table3_segmentation.csv").set_index("experiment")
    per_class = next(k for k in t2.index if k.endswith("per-class post-processing"))
    papers = next(k for k in t2.index if k.endswith("the paper's parameters"))
    return {
        "Table 1 mean AUC": float(t1.iloc[0]["mean"]),
        "Table 2 per-class, defective": float(t2.loc[per_class, "Dice (defective images)"]),
        "Table 2 per-class, non-empty": float(t2.loc[per_class, "Dice (non-empty masks)"]),
        "Table 2 paper's parameters, non-empty": float(t2.loc[papers, "Dice (non-empty masks)"]),
        "Table 3 supervised + gate, non-empty": float(
            t3.loc["network on true masks + classifier gate", "Dice (non-empty masks)"]),
        "Table 3 CAM masks tuned, non-empty": float(
            t3.loc["CAM masks, tuned per class", "Dice (non-empty masks)"]),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep", default=None, help="keep every run here (default: a temp folder)")
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for s in args.seeds:
            out = root / f"seed{s}"
            reproduce(args.profile, output_dir=out / "notebooks", figures=out / "figures",
                      artifacts=out / "artifacts", extra={"seed": s}, progress=False)
            rows[s] = headline(out / "figures")
            print(f"seed {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[s].items()), flush=True)
    df = pd.DataFrame(rows).T
    print(f"\nprofile {args.profile!r}, seeds {args.seeds} (data, folds, initialisation all change)")
    print("| number | mean | sd | min | max | max - min |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k in df.columns:
        v = df[k].to_numpy()
        print(f"| {k} | {v.mean():.4f} | {v.std(ddof=1) if len(v) > 1 else np.nan:.4f} | "
              f"{v.min():.4f} | {v.max():.4f} | {v.max() - v.min():.4f} |")


if __name__ == "__main__":
    main()
