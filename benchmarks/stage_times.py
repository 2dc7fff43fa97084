"""Per-stage wall time of a clean run: every notebook executed in order (papermill) into fresh
temporary artifacts, so nothing is reused, and each stage's seconds, share of the run and the
run's ratio to its budget printed (the issue's budgets: smoke 3 min, cpu 15 min on 2 cores).

    .venv/bin/python benchmarks/stage_times.py --profile smoke      # about a minute
    .venv/bin/python benchmarks/stage_times.py --profile cpu        # about a quarter of an hour

``--keep DIR`` keeps the artifacts, figures and executed notebooks under DIR instead of a
temporary folder; ``--override FIELD=VALUE ...`` times the profile with those fields changed
(e.g. ``classifier.fold_processes=3``), as ``cam2mask reproduce --override`` runs it.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cam2mask_lib.cli import _parse_set
from cam2mask_lib.runner import reproduce

BUDGET_S = {"smoke": 180, "cpu": 900}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke", help="profile to time (default: smoke)")
    ap.add_argument("--keep", default=None, help="keep the outputs here (default: a temp folder)")
    ap.add_argument("--override", nargs="+", metavar="FIELD=VALUE", default=[],
                    help="profile fields for every notebook, dotted")
    args = ap.parse_args(argv)
    overrides = _parse_set(args.override, "--override")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        runs = reproduce(args.profile, output_dir=root / "notebooks", figures=root / "figures",
                         artifacts=root / "artifacts", progress=False, overrides=overrides)
    total = sum(r.seconds for r in runs)
    print(f"clean run of profile {args.profile!r}, {len(runs)} notebooks"
          + (f", overrides {overrides}" if overrides else ""))
    print(f"{'stage':28s} {'seconds':>8s} {'share':>6s}")
    for r in runs:
        print(f"{r.name:28s} {r.seconds:8.1f} {r.seconds / total:6.1%}")
    print(f"{'total':28s} {total:8.1f}")
    budget = BUDGET_S.get(args.profile)
    if budget:
        print(f"budget {budget} s: the run took {total / budget:.2f}x its budget "
              f"({'within' if total <= budget else 'OVER'})")


if __name__ == "__main__":
    main()
