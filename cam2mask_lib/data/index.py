"""The index: what a dataset folder holds (ids, paths, labels, masks), validated, and the
readers of its image and mask files."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..utils import display_path, stable_hash
from .errors import DataError
from .rle import rle_decode


SEVERSTAL_CLASSES = ("1", "2", "3", "4")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

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
