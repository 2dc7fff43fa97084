"""A synthetic steel-defect dataset in exactly the Severstal on-disk format.

The real Kaggle data cannot be downloaded on the machines that build this project, so the default
run uses this generator. It writes ``train_images/<id>.jpg`` (grayscale stored as 3-channel JPEG,
like Severstal) and ``train.csv`` in the current Kaggle layout (``ImageId,ClassId,EncodedPixels``,
non-empty masks only), read by the same loader as the real data. ``cam2mask_dataset.json`` beside
them records that the set is synthetic, with the seed and generator version, so every table can
say what made its numbers.

What it imitates (statistics measured on real Severstal images, quoted in :mod:`cam2mask_lib.paper`
(``TEXTURE_RANGES``) from the project's brief, which is not part of this repository):

* sheet texture: mean intensity 43-110, fine grain (neighbour differences of a few grey levels),
  faint vertical streaks along the rolling direction, mottled low-frequency patches, a brightness
  gradient; now and then a near-black off-sheet band with a sharp vertical edge at the left or
  right; now and then chequered plate (a diamond relief over the whole sheet);
* class 1: small bright or dark pits in loose clusters; class 2: short thin near-vertical marks;
  class 3: long scratches roughly along the rolling direction (vertical or diagonal), often several,
  over large areas; class 4: large darker blotchy textured regions;
* masks as annotators draw them: a coarse polygon (convex hull) around the defect, widened by a
  margin, noticeably larger than the visible pixels;
* class frequencies: the paper's counts scaled to N (about 44% of images defect-free, class 3 the
  most common, class 2 the rarest, a few percent of defective images with two or three classes),
  with at least two images of every class so that small sets stay usable;
* difficulty: contrast varies and some defects are faint; every image, clean or not, carries
  defect-like texture (isolated pits, faint full-height rolling marks, mild dark mottling).

Every image draws from its own random stream (``seed``, image number), so the same seed gives the
same bytes, an interrupted run resumes where it stopped, and images can be made in any order.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from tqdm import tqdm

from . import paper
from .data import INFO_FILE, rle_encode
from .utils import ConfigError, atomic_write_bytes, atomic_write_text, bars, write_json

GENERATOR_VERSION = 2
CLASS_NAMES = ("1", "2", "3", "4")
PAPER_TOTAL = paper.TOTAL_IMAGES
PAPER_DEFECT_FREE = paper.DEFECT_FREE_IMAGES
PAPER_CLASS_COUNTS = tuple(paper.CLASS_COUNTS[c] for c in CLASS_NAMES)
PAPER_CLASSES_PER_IMAGE = tuple(paper.CLASSES_PER_IMAGE[k] for k in (1, 2, 3))
MIN_PER_CLASS = 2


@dataclass(frozen=True)
class SynthParams:
    n: int
    seed: int = 0
    height: int = 256
    width: int = 1600
    jpeg_quality: int = 92

    def check(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.height < 32 or self.width < 32:
            raise ConfigError(f"height and width must be >= 32, got {self.height}x{self.width}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def as_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "height": self.height, "width": self.width,
                "jpeg_quality": self.jpeg_quality, "generator_version": GENERATOR_VERSION}


# --------------------------------------------------------------------------------------------
# Which classes each image gets
# --------------------------------------------------------------------------------------------

def assign_labels(n: int, seed: int) -> np.ndarray:
    """Label matrix ``[n, 4]`` with the paper's frequencies scaled to ``n`` (quotas, then a
    seeded shuffle): about 44% clean, class shares 897:247:5150:801, ~6% of defective images
    with two or more classes, and at least ``MIN_PER_CLASS`` images per class when ``n`` allows."""
    rng = np.random.default_rng([seed, 0xC1A55])
    n_def = int(round(n * (1 - PAPER_DEFECT_FREE / PAPER_TOTAL)))
    n_def = min(n, max(n_def, min(n, MIN_PER_CLASS * 2)))
    labels = np.zeros((n, 4), dtype=np.uint8)
    if n_def == 0:
        return labels
    one, two, three = PAPER_CLASSES_PER_IMAGE
    n_three = int(round(n_def * three / (one + two + three)))
    n_two = int(round(n_def * two / (one + two + three)))
    if n_def >= 10:
        n_two = max(n_two, 1)
    extra = n_two + 2 * n_three  # second and third classes
    n_pairs = n_def + extra
    share = np.array(PAPER_CLASS_COUNTS, float) / sum(PAPER_CLASS_COUNTS)
    quota = np.maximum(np.floor(share * n_pairs).astype(int), min(MIN_PER_CLASS, n_def // 4 or 1))
    while quota.sum() < n_pairs:  # hand out the remainder by largest fractional part
        quota[np.argmax(share * n_pairs - quota)] += 1
    while quota.sum() > n_pairs:
        quota[np.argmax(quota)] -= 1
    pool = rng.permutation(np.repeat(np.arange(4), quota))
    defective = rng.permutation(n)[:n_def]
    first, rest = pool[:n_def], list(pool[n_def:])
    labels[defective, first] = 1
    # extra classes go to the chosen multi-class images (two extras each for three-class ones),
    # each to an image that does not have that class yet
    multi = rng.permutation(defective)[:n_two + n_three]
    slots = [int(i) for k, i in enumerate(multi) for _ in range(2 if k < n_three else 1)]
    for c in rest:
        j = next((j for j, i in enumerate(slots) if not labels[i, c]), None)
        if j is not None:
            labels[slots.pop(j), c] = 1
        else:  # every chosen image has c already: give it to another defective image
            free = [i for i in defective if not labels[i, c]]
            if free:
                labels[free[0], c] = 1
    return labels


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _smooth_noise(rng, shape, cell) -> np.ndarray:
    """Low-frequency noise, roughly unit std: a coarse random grid upsampled bicubically."""
    h, w = shape
    gh, gw = max(2, int(np.ceil(h / cell[0])) + 1), max(2, int(np.ceil(w / cell[1])) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def _hull_mask(points: np.ndarray, shape, margin: float) -> np.ndarray:
    """Annotator-style mask: convex hull of ``points`` ((y, x) rows) widened by ``margin`` px."""
    h, w = shape
    pts = np.asarray(points, float)
    pad = int(np.ceil(margin)) + 2
    y0, x0 = np.floor(pts.min(0)).astype(int) - pad
    y1, x1 = np.ceil(pts.max(0)).astype(int) + pad
    ph, pw = y1 - y0 + 1, x1 - x0 + 1
    canvas = Image.new("L", (pw, ph), 0)
    draw = ImageDraw.Draw(canvas)
    local = pts - [y0, x0]
    try:
        hull = local[ConvexHull(local).vertices] if len(local) >= 3 else local
    except QhullError:  # collinear points: a line
        hull = local
    xy = [(float(x), float(y)) for y, x in hull]
    if len(xy) >= 3:
        draw.polygon(xy, fill=1)
    else:
        draw.line(xy + xy[:1], fill=1, width=1)
    patch = np.asarray(canvas, dtype=bool)
    patch = ndimage.distance_transform_edt(~patch) <= margin
    out = np.zeros((h, w), dtype=np.uint8)
    ys, xs = slice(max(y0, 0), min(y1 + 1, h)), slice(max(x0, 0), min(x1 + 1, w))
    out[ys, xs] = patch[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
    return out


def _draw_lines(shape, lines, width) -> np.ndarray:
    """Rasterise polylines (lists of (y, x)) into a float32 [0, 1] layer, softened slightly."""
    h, w = shape
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for line, wd in zip(lines, width):
        draw.line([(float(x), float(y)) for y, x in line], fill=255, width=max(1, int(round(wd))))
    layer = np.asarray(canvas, dtype=np.float32) / 255.0
    return ndimage.gaussian_filter(layer, 0.6)


class _Sheet:
    """One image being drawn: background texture, then defects, then distractors."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.rng, self.h, self.w = rng, h, w
        self.sy, self.sx = h / 256.0, w / 1600.0
        self.s = float(np.sqrt(self.sy * self.sx))
        self.img = self._background()
        self.masks = np.zeros((4, h, w), dtype=np.uint8)

    # -- background ------------------------------------------------------------------------
    def _background(self) -> np.ndarray:
        rng, h, w, s = self.rng, self.h, self.w, self.s
        base = rng.uniform(55, 105)
        img = np.full((h, w), base, np.float32)
        # brightness varies mostly on large scales (glare, uneven lighting); mid-scale mottling
        # is mild, so defects stand out from the sheet as they do on real Severstal images
        img += _smooth_noise(rng, (h, w), (160 * self.sy, 260 * self.sx)) * rng.uniform(18, 32)
        img += _smooth_noise(rng, (h, w), (40 * self.sy, 60 * self.sx)) * rng.uniform(4, 9)
        img += _smooth_noise(rng, (h, w), (12 * self.sy, 16 * self.sx)) * rng.uniform(1.5, 3.5)
        # rolling-direction streaks: a column profile, slowly modulated along the height
        cols = ndimage.gaussian_filter1d(rng.standard_normal(w).astype(np.float32), 1.2 * s)
        cols /= cols.std() + 1e-6
        mod = 1 + 0.4 * _smooth_noise(rng, (h, 1), (64 * self.sy, 1))
        img += cols[None, :] * mod * rng.uniform(2.5, 6)
        yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        img += rng.uniform(-25, 25) * xx + rng.uniform(-10, 10) * yy
        if rng.random() < 0.12:  # chequered plate
            period = rng.uniform(18, 30) * s
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            ang = rng.uniform(0.8, 1.2)
            a, b = (x * ang + y) / period, (x * ang - y) / period
            relief = np.abs(np.sin(np.pi * a)) * np.abs(np.sin(np.pi * b))
            img += (relief - 0.5) * rng.uniform(10, 22)
        img += rng.normal(0, rng.uniform(3.5, 6.0), (h, w)).astype(np.float32)
        # off-sheet band: near-black, sharp, roughly vertical edge
        self.x_lo, self.x_hi = 0, w
        if rng.random() < 0.15:
            frac = rng.uniform(0.05, 0.3)
            edge0 = int(frac * w)
            slant = rng.uniform(-6, 6) * self.sx
            edge = (edge0 + slant * np.linspace(0, 1, h)).astype(int)
            dark = rng.uniform(3, 12) + rng.normal(0, 2.0, (h, w)).astype(np.float32)
            cols_idx = np.arange(w)[None, :]
            left = rng.random() < 0.5
            off = cols_idx < edge[:, None] if left else cols_idx >= (w - edge)[:, None]
            img = np.where(off, dark, img)
            pad = int(edge.max()) + int(8 * self.sx)
            self.x_lo, self.x_hi = (pad, w) if left else (0, w - pad)
        return img

    # -- helpers -----------------------------------------------------------------------------
    def _contrast(self) -> float:
        """Defect strength: mostly clear, sometimes faint."""
        return float(self.rng.uniform(0.35, 0.8) if self.rng.random() < 0.3 else
                     self.rng.uniform(0.7, 1.2))

    def _x(self, margin: float) -> float:
        lo, hi = self.x_lo + margin, self.x_hi - margin
        if hi <= lo:
            lo, hi = self.x_lo, max(self.x_lo + 1, self.x_hi)
        return float(self.rng.uniform(lo, hi))

    def _blob(self, cy, cx, r, amp):
        """Add a Gaussian spot; returns its pixel coordinates above 30% of the peak."""
        h, w = self.h, self.w
        k = int(np.ceil(3 * r)) + 1
        y0, y1 = max(0, int(cy) - k), min(h, int(cy) + k + 1)
        x0, x1 = max(0, int(cx) - k), min(w, int(cx) + k + 1)
        if y0 >= y1 or x0 >= x1:
            return np.zeros((0, 2))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)
        self.img[y0:y1, x0:x1] += amp * g
        sel = g > 0.3
        return np.stack([yy[sel], xx[sel]], 1)

    # -- defects -------------------------------------------------------------------------------
    def pits(self):
        """Class 1: loose clusters of small bright or dark pits."""
        rng, s = self.rng, self.s
        for _ in range(1 if rng.random() < 0.75 else 2):
            cy = rng.uniform(20 * self.sy, self.h - 20 * self.sy)
            cx = self._x(30 * self.sx)
            sign = 1 if rng.random() < 0.45 else -1
            k = self._contrast()
            pts = []
            for _ in range(rng.integers(3, 12)):
                py = np.clip(cy + rng.normal(0, 9 * self.sy), 2, self.h - 3)
                px = np.clip(cx + rng.normal(0, 12 * self.sx), 2, self.w - 3)
                r = rng.uniform(1.8, 4.2) * s
                amp = sign * rng.uniform(40, 80) * k * (1 if rng.random() < 0.85 else -1)
                pts.append(self._blob(py, px, r, amp))
            pts = np.concatenate(pts)
            if len(pts):
                self.masks[0] |= _hull_mask(pts, (self.h, self.w), rng.uniform(5, 10) * s)

    def marks(self):
        """Class 2: one to three short thin near-vertical marks."""
        rng, s = self.rng, self.s
        cx, cy = self._x(40 * self.sx), rng.uniform(0.25, 0.75) * self.h
        k, sign = self._contrast(), (1 if rng.random() < 0.4 else -1)
        for _ in range(rng.integers(1, 4)):
            length = rng.uniform(35, 110) * self.sy
            ang = np.deg2rad(rng.normal(0, 6))
            my = np.clip(cy + rng.normal(0, 15 * self.sy), length / 2, self.h - length / 2)
            mx = cx + rng.normal(0, 20 * self.sx)
            n = 6
            t = np.linspace(-0.5, 0.5, n)
            ys = my + t * length * np.cos(ang)
            xs = mx + t * length * np.sin(ang) + rng.normal(0, 0.6 * s, n)
            line = np.stack([ys, xs], 1)
            wd = rng.uniform(1.5, 3.0) * s
            layer = _draw_lines((self.h, self.w), [line], [wd])
            self.img += sign * rng.uniform(40, 70) * k * layer
            pts = np.argwhere(layer > 0.25)
            if len(pts):
                self.masks[1] |= _hull_mask(pts, (self.h, self.w), rng.uniform(6, 10) * s)

    def scratches(self):
        """Class 3: several long scratches along the rolling direction, over a large area."""
        rng, s = self.rng, self.s
        for _ in range(1 if rng.random() < 0.8 else 2):
            spread = rng.uniform(10, 260) * self.sx
            cx = self._x(spread / 2 + 15 * self.sx)
            ang0 = np.deg2rad(rng.normal(0, 12))
            k, sign = self._contrast(), (1 if rng.random() < 0.6 else -1)
            lines, widths = [], []
            for _ in range(rng.integers(1, 7)):
                length = rng.uniform(0.35, 1.1) * self.h
                y0 = rng.uniform(-0.1 * self.h, self.h - 0.5 * length)
                ang = ang0 + np.deg2rad(rng.normal(0, 4))
                x0 = cx + rng.uniform(-spread / 2, spread / 2)
                n = 12
                t = np.linspace(0, 1, n)
                ys = y0 + t * length * np.cos(ang)
                xs = x0 + t * length * np.sin(ang) + np.cumsum(rng.normal(0, 0.8 * s, n))
                keep = (ys > -5) & (ys < self.h + 5)
                if keep.sum() >= 2:
                    lines.append(np.stack([ys[keep], xs[keep]], 1))
                    widths.append(rng.uniform(1.5, 3.5) * s)
            if not lines:
                continue
            layer = _draw_lines((self.h, self.w), lines, widths)
            damage = np.clip(_smooth_noise(rng, (self.h, self.w), (8 * self.sy, 4 * self.sx)), 0, None)
            self.img += sign * rng.uniform(35, 65) * k * layer * (0.6 + 0.4 * damage)
            pts = np.argwhere(layer > 0.25)
            if len(pts):
                self.masks[2] |= _hull_mask(pts, (self.h, self.w), rng.uniform(8, 16) * s)

    def blotch(self):
        """Class 4: a large darker textured region (rolled-in material)."""
        rng, s = self.rng, self.s
        ry = rng.uniform(30, 110) * self.sy
        rx = rng.uniform(40, 170) * self.sx
        cy = rng.uniform(0.3, 0.7) * self.h
        cx = self._x(rx * 0.8)
        y, x = np.ogrid[0:self.h, 0:self.w]
        d = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        wobble = _smooth_noise(rng, (self.h, self.w), (18 * self.sy, 24 * self.sx))
        shape = (d + 0.35 * wobble) < 1.0
        if shape.sum() < 20:
            return
        soft = ndimage.gaussian_filter(shape.astype(np.float32), 3 * s)
        texture = 1 + 0.5 * _smooth_noise(rng, (self.h, self.w), (5 * self.sy, 5 * self.sx))
        k = self._contrast()
        self.img -= rng.uniform(18, 40) * k * soft * texture
        self.img += rng.normal(0, 4.0 * k, self.img.shape).astype(np.float32) * soft
        pts = np.argwhere(shape)
        step = max(1, len(pts) // 4000)
        self.masks[3] |= _hull_mask(pts[::step], (self.h, self.w), rng.uniform(6, 14) * s)

    # -- defect-like texture on every image --------------------------------------------------------
    def distractors(self):
        rng, s = self.rng, self.s
        for _ in range(rng.poisson(1.5)):  # isolated pits, not clustered
            self._blob(rng.uniform(3, self.h - 3), self._x(5), rng.uniform(1.0, 2.5) * s,
                       rng.choice([-1, 1]) * rng.uniform(10, 30))
        for _ in range(rng.poisson(0.8)):  # faint full-height rolling marks
            x = self._x(5)
            line = np.array([[-5, x], [self.h + 5, x + rng.normal(0, 3 * self.sx)]])
            self.img += rng.choice([-1, 1]) * rng.uniform(5, 12) * _draw_lines(
                (self.h, self.w), [line], [rng.uniform(1, 2) * s])
        if rng.random() < 0.3:  # mild dark mottling
            patch = np.clip(_smooth_noise(rng, (self.h, self.w), (50 * self.sy, 90 * self.sx)), 0, None)
            self.img -= rng.uniform(4, 10) * patch

    def render(self, classes) -> tuple[np.ndarray, np.ndarray]:
        draw = {0: self.pits, 1: self.marks, 2: self.scratches, 3: self.blotch}
        for c in classes:
            draw[c]()
        self.distractors()
        return np.clip(np.rint(self.img), 0, 255).astype(np.uint8), self.masks


def render_image(params: SynthParams, i: int, classes) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale uint8 image ``[H, W]`` and masks ``[4, H, W]`` of image ``i``."""
    rng = np.random.default_rng([params.seed, i, GENERATOR_VERSION])
    sheet = _Sheet(rng, params.height, params.width)
    img, masks = sheet.render(list(classes))
    return img, masks


def image_id(seed: int, i: int) -> str:
    return hashlib.sha1(f"cam2mask-synth-{seed}-{i}".encode()).hexdigest()[:9] + ".jpg"


# --------------------------------------------------------------------------------------------
# Writing a dataset (atomic, resumable)
# --------------------------------------------------------------------------------------------

def _make(job) -> tuple[int, str, bytes, dict]:
    """One image, ready to write: its number, file name, JPEG bytes and RLE per class."""
    params, i, classes = job
    img, masks = render_image(params, i, classes)
    rles = {str(c + 1): rle_encode(masks[c]) for c in classes if masks[c].any()}
    return i, image_id(params.seed, i), _jpeg_bytes(img, params.jpeg_quality), rles


def default_workers() -> int:
    """Processes that draw images: one per core (at most 8)."""
    return max(1, min(8, os.cpu_count() or 1))


def _made(jobs: list, workers: int):
    """``_make`` of every job, in order: in this process, or in ``workers`` processes (images
    draw from their own random streams, so the bytes do not depend on which process drew them)."""
    if workers <= 1 or len(jobs) < 2 * workers:
        yield from map(_make, jobs)
        return
    methods = multiprocessing.get_all_start_methods()  # fork: the children need no re-import
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_make, jobs, chunksize=4)


def generate(out: str | Path, n: int, seed: int = 0, height: int = 256, width: int = 1600,
             force: bool = False, progress: bool = True, jpeg_quality: int = 92,
             workers: int | None = 1) -> Path:
    """Write a synthetic Severstal-format dataset to ``out`` and return its path.

    If ``out`` already holds a finished set with the same parameters, nothing is done. Another
    non-empty ``out`` is refused unless ``force`` (then it is replaced). Work goes to
    ``out.partial/`` first: images are written atomically and logged, so an interrupted run resumes
    there, and the folder is renamed to ``out`` only when complete. ``workers``: processes that
    draw the images (the same bytes for any number; None: :func:`default_workers`).
    """

    params = SynthParams(n=n, seed=seed, height=height, width=width, jpeg_quality=jpeg_quality)
    params.check()
    if workers is None:
        workers = default_workers()
    if workers < 1:
        raise ConfigError(f"workers={workers}: must be >= 1")
    out = Path(out)
    info_path = out / INFO_FILE
    if out.exists() and any(out.iterdir()):
        same = False
        if info_path.is_file():
            try:
                same = json.loads(info_path.read_text())["params"] == params.as_dict()
            except (json.JSONDecodeError, KeyError):
                same = False
        if same:
            return out
        if not force:
            raise FileExistsError(
                f"{out} exists and is not this synthetic set (n={n}, seed={seed}, "
                f"{height}x{width}); choose another --out or pass --force to replace it")
    partial = out.with_name(out.name + ".partial")
    pinfo = partial / "params.json"
    if partial.exists():
        try:
            resumable = json.loads(pinfo.read_text()) == params.as_dict()
        except (FileNotFoundError, json.JSONDecodeError):
            resumable = False
        if not resumable:
            shutil.rmtree(partial)
    (partial / "train_images").mkdir(parents=True, exist_ok=True)
    write_json(pinfo, params.as_dict())
    log = partial / "progress.jsonl"
    done: dict[int, dict] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption: redo that image
                continue
            if (partial / "train_images" / rec["image"]).is_file():
                done[rec["i"]] = rec
    labels = assign_labels(n, seed)
    jobs = [(params, i, np.flatnonzero(labels[i])) for i in range(n) if i not in done]
    with open(log, "a", encoding="utf-8") as logf:
        for i, name, buf, rles in tqdm(_made(jobs, workers), desc=f"synth {out.name}",
                                       disable=not bars(progress), initial=len(done), total=n,
                                       unit="img"):
            atomic_write_bytes(partial / "train_images" / name, buf)
            rec = {"i": i, "image": name, "rles": rles}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            done[i] = rec
    rows = ["ImageId,ClassId,EncodedPixels"]
    counts = np.zeros(4, int)
    for i in sorted(done, key=lambda k: done[k]["image"]):
        for cid in sorted(done[i]["rles"], key=int):
            rows.append(f"{done[i]['image']},{cid},{done[i]['rles'][cid]}")
            counts[int(cid) - 1] += 1
    atomic_write_text(partial / "train.csv", "\n".join(rows) + "\n")
    info = {"synthetic": True, "generator": "cam2mask synth", "generator_version": GENERATOR_VERSION,
            "seed": seed, "params": params.as_dict(), "class_names": list(CLASS_NAMES),
            "images": n, "masks_per_class": counts.tolist(),
            "note": "Synthetic steel-defect data made by cam2mask_lib.synth, not Kaggle Severstal."}
    write_json(partial / INFO_FILE, info)
    log.unlink()
    pinfo.unlink()
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def _jpeg_bytes(gray: np.ndarray, quality: int) -> bytes:

    buf = io.BytesIO()
    Image.fromarray(gray).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ensure_synthetic(folder: str | Path, n: int, seed: int, height: int, width: int,
                     progress: bool = True, workers: int | None = None) -> Path:
    """The synthetic set for these parameters under ``folder`` (made once, then reused), drawn
    by ``workers`` processes (None: :func:`default_workers`)."""
    name = f"synthetic_n{n}_seed{seed}_{height}x{width}_v{GENERATOR_VERSION}"
    return generate(Path(folder) / name, n=n, seed=seed, height=height, width=width,
                    progress=progress, workers=workers)


__all__ = ["generate", "ensure_synthetic", "assign_labels", "render_image", "SynthParams"]
