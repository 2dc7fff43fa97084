"""Data layer: read, validate, RLE <-> mask, dataset object, multi-label stratified folds.

Two on-disk formats are read into one :class:`DatasetIndex`:

* **Severstal** (Kaggle "Severstal: Steel Defect Detection"): ``train_images/*.jpg`` and
  ``train.csv``, either the current ``ImageId,ClassId,EncodedPixels`` (only non-empty masks listed;
  images in the folder but absent from the file are defect-free) or the original competition file
  ``ImageId_ClassId,EncodedPixels`` (four rows per image, empty = no mask). The synthetic set that
  ``cam2mask synth`` writes uses the current format.
* **Generic**, for anyone's data: ``images/<name>.<png|jpg|jpeg|bmp>``, ``labels.csv`` (column
  ``image`` then one 0/1 column per class, header = class names) and optionally
  ``masks/<class>/<name>.png`` (nonzero = defect).

Nothing downstream assumes four classes or Severstal's image size: the index carries the class
names and each image's own shape, and :class:`ImageDataset` resizes to the profile's input size.

Bad input raises :class:`DataError` naming the file, the line (CSV lines count from 1 = header)
and what was expected. Nothing is skipped silently.
"""
from __future__ import annotations

import copy
import csv as _csv
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from numpy.lib.format import open_memmap
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .utils import ConfigError, UserError, atomic_write_text, bars, display_path, stable_hash

SEVERSTAL_SHAPE = (256, 1600)
SEVERSTAL_CLASSES = ("1", "2", "3", "4")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# ImageNet statistics, as timm.data.IMAGENET_DEFAULT_MEAN / _STD (a test checks they agree).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CURRENT_COLUMNS = ["ImageId", "ClassId", "EncodedPixels"]
ORIGINAL_COLUMNS = ["ImageId_ClassId", "EncodedPixels"]


class DataError(UserError, ValueError):
    """Input data that does not have the expected form. The message names the file, the line or
    item, and what was expected."""


# --------------------------------------------------------------------------------------------
# Run-length encoding (Kaggle semantics)
# --------------------------------------------------------------------------------------------

