"""The two on-disk formats (Severstal's and the generic one) read into a :class:`DatasetIndex`,
every file and line checked before any work starts."""
from __future__ import annotations

import csv as _csv
import json
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..utils import ConfigError
from .errors import DataError
from .index import (IMAGE_EXTENSIONS, SEVERSTAL_CLASSES, DatasetIndex, image_size, read_image,
                    read_mask_png)
from .rle import parse_rle


CURRENT_COLUMNS = ["ImageId", "ClassId", "EncodedPixels"]
ORIGINAL_COLUMNS = ["ImageId_ClassId", "EncodedPixels"]

def _check_images(paths: Sequence[Path], check: str) -> np.ndarray:
    """Each image's (height, width): from its header (``"header"``, and ``"none"``, which is kept
    as a name only: the pixel numbering of an RLE depends on the image's height, so no size is
    ever assumed), or by decoding the whole image (``"full"``)."""
    if check not in ("header", "full", "none"):
        raise ConfigError(f"check must be 'header', 'full' or 'none', got {check!r}")
    shapes = np.zeros((len(paths), 2), dtype=np.int64)
    for k, p in enumerate(paths):
        shapes[k] = read_image(p).shape[:2] if check == "full" else image_size(p)
    return shapes


_SAFE_NAME = re.compile(r"[^/\\\x00-\x1f:*?\"<>|]+")


