"""Run-length encoding with Kaggle's semantics: validated parsing, decoding, encoding."""
from __future__ import annotations

import math
import re

import numpy as np

from .errors import DataError


SEVERSTAL_SHAPE = (256, 1600)

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