def parse_rle(rle: str | float | None, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a Kaggle RLE string and return 0-based ``starts`` and ``lengths`` (int64).

    The string is "start length start length ...", starts 1-based, pixels numbered top-to-bottom
    then left-to-right (column-major). An empty string, ``None`` or NaN is the empty mask.
    Raises :class:`DataError` for an odd number of values, a non-integer, a start below 1, a
    length below 1, runs that are unsorted or overlap, or a run past pixel ``n_pixels``.
    """
    if rle is None or (isinstance(rle, float) and math.isnan(rle)):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not isinstance(rle, str):
        raise DataError(f"RLE must be a string of integers, got {type(rle).__name__} {rle!r}")
    tokens = rle.split()
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(tokens) % 2:
        raise DataError(
            f"RLE has {len(tokens)} values; expected an even count of 'start length' pairs")
    try:
        ints = [int(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not re.fullmatch(r"[+-]?\d+", t))
        raise DataError(f"RLE value {bad!r} is not an integer") from None
    big = next((t for t, v in zip(tokens, ints) if abs(v) >= 2**62), None)  # past int64's range
    if big is not None:
        raise DataError(f"RLE value {big} is too large: the image has {n_pixels} pixels")
    values = np.array(ints, dtype=np.int64)
    starts, lengths = values[0::2] - 1, values[1::2]
    if (starts < 0).any():
        i = int(np.argmax(starts < 0))
        raise DataError(f"RLE run {i + 1} starts at {starts[i] + 1}; starts are 1-based (>= 1)")
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise DataError(f"RLE run {i + 1} has length {lengths[i]}; lengths must be >= 1")
    ends = starts + lengths  # exclusive
    if len(starts) > 1:
        bad = starts[1:] < ends[:-1]
        if bad.any():
            i = int(np.argmax(bad)) + 1
            kind = "is not after" if starts[i] < starts[i - 1] else "overlaps"
            raise DataError(
                f"RLE run {i + 1} (start {starts[i] + 1}) {kind} run {i} "
                f"(pixels {starts[i - 1] + 1}-{ends[i - 1]}); runs must be sorted and disjoint")
    if len(ends) and ends[-1] > n_pixels:
        raise DataError(
            f"RLE run {len(ends)} ends at pixel {ends[-1]}, past the image end "
            f"({n_pixels} pixels)")
    return starts, lengths


def rle_decode(rle: str | float | None, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> np.ndarray:
    """Decode a Kaggle RLE string into a uint8 0/1 mask of ``shape`` (height, width)."""
    h, w = int(shape[0]), int(shape[1])
    starts, lengths = parse_rle(rle, h * w)
    flat = np.zeros(h * w + 1, dtype=np.int8)
    # parse_rle checked that runs are sorted and disjoint: no start repeats, no end repeats (an
    # end may be the next run's start, hence two statements), so plain indexing suffices
    flat[starts] = 1
    flat[starts + lengths] -= 1
    flat = np.cumsum(flat[:-1], dtype=np.int8).view(np.uint8)
    return flat.reshape((w, h)).T.copy()  # column-major pixel order


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (nonzero = foreground) as a Kaggle RLE string; the empty mask gives ""."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    flat = (mask.T.reshape(-1) != 0).astype(np.int8)  # column-major
    padded = np.concatenate([[0], flat, [0]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


# --------------------------------------------------------------------------------------------
# The index: what a dataset folder holds, validated
# --------------------------------------------------------------------------------------------

@dataclass
class DatasetIndex:
    """A validated dataset: image ids, paths, labels and the source of each mask.

    ``labels[i, c]`` is 1 when image ``i`` shows class ``class_names[c]``. ``shapes[i]`` is the
    image's own (height, width). Masks come from ``rles[i][c]`` (Severstal) or
    ``mask_paths[i][c]`` (generic); an absent entry is the empty mask.
    """

    root: Path
    format: str  # "severstal" or "generic"
    class_names: list[str]
    image_ids: list[str]
    image_paths: list[Path]
    labels: np.ndarray
    shapes: np.ndarray
    has_masks: bool
    rles: list[dict[int, str]] | None = None
    mask_paths: list[dict[int, Path]] | None = None
    csv_path: Path | None = None
    info: dict = field(default_factory=dict)
    _fingerprints: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def fingerprint(self, masks: bool = True) -> str:
        """A short hash of what the data is: the image ids, every image file's bytes, the labels
        and (with ``masks``) every mask (its RLE, or its PNG's bytes). Caches keyed by it notice
        an image or a mask that was replaced or edited in place, not only renamed."""
        if masks not in self._fingerprints:
            if "images" not in self._fingerprints:  # read once for both fingerprints
                self._fingerprints["images"] = [_file_digest(p) for p in self.image_paths]
            parts = [list(self.image_ids), self._fingerprints["images"], self.labels.tolist()]
            if masks and self.rles is not None:
                parts.append([sorted(d.items()) for d in self.rles])
            elif masks and self.mask_paths is not None:
                parts.append([[(c, _file_digest(p)) for c, p in sorted(d.items())]
                              for d in self.mask_paths])
            self._fingerprints[masks] = stable_hash(parts, n=16)
        return self._fingerprints[masks]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_synthetic(self) -> bool:
        return bool(self.info.get("synthetic"))

    def describe(self) -> str:
        """One line for notebooks and tables: what data this is."""
        what = (f"synthetic steel-defect set (cam2mask synth, seed {self.info.get('seed')}, "
                f"generator v{self.info.get('generator_version')})" if self.is_synthetic
                else f"{self.format}-format folder")
        return (f"{what} at {display_path(self.root)}: {len(self)} images, classes "
                f"{self.class_names}")

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 RGB ``[H, W, 3]`` at its own size."""
        return read_image(self.image_paths[i])

    def mask(self, i: int) -> np.ndarray:
        """All class masks of image ``i`` as uint8 0/1 ``[C, H, W]`` at the image's own size."""
        h, w = (int(v) for v in self.shapes[i])
        out = np.zeros((self.num_classes, h, w), dtype=np.uint8)
        if self.rles is not None:
            for c, rle in self.rles[i].items():
                out[c] = rle_decode(rle, (h, w))
        elif self.mask_paths is not None:
            for c, p in self.mask_paths[i].items():
                out[c] = read_mask_png(p, (h, w))
                if out[c].any() and not self.labels[i, c]:
                    raise DataError(
                        f"{p}: mask has defect pixels but labels.csv gives class "
                        f"{self.class_names[c]!r} = 0 for image {self.image_ids[i]!r}")
        return out

    def mask_area(self, i: int, c: int) -> int:
        """Pixel count of the mask of image ``i``, class ``c`` at the image's own size."""
        if self.rles is not None:
            rle = self.rles[i].get(c)
            if not rle:
                return 0
            return int(np.asarray(rle.split()[1::2], dtype=np.int64).sum())
        return int(self.mask(i)[c].sum())

    def subset(self, rows: Sequence[int]) -> "DatasetIndex":
        rows = list(rows)
        pick = lambda xs: None if xs is None else [xs[r] for r in rows]  # noqa: E731
        return DatasetIndex(
            root=self.root, format=self.format, class_names=list(self.class_names),
            image_ids=pick(self.image_ids), image_paths=pick(self.image_paths),
            labels=self.labels[rows], shapes=self.shapes[rows], has_masks=self.has_masks,
            rles=pick(self.rles), mask_paths=pick(self.mask_paths), csv_path=self.csv_path,
            info=dict(self.info))

    def table(self) -> pd.DataFrame:
        """One row per image: id, height, width and a 0/1 column per class."""
        df = pd.DataFrame({"image_id": self.image_ids,
                           "height": self.shapes[:, 0], "width": self.shapes[:, 1]})
        for c, name in enumerate(self.class_names):
            df[name] = self.labels[:, c]
        return df


def _file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes (about 1 GB/s: 1,600 JPEGs of 256x1600 in a fraction of a
    second)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").hexdigest()[:24]
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing") from None


def read_image(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB ``[H, W, 3]``; a corrupt or unreadable file raises DataError."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey: scale, do not clip
                return _grey16_to_rgb8(np.asarray(im), path)
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e}); expected a readable "
                        f"PNG/JPEG/BMP file") from None