def check_class_name(name: str, where: str) -> str:
    """A class name becomes a folder (``masks/<class>/``), so it must be one safe path component:
    not empty, not ``.`` or ``..``, no slash, backslash, control or reserved character."""
    if name in (".", "..") or not _SAFE_NAME.fullmatch(name) or name != name.strip():
        raise DataError(f"{where}: class name {name!r} cannot name a folder (masks/<class>/); use "
                        f"letters, digits, spaces, '-', '_' or '.', without '/', '\\' or a "
                        f"leading or trailing space, and not '.' or '..'")
    return name


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV as strings: a byte-order mark (Excel's "CSV UTF-8") is accepted, a trailing comma
    on a row does not shift its columns, and an empty or unreadable file, or a row with a value
    past the header's columns (which pandas would drop), is a DataError naming it."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                             index_col=False)
        for w in caught:  # the others are shown as they would have been
            if not issubclass(w.category, pd.errors.ParserWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
            _check_no_extra_values(path, len(df.columns))
        return df
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected a header line and one row per "
                        f"image (or per mask)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None


def _check_no_extra_values(path: Path, columns: int) -> None:
    """Empty fields past the header's ``columns`` are trailing commas; a value there is an error
    naming its line."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, fields in enumerate(_csv.reader(f), start=1):
            extra = [v for v in fields[columns:] if v.strip()]
            if extra:
                raise DataError(f"{path}, line {line}: {len(fields)} fields where the header has "
                                f"{columns} ({extra[0]!r} past the last column); quote a value "
                                f"that holds a comma, or remove the extra field")


def _line(row: int) -> int:
    """CSV line number of data row ``row`` (0-based): line 1 is the header."""
    return row + 2


def _list_images(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def load_severstal(root: str | Path, csv: str = "train.csv", images: str = "train_images",
                   class_names: Sequence[str] = SEVERSTAL_CLASSES,
                   check: str = "header") -> DatasetIndex:
    """Read a Severstal-format folder (either CSV layout) and validate it.

    ``check``: "header" reads each image's header (size, readable type), "full" decodes every
    image ("none" is "header": an image's size is never assumed).
    """
    root = Path(root)
    csv_path, img_dir = root / csv, root / images
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found; a Severstal-format folder holds "
                        f"{csv} and {images}/")
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: folder not found; expected the images next to {csv}")
    class_names = [str(c) for c in class_names]
    df = _read_csv(csv_path)
    cols = list(df.columns)
    if cols == CURRENT_COLUMNS:
        image_col = df["ImageId"].str.strip()
        class_col = df["ClassId"].str.strip()
    elif cols == ORIGINAL_COLUMNS:
        both = df["ImageId_ClassId"].str.strip()
        bad = ~both.str.contains("_", regex=False)
        if bad.any():
            r = int(np.argmax(bad.to_numpy()))
            raise DataError(f"{csv_path}, line {_line(r)}: ImageId_ClassId {both.iloc[r]!r} "
                            f"has no '_'; expected '<image>_<class id>'")
        split = both.str.rsplit("_", n=1, expand=True)
        image_col, class_col = split[0], split[1]
    else:
        raise DataError(f"{csv_path}: header is {cols}; expected {CURRENT_COLUMNS} (current "
                        f"Kaggle file) or {ORIGINAL_COLUMNS} (original competition file)")
    rle_col = df["EncodedPixels"].str.strip()

    on_disk = _list_images(img_dir)
    if cols == ORIGINAL_COLUMNS:  # four rows per image: an image without its rows is an error
        missing = sorted(set(on_disk) - set(image_col))
        if missing:
            raise DataError(f"{img_dir / missing[0]} has no row in {csv_path} ({len(missing)} such "
                            f"images); the original competition layout lists every image with "
                            f"its {len(class_names)} rows (empty EncodedPixels = no defect)")
    ids = sorted(set(on_disk) | set(image_col))
    pos = {name: k for k, name in enumerate(ids)}
    cls_pos = {name: c for c, name in enumerate(class_names)}
    rles: list[dict[int, str]] = [{} for _ in ids]
    seen: dict[tuple[str, int], int] = {}
    for r, (img, cid, rle) in enumerate(zip(image_col, class_col, rle_col)):
        if not img:
            raise DataError(f"{csv_path}, line {_line(r)}: empty image id")
        if cid not in cls_pos:
            raise DataError(f"{csv_path}, line {_line(r)}: class id {cid!r} for image {img!r} "
                            f"is not in the class list {class_names}")
        c = cls_pos[cid]
        if (img, c) in seen:
            raise DataError(f"{csv_path}, line {_line(r)}: duplicated row for image {img!r}, "
                            f"class {cid!r} (first at line {_line(seen[(img, c)])}); "
                            f"expected one row per (image, class)")
        seen[(img, c)] = r
        if img not in on_disk:
            if Path(img).name != img or img in (".", ".."):
                raise DataError(f"{csv_path}, line {_line(r)}: ImageId {img!r} is a path; "
                                f"expected the file name of an image inside {img_dir}/")
            raise DataError(f"{csv_path}, line {_line(r)}: image {img!r} is listed but "
                            f"{img_dir / img} does not exist")
        if rle:
            rles[pos[img]][c] = rle
    if not ids:
        raise DataError(f"{root}: empty dataset: no images in {img_dir} and no rows in "
                        f"{csv_path}")
    paths = [on_disk[i] for i in ids]
    shapes = _check_images(paths, check)
    _check_one_size(shapes, paths)
    # validate every RLE against its image's size now, so a bad row fails at load, named
    labels = np.zeros((len(ids), len(class_names)), dtype=np.uint8)
    for k, d in enumerate(rles):
        h, w = (int(v) for v in shapes[k])
        for c, rle in d.items():
            try:
                parse_rle(rle, h * w)
            except DataError as e:
                r = seen[(ids[k], c)]
                raise DataError(f"{csv_path}, line {_line(r)} (image {ids[k]!r}, class "
                                f"{class_names[c]!r}, image {h}x{w}): {e}") from None
            labels[k, c] = 1
    info = _read_info(root)
    return DatasetIndex(root=root, format="severstal", class_names=list(class_names),
                        image_ids=ids, image_paths=paths, labels=labels, shapes=shapes,
                        has_masks=True, rles=rles, csv_path=csv_path, info=info)


def _check_one_size(shapes: np.ndarray, paths: Sequence[Path]) -> None:
    """Severstal layout: every image has the size of the others. train.csv's run-length codes
    number pixels down each column, so an image of another size would have its masks decoded at
    other places (a DataError naming it, both sizes and the way out)."""
    if len(shapes) < 2:
        return
    sizes, counts = np.unique(shapes, axis=0, return_counts=True)
    if len(sizes) == 1:
        return
    common = sizes[np.argmax(counts)]
    ch, cw = (int(v) for v in common)
    k = int(np.flatnonzero((shapes != common).any(1))[0])
    h, w = (int(v) for v in shapes[k])
    raise DataError(f"{paths[k]}: {h}x{w} (HxW), but {counts.max()} of the {len(shapes)} images "
                    f"are {ch}x{cw}; in the Severstal layout every image has one size, because "
                    f"train.csv's run-length codes number the pixels down each column of that "
                    f"size. Resize it to {ch}x{cw}, or use the generic layout (labels.csv, "
                    f"masks/<class>/*.png) for images of several sizes")


def load_generic(root: str | Path, check: str = "header") -> DatasetIndex:
    """Read a generic-format folder: ``images/``, ``labels.csv``, optional ``masks/<class>/``."""
    root = Path(root)
    csv_path, img_dir, mask_dir = root / "labels.csv", root / "images", root / "masks"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found; a generic-format folder holds labels.csv "
                        f"and images/ (and optionally masks/<class>/)")
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: folder not found; expected the images next to labels.csv")
    df = _read_csv(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        header = next(_csv.reader(f), [])  # pandas would rename a repeated column silently
    cols = [c.strip() for c in header]
    if not cols or cols[0] != "image":
        raise DataError(f"{csv_path}: first column is {cols[0] if cols else None!r}; expected "
                        f"'image', then one 0/1 column per class")
    class_names = cols[1:]
    if not class_names:
        raise DataError(f"{csv_path}: no class columns; expected 'image' then one 0/1 column "
                        f"per class (header = class names)")
    dup = [c for c in set(class_names) if class_names.count(c) > 1]
    if dup:
        raise DataError(f"{csv_path}: class column {dup[0]!r} appears more than once")
    for c in class_names:
        check_class_name(c, f"{csv_path}, line 1")
    if len(df) == 0:
        raise DataError(f"{csv_path}: empty dataset: no rows under the header")
    on_disk = _list_images(img_dir)
    stem_map: dict[str, list[str]] = {}
    for name in on_disk:
        stem_map.setdefault(Path(name).stem, []).append(name)
    ids, paths, seen = [], [], {}
    labels = np.zeros((len(df), len(class_names)), dtype=np.uint8)
    for r in range(len(df)):
        name = str(df.iat[r, 0]).strip()
        if not name:
            raise DataError(f"{csv_path}, line {_line(r)}: empty 'image' value")
        if name in on_disk:
            fname = name
        else:
            cands = stem_map.get(name, [])
            if not cands:
                raise DataError(f"{csv_path}, line {_line(r)}: image {name!r} is listed but no "
                                f"file {name} or {name}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}> "
                                f"exists in {img_dir}")
            if len(cands) > 1:
                raise DataError(f"{csv_path}, line {_line(r)}: image {name!r} is ambiguous: "
                                f"{cands} all exist in {img_dir}; name it with its extension")
            fname = cands[0]
        stem = Path(fname).stem
        if stem in seen:
            raise DataError(f"{csv_path}, line {_line(r)}: image {name!r} is listed again "
                            f"(first at line {_line(seen[stem])}); expected one row per image")
        seen[stem] = r
        for c, cname in enumerate(class_names):
            v = str(df.iat[r, c + 1]).strip()
            if v not in ("0", "1"):
                raise DataError(f"{csv_path}, line {_line(r)}, column {cname!r}: value {v!r}; "
                                f"expected 0 or 1")
            labels[r, c] = int(v)
        ids.append(stem)
        paths.append(on_disk[fname])
    unlisted = sorted(set(on_disk) - {p.name for p in paths})
    if unlisted:
        raise DataError(f"{img_dir / unlisted[0]} is not listed in {csv_path} "
                        f"({len(unlisted)} such images); add a row for each (all zeros for a "
                        f"defect-free image) or move them out of {img_dir}")
    shapes = _check_images(paths, check)
    has_masks = mask_dir.is_dir()
    mask_paths: list[dict[int, Path]] | None = None
    if has_masks:
        mask_paths = [{} for _ in ids]
        pos = {s: k for k, s in enumerate(ids)}
        cls_pos = {n: c for c, n in enumerate(class_names)}
        for sub in sorted(mask_dir.iterdir()):
            if not sub.is_dir():
                raise DataError(f"{sub}: unexpected file in {mask_dir}; expected one folder per "
                                f"class, named as in labels.csv: {class_names}")
            if sub.name not in cls_pos:
                raise DataError(f"{sub}: class folder {sub.name!r} is not a class of "
                                f"{csv_path}: {class_names}")
            c = cls_pos[sub.name]
            for mp in sorted(sub.iterdir()):
                if mp.suffix.lower() != ".png":
                    raise DataError(f"{mp}: expected only <image name>.png mask files in {sub}")
                if mp.stem not in pos:
                    raise DataError(f"{mp}: no image {mp.stem!r} is listed in {csv_path}")
                k = pos[mp.stem]
                # read whole now (not only its header), so that a mask contradicting its label
                # fails before any work starts
                mask = read_mask_png(mp)
                mh, mw = mask.shape
                if (mh, mw) != tuple(int(v) for v in shapes[k]):
                    raise DataError(f"{mp}: mask is {mh}x{mw} (HxW) but image {paths[k]} is "
                                    f"{shapes[k][0]}x{shapes[k][1]}; a mask must have its "
                                    f"image's size")
                has_defect = bool(mask.any())
                line = _line(seen[ids[k]])
                if has_defect and not labels[k, c]:
                    raise DataError(f"{mp}: mask has defect pixels but {csv_path}, line {line} "
                                    f"gives class {sub.name!r} = 0 for image {ids[k]!r}")
                if labels[k, c] and not has_defect:
                    raise DataError(f"{mp}: mask is all black (no defect pixel) but {csv_path}, "
                                    f"line {line} gives class {sub.name!r} = 1 for image "
                                    f"{ids[k]!r}; draw the defect, or set the label to 0")
                mask_paths[k][c] = mp
        for k, sid in enumerate(ids):
            for c in np.flatnonzero(labels[k]):
                if c not in mask_paths[k]:
                    raise DataError(
                        f"{csv_path}, line {_line(seen[sid])}: image {sid!r} has class "
                        f"{class_names[c]!r} = 1 but {mask_dir / class_names[c] / (sid + '.png')} "
                        f"is missing; with a masks/ folder every positive label needs its mask")
    return DatasetIndex(root=root, format="generic", class_names=class_names, image_ids=ids,
                        image_paths=paths, labels=labels, shapes=shapes, has_masks=has_masks,
                        mask_paths=mask_paths, csv_path=csv_path, info=_read_info(root))


def load_dataset(root: str | Path, check: str = "header") -> DatasetIndex:
    """Read a dataset folder in either format, told apart by ``train.csv`` / ``labels.csv``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if (root / "train.csv").is_file():
        return load_severstal(root, check=check)
    if (root / "labels.csv").is_file():
        return load_generic(root, check=check)
    raise DataError(f"{root}: neither train.csv + train_images/ (Severstal format) nor "
                    f"labels.csv + images/ (generic format) found")


INFO_FILE = "cam2mask_dataset.json"


def _read_info(root: Path) -> dict:
    p = root / INFO_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
