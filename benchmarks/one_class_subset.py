"""A small one-class set drawn from a labelled set by its labels: a class's images (with their
masks) and images without it, for measuring `cam2mask masks` where data are scarce.

    .venv/bin/python benchmarks/one_class_subset.py --class scratches --name scratch \\
        --positives 300 --negatives 900 --out /tmp/scratch_300   # from ../shared/data/neu_seg_dev
    .venv/bin/cam2mask masks --data /tmp/scratch_300 --out /tmp/scratch_300_masks

The images are drawn at random (``--seed``) from the class's positives and from the images whose
label for it is 0, by their labels alone; nothing looks at a mask. The new folder is in the
generic format (``images/``, ``labels.csv``, ``masks/<name>/``), so it must be outside the
repository when the source is data the project does not ship (README: Real steel). An existing,
non-empty ``--out`` is refused; bad options are refused before anything is written.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from cam2mask_lib.data import DataError, check_class_name, load_dataset
from cam2mask_lib.utils import dev_data

DEFAULT_DATA = dev_data()


def draw(index, cls: str, positives: int, negatives: int, seed: int) -> tuple[list, list]:
    """Rows of ``positives`` images labelled ``cls`` and ``negatives`` without it, at random."""
    if cls not in index.class_names:
        raise SystemExit(f"--class {cls!r}: {index.csv_path} has the classes {index.class_names}")
    c = index.class_names.index(cls)
    ids = np.asarray(index.image_ids)
    pos = sorted(ids[index.labels[:, c] == 1])
    neg = sorted(ids[index.labels[:, c] == 0])
    for n, low, have, what in ((positives, 1, pos, "--positives"),
                               (negatives, 0, neg, "--negatives")):
        if not low <= n <= len(have):
            raise SystemExit(f"{what} {n}: {index.csv_path} has {len(have)} such images of "
                             f"class {cls!r}; choose {low} to {len(have)}")
    rng = np.random.default_rng(seed)
    row = {k: i for i, k in enumerate(index.image_ids)}
    chosen_pos = rng.choice(pos, positives, replace=False)
    chosen_neg = rng.choice(neg, negatives, replace=False) if negatives else []
    return sorted(row[k] for k in chosen_pos), sorted(row[k] for k in chosen_neg)


def write_subset(index, cls: str, name: str, pos: list, neg: list, out: Path) -> None:
    """``out`` in the generic format: the chosen images' files as they are, ``labels.csv`` and
    the class's masks (255 = defect) for the positives."""
    c = index.class_names.index(cls)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks" / name).mkdir(parents=True)
    lines = [f"image,{name}"]
    positive = set(pos)
    for i in sorted(pos + neg):
        src = index.image_paths[i]
        key = index.image_ids[i]
        shutil.copyfile(src, tmp / "images" / f"{key}{src.suffix}")
        if i in positive:
            Image.fromarray(index.mask(i)[c] * 255).save(tmp / "masks" / name / f"{key}.png")
        lines.append(f"{key},{int(i in positive)}")
    (tmp / "labels.csv").write_text("\n".join(lines) + "\n")
    if out.exists():
        out.rmdir()  # checked empty before any work
    tmp.rename(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="labelled set with true masks")
    ap.add_argument("--class", dest="cls", required=True, help="the class to keep")
    ap.add_argument("--name", help="its column name in the new set (default: the class's)")
    ap.add_argument("--positives", type=int, required=True, help="images labelled with it")
    ap.add_argument("--negatives", type=int, required=True, help="images labelled without it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="a new (or empty) folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        name = check_class_name(args.name or args.cls, "--name")
    except DataError as e:
        raise SystemExit(str(e)) from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--out {out}: exists and is not an empty folder; choose a new one")
    index = load_dataset(args.data)
    if not index.has_masks:
        raise SystemExit(f"--data {args.data}: has no true masks to carry over")
    pos, neg = draw(index, args.cls, args.positives, args.negatives, args.seed)
    write_subset(index, args.cls, name, pos, neg, out)
    print(f"{out}: {len(pos)} images with {args.cls!r} (as {name!r}) and {len(neg)} without it, "
          f"drawn from {index.describe()} with seed {args.seed}")


if __name__ == "__main__":
    main()
