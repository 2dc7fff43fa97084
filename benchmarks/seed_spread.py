"""How far the headline numbers move with the seed: the whole profile (synthetic data, folds,
initialisation, training) run clean once per seed, and each headline number's spread printed, so
a reviewer whose re-run differs from the committed tables can tell agreement from a bug.

    .venv/bin/python benchmarks/seed_spread.py --profile smoke --seeds 0 1 2     # ~5 minutes
    .venv/bin/python benchmarks/seed_spread.py --profile cpu --seeds 0 1 2       # ~75 min, 2 cores
    .venv/bin/python benchmarks/seed_spread.py --profile cpu --seeds 0 1 2 --committed figures/cpu

Each seed runs every notebook into a temporary folder (``--keep DIR`` keeps them). With
``--committed DIR`` the profile's own seed is not re-run: its numbers are read from the committed
tables in DIR, which a clean ``make reproduce`` of the same code made (the run is deterministic, so
re-running it would give the same numbers and cost another 25 minutes). The table is printed and
written to ``figures/seed_spread/<profile>.{md,csv}``, and every re-run seed's CSV tables are kept
under ``figures/seed_spread/<profile>/seed<S>/``: the report's claims table
(:mod:`cam2mask_lib.claims`) reads them to say in how many seeds each of the paper's claims holds.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from cam2mask_lib.profiles import get_profile
from cam2mask_lib.report import machine, software
from cam2mask_lib.runner import reproduce
from cam2mask_lib.utils import display_path, repo_root


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
        **table5_headline(fig / "table5_beyond_the_paper.csv"),
    }


def table5_headline(path: Path) -> dict[str, float]:
    """Table 5 (beyond the paper): the default refinement and the U-Net self-trained on it."""
    if not path.exists():     # a run made before notebook 06 existed
        return {}
    t5 = pd.read_csv(path).set_index("masks")
    default = next(k for k in t5.index if k.endswith("(the default)"))
    selftrained = next(k for k in t5.index if k.startswith("U-Net self-trained"))
    return {
        "Table 5 default refinement, defective": float(t5.loc[default, "Dice (defective images)"]),
        "Table 5 self-trained U-Net, defective": float(
            t5.loc[selftrained, "Dice (defective images)"]),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep", default=None, help="keep every run here (default: a temp folder)")
    ap.add_argument("--committed", default=None, metavar="DIR",
                    help="read the profile's own seed from the committed tables in DIR "
                         "instead of re-running it")
    ap.add_argument("--out", default=str(repo_root() / "figures" / "seed_spread"),
                    help="where the table is written (default: figures/seed_spread)")
    args = ap.parse_args(argv)
    own_seed = get_profile(args.profile).seed
    if args.committed is not None:
        if not (Path(args.committed) / "table1_classification_auc.csv").exists():
            raise SystemExit(f"--committed {args.committed}: no table1_classification_auc.csv there")
        if own_seed not in args.seeds:
            raise SystemExit(f"--committed: the profile's seed {own_seed} is not among --seeds")
    rows, sources = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for s in args.seeds:
            if args.committed is not None and s == own_seed:
                rows[s] = headline(Path(args.committed))
                sources[s] = f"committed tables in {display_path(args.committed)}"
                print(f"seed {s} (committed): " + ", ".join(f"{k} {v:.4f}"
                                                         for k, v in rows[s].items()), flush=True)
                continue
            out = root / f"seed{s}"
            reproduce(args.profile, output_dir=out / "notebooks", figures=out / "figures",
                      artifacts=out / "artifacts", extra={"seed": s}, progress=False)
            rows[s] = headline(out / "figures")
            sources[s] = "a clean run of every notebook"
            keep_tables(out / "figures", Path(args.out) / args.profile / f"seed{s}")
            print(f"seed {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[s].items()), flush=True)
    df = pd.DataFrame(rows).T
    table = spread_table(df)
    lines = [f"Seed spread of the `{args.profile}` profile's headline numbers: seeds "
             f"{', '.join(map(str, args.seeds))} (the synthetic data, the folds and the "
             f"initialisation all change with the seed); "
             + "; ".join(f"seed {s}: {src}" for s, src in sources.items()) + ".", "",
             "| number | " + " | ".join(f"seed {s}" for s in df.index)
             + " | mean | sd | max - min |",
             "| --- " * (len(df.index) + 4) + "|"]
    for k, r in table.iterrows():
        lines.append(f"| {k} | " + " | ".join(f"{df.loc[s, k]:.4f}" for s in df.index)
                     + f" | {r['mean']:.4f} | {r['sd']:.4f} | {r['max - min']:.4f} |")
    lines += ["", f"_Made with {software()}; {machine()}._"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.profile}.md").write_text(text)
    df.rename_axis("seed").to_csv(out / f"{args.profile}.csv")
    print(f"wrote {out / (args.profile + '.md')} and .csv")


def keep_tables(figures: Path, dest: Path) -> None:
    """Copy one seed's CSV tables (not its pictures) to ``dest``, replacing what was there."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in sorted(figures.glob("*.csv")):
        shutil.copy2(f, dest / f.name)


def spread_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample sd and range of each headline number (columns) over the seeds (rows)."""
    return pd.DataFrame({"mean": df.mean(), "sd": df.std(ddof=1) if len(df) > 1 else np.nan,
                         "max - min": df.max() - df.min()})


if __name__ == "__main__":
    main()