def _grey16_to_rgb8(a: np.ndarray, path: Path) -> np.ndarray:
    """A 16-bit grey image (0-65535) as 8-bit RGB: divided by 257, so 65535 -> 255 (PIL's own
    conversion clips every value above 255 to white)."""
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() > 65535:
        raise DataError(f"{path}: integer image with values {a.min()}..{a.max()}; expected 8-bit "
                        f"or 16-bit (0-65535) pixels")
    g = np.rint(a / 257.0).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


# how each format ends: a file cut short lacks its end marker (JPEG's EOI, PNG's IEND chunk)
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND"}
_TAIL = 4096


def check_complete(paths: Sequence[Path]) -> None:
    """Refuse a truncated image without decoding every file: a JPEG or PNG whose last bytes lack
    the format's end marker is decoded in full, and a file that then fails is a DataError
    naming it (a complete file with a long trailer passes). Cheap enough to run before a long
    job claims its output."""
    for p in paths:
        marker = _END_MARKERS.get(Path(p).suffix.lower())
        if marker is None:
            continue
        try:
            with open(p, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - _TAIL))
                tail = f.read()
        except OSError as e:
            raise DataError(f"{p}: cannot read image ({e.strerror or e})") from None
        if marker not in tail:
            read_image(Path(p))  # raises, naming the file, when it is truncated


def read_mask_png(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask PNG (any mode; nonzero = defect) as uint8 0/1 ``[H, W]``."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask image ({e})") from None
    if shape is not None and arr.shape != tuple(shape):
        raise DataError(f"{path}: mask is {arr.shape[0]}x{arr.shape[1]} (HxW) but its image is "
                        f"{shape[0]}x{shape[1]}; a mask must have its image's size")
    return (arr != 0).astype(np.uint8)


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


# --------------------------------------------------------------------------------------------
# Dataset object at the profile's input size
# --------------------------------------------------------------------------------------------

def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 ``[H, W, 3]`` to ``size`` = (height, width), antialiased bilinear."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    return np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 0/1 masks ``[..., H, W]`` to ``size`` with nearest neighbour."""
    h, w = size
    if mask.shape[-2:] == (h, w):
        return mask
    flat = mask.reshape(-1, *mask.shape[-2:])
    out = np.zeros((len(flat), h, w), mask.dtype)  # an empty mask (most of them) stays empty
    for k, m in enumerate(flat):
        if m.any():
            out[k] = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
    return out.reshape(*mask.shape[:-2], h, w)


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[..., 3, H, W]`` -> float32 in [0, 1], ImageNet-normalised, on ``x``'s
    device; the same operations in the same order for one image or a batch, so a batch
    normalised on the device equals the dataset's float items bit for bit (tested)."""
    x = x.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class _MappedFile:
    """Where a memory-mapped array's bytes lie (how :class:`ImageDataset` pickles one)."""

    path: Path
    offset: int
    shape: tuple
    dtype: str


class ImageDataset:
    """A torch-style dataset over a :class:`DatasetIndex` at a fixed input size.

    ``ds[i]`` is a dict: ``image`` float32 tensor ``[3, H, W]`` (ImageNet-normalised unless
    ``normalize=False``), ``labels`` float32 ``[C]``, ``masks`` uint8 ``[C, H, W]`` when the data
    has masks and ``with_masks``, ``index`` and ``image_id``. ``cache=True`` keeps the resized
    uint8 arrays in memory after the first read (worth it for small profiles: no JPEG decoding
    per epoch). ``rows`` restricts it to a subset (e.g. one fold).

    ``decode_device``: the batches of :meth:`loader` are decoded there instead of in the
    workers, which then only read each JPEG's bytes: one batched ``torchvision.io.decode_jpeg``
    call per batch (nvJPEG on CUDA), resized there when the files are not at ``size``
    (:func:`decode_jpeg_batch`). Every image must be a JPEG. Single items (``ds[k]``,
    :meth:`arrays`) are still decoded by PIL.
    """

    def __init__(self, index: DatasetIndex, size: tuple[int, int], rows: Iterable[int] | None = None,
                 with_masks: bool = True, normalize: bool = True, cache: bool = False,
                 array: np.ndarray | None = None, decode_device: torch.device | str | None = None):
        self.index = index
        self.size = (int(size[0]), int(size[1]))
        self.rows = np.arange(len(index)) if rows is None else np.asarray(list(rows), dtype=int)
        self.with_masks = with_masks and index.has_masks
        self.normalize = normalize
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = {} if cache else None
        self.class_names = list(index.class_names)
        if array is not None and array.shape[:3] != (len(index), *self.size):
            raise ValueError(f"array has shape {array.shape}; expected ({len(index)}, "
                             f"{self.size[0]}, {self.size[1]}, 3)")
        self.array = array  # resized uint8 images [N, H, W, 3] of the whole index, e.g. memory-mapped
        self._loaders: dict[tuple[int, int], RowLoader] = {}
        self.decode_device = None if decode_device is None else torch.device(decode_device)
        if self.decode_device is not None:
            if array is not None or cache:
                raise ConfigError("decoding on the device reads the JPEG files for every batch; "
                                  "it cannot be combined with a cache of decoded images "
                                  "(cache_images)")
            check_jpegs([index.image_paths[i] for i in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        """Pickled (e.g. for a fold's own process) without its decoded images, worker processes
        or mapped bytes: a memory-mapped ``array`` travels as its file's name and is mapped
        again on the other side."""
        state = dict(self.__dict__, _loaders={})
        if self._cache is not None:
            state["_cache"] = {}
        a = self.array
        if isinstance(a, np.memmap) and a.filename and a.flags.c_contiguous:
            state["array"] = _MappedFile(Path(a.filename), a.offset, a.shape, a.dtype.str)
        return state

    def __setstate__(self, state: dict) -> None:
        a = state.get("array")
        if isinstance(a, _MappedFile):
            state["array"] = np.memmap(a.path, dtype=np.dtype(a.dtype), mode="r", offset=a.offset,
                                       shape=a.shape)
        self.__dict__.update(state)

    def arrays(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Resized uint8 image ``[H, W, 3]`` and masks ``[C, H, W]`` (or None) of item ``k``."""
        i = int(self.rows[k])
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = (np.array(self.array[i]) if self.array is not None
               else resize_image(self.index.image(i), self.size))
        masks = resize_mask(self.index.mask(i), self.size) if self.with_masks else None
        if self._cache is not None:
            self._cache[i] = (img, masks)
        return img, masks

    def batch(self, ks) -> torch.Tensor:
        """The images of items ``ks`` stacked into one float32 tensor ``[len(ks), 3, H, W]``."""
        return torch.stack([self[int(k)]["image"] for k in ks])

    def uint8_batch(self, ks) -> torch.Tensor:
        """The images of items ``ks`` as uint8 ``[len(ks), 3, H, W]``: a quarter of the bytes to
        move, normalised where the network runs (:func:`normalize_images`, ``device.to_model``).
        With ``decode_device``, decoded there in one call."""
        if self.decode_device is not None:
            return decode_jpeg_batch([self._jpeg_bytes(int(k)) for k in ks], self.size,
                                     self.decode_device)
        return torch.stack([_chw(self.arrays(int(k))[0]) for k in ks])

    def batches(self, order, batch_size: int, num_workers: int = 0):
        """``(rows, uint8 images [b, 3, H, W])`` for consecutive batches of ``order``: read by
        the persistent workers of :meth:`loader` (in pinned memory on CUDA) when ``num_workers``
        > 0, else in this process (:meth:`uint8_batch`). The same images either way (tests)."""
        order = np.asarray(order)
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        if num_workers > 0:  # the loader first, so that zip runs it to its end
            for item, b in zip(self.loader(batch_size, num_workers)(order), chunks):
                yield b, item["image"]
            return
        for b in chunks:
            yield b, self.uint8_batch(b)

    def raw(self) -> "ImageDataset":
        """The same dataset whose items carry uint8 images (for DataLoader workers)."""
        twin = copy.copy(self)
        twin._raw = True
        twin._loaders = {}  # the workers' copy holds no loader (nothing to pickle or to nest)
        return twin

    def loader(self, batch_size: int, num_workers: int) -> "RowLoader":
        """The dataset's :class:`RowLoader` for this batch size and worker count, made on first
        use: its workers persist across every epoch and prediction pass of the process."""
        key = (int(batch_size), int(num_workers))
        if key not in self._loaders:
            self._loaders[key] = RowLoader(self, batch_size, num_workers)
        return self._loaders[key]

    def __getitem__(self, k: int) -> dict:
        raw = getattr(self, "_raw", False)
        i = int(self.rows[k])
        if raw and self.decode_device is not None:  # the file's bytes, decoded on the device
            x = self._jpeg_bytes(k)
            masks = resize_mask(self.index.mask(i), self.size) if self.with_masks else None
        else:
            img, masks = self.arrays(k)
            x = _chw(img)
            if not raw:
                x = normalize_images(x) if self.normalize else x.float().div_(255.0)
        item = {"image": x, "labels": torch.from_numpy(self.index.labels[i].astype(np.float32)),
                "index": i, "image_id": self.index.image_ids[i]}
        if masks is not None:
            item["masks"] = torch.from_numpy(masks)
        return item

    def _jpeg_bytes(self, k: int) -> torch.Tensor:
        """Item ``k``'s JPEG file as its bytes (a 1-D uint8 tensor)."""
        path = self.index.image_paths[int(self.rows[k])]
        try:
            return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        except FileNotFoundError:
            raise DataError(f"{path}: image file is missing") from None


JPEG_SUFFIXES = (".jpg", ".jpeg")


def check_jpegs(paths: Sequence[Path]) -> None:
    """Every path names a JPEG file (by its suffix), else a ConfigError naming the first that
    does not: ``torchvision.io.decode_jpeg`` decodes nothing else."""
    for p in paths:
        if Path(p).suffix.lower() not in JPEG_SUFFIXES:
            raise ConfigError(f"{p}: not a JPEG file; decoding on the device (classifier "
                              f"decode='device') reads JPEG files only: use decode='workers'")


def decode_jpeg_batch(data: Sequence[torch.Tensor], size: tuple[int, int],
                      device: torch.device) -> torch.Tensor:
    """JPEG files' bytes (1-D uint8 tensors) -> uint8 RGB ``[B, 3, H, W]`` on ``device``: one
    batched ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA; on the CPU it is the same
    libjpeg-turbo decoding as PIL's, bit for bit, a test), each image resized to ``size`` there
    when it is not at that size (bilinear with antialiasing, as PIL's resize; rounding may differ
    by one grey level)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec, not in this stack
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        imgs = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(imgs), 3, *size), dtype=torch.uint8, device=device)
    for k, img in enumerate(imgs):
        if tuple(img.shape[-2:]) != tuple(size):
            img = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
            img = img.round_().clamp_(0, 255).to(torch.uint8)
        out[k] = img
    return out


def _collate(items: list[dict]) -> dict:
    """DataLoader's default collation, except encoded images (byte strings of different
    lengths), which stay a list."""
    if items and items[0]["image"].dtype == torch.uint8 and items[0]["image"].dim() == 1:
        rest = torch.utils.data.default_collate([{k: v for k, v in it.items() if k != "image"}
                                                 for it in items])
        return {"image": [it["image"] for it in items], **rest}
    return torch.utils.data.default_collate(items)


class _RowBatches:
    """Batch sampler of a :class:`RowLoader`: the rows of the current pass, in order, in
    batches (read in the main process, so a persistent loader's workers see each pass's rows)."""

    def __init__(self, batch_size: int):
        self.batch_size, self.rows = int(batch_size), []

    def __iter__(self):
        rows = self.rows
        for s in range(0, len(rows), self.batch_size):
            yield rows[s:s + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)


class RowLoader:
    """uint8 batches (``ImageDataset.raw`` items) of any rows of a dataset, decoded and resized by
    DataLoader workers that are started once and persist across passes (epochs, validation,
    out-of-fold prediction, BatchNorm updates): each pass only sends its row order. Batches arrive
    in pinned memory when CUDA is present. With the dataset's ``decode_device`` the workers read
    the JPEG files' bytes and each batch is decoded there (:func:`decode_jpeg_batch`). One pass
    at a time."""

    def __init__(self, ds: "ImageDataset", batch_size: int, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"a RowLoader needs workers, got num_workers={num_workers}")
        self.sampler = _RowBatches(batch_size)
        self.size, self.decode_device = ds.size, ds.decode_device
        self.loader = torch.utils.data.DataLoader(
            ds.raw(), batch_sampler=self.sampler, num_workers=num_workers, collate_fn=_collate,
            pin_memory=torch.cuda.is_available(), persistent_workers=True,
            # its own generator: a loader seeds its workers from the global generator otherwise,
            # which moves dropout's random stream and makes the weights depend on num_workers
            generator=torch.Generator().manual_seed(0))
        self._busy = False

    def __call__(self, rows):
        """The batches of ``rows`` (dataset items), in that order."""
        if self._busy:
            raise RuntimeError("this loader is already serving a pass; finish it first")
        self._busy = True
        try:
            self.sampler.rows = [int(r) for r in rows]
            for b in self.loader:
                if self.decode_device is not None:
                    b["image"] = decode_jpeg_batch(b["image"], self.size, self.decode_device)
                yield b
        finally:
            self._busy = False


# --------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------

def make_folds(labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Multi-label stratified K-fold: fold number (0..n_folds-1) for each row of ``labels``.

    Stratifies on every class and on "no defect", so each fold gets its share of every class and
    of clean images (iterative stratification, Sechidis et al. 2011, via the
    ``iterative-stratification`` package). Deterministic for a given seed.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n < n_folds:
        raise DataError(f"cannot split {n} images into {n_folds} folds; need at least "
                        f"{n_folds} images")
    y = np.concatenate([labels, (labels.sum(1) == 0)[:, None]], axis=1).astype(int)
    folds = np.full(n, -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(np.zeros(n), y)):
        folds[test] = f
    return folds


def image_array(index: DatasetIndex, size: tuple[int, int], folder: str | Path,
                progress: bool = True, source: np.ndarray | None = None) -> np.ndarray:
    """All images of ``index`` resized to ``size``, as a memory-mapped uint8 ``[N, H, W, 3]``
    stored once under ``folder`` (named by the images and the size) and reused by every stage:
    decoding 1600 JPEGs costs ~12 s per notebook, reading the array well under a second.
    ``source``: a larger array of the same images (e.g. the classifier's) to shrink instead of
    decoding every file again (the file name says so: ``..._from<h>x<w>``)."""
    h, w = size
    key = index.fingerprint(masks=False)[:12]  # the images' bytes: an edited image is noticed
    tag = "" if source is None else f"_from{source.shape[1]}x{source.shape[2]}"
    if source is not None and (len(source) != len(index) or source.shape[1] < h or source.shape[2] < w):
        raise ValueError(f"source array {source.shape} cannot make {len(index)} images of {h}x{w}")
    path = Path(folder) / f"images_{h}x{w}_{key}{tag}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    arr = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(index), h, w, 3))
    for i in tqdm(range(len(index)), desc="resizing images", disable=not bars(progress)):
        arr[i] = resize_image(index.image(i) if source is None else np.asarray(source[i]), size)
    arr.flush()
    del arr
    tmp.replace(path)
    return np.load(path, mmap_mode="r")


def folds_for(index: DatasetIndex, folder: str | Path, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """The dataset's folds, computed once and stored as ``folder/folds_k{n}_seed{s}.csv`` so that
    every stage uses the same split. A stored file for other images raises DataError rather than
    being overwritten."""
    path = Path(folder) / f"folds_k{n_folds}_seed{seed}.csv"
    if path.is_file():
        df = pd.read_csv(path, dtype={"image_id": str, "fold": int})
        if list(df["image_id"]) != list(index.image_ids):
            raise DataError(f"{path}: stored folds are for other images than {index.root}; "
                            f"delete the file (or the artifacts folder) to split again")
        return df["fold"].to_numpy()
    folds = make_folds(index.labels, n_folds, seed)
    df = pd.DataFrame({"image_id": index.image_ids, "fold": folds})
    atomic_write_text(path, df.to_csv(index=False))
    return folds
