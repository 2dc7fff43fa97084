"""Images at a network's input size: resizing, ImageNet normalisation, the dataset and its
batches (decoded by workers, from a memory-mapped array or as JPEG bytes on the device)."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from ..utils import ConfigError, bars, chunks
from .errors import DataError
from .index import DatasetIndex


# ImageNet statistics, as timm.data.IMAGENET_DEFAULT_MEAN / _STD (a test checks they agree).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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

    def uint8_batch(self, ks, num_workers: int = 0) -> torch.Tensor:
        """The images of items ``ks`` as uint8 ``[len(ks), 3, H, W]``: a quarter of the bytes to
        move, normalised where the network runs (:func:`normalize_images`, ``device.to_model``).
        With ``decode_device``, decoded there in one call. Files decoded on the CPU (no
        ``array``) are shared among ``num_workers`` persistent workers (:meth:`loader`, pieces of
        :data:`WORKER_PIECE` images) when it is above 0, instead of decoded one by one here."""
        if self.decode_device is not None:
            return decode_jpeg_batch([self._jpeg_bytes(int(k)) for k in ks], self.size,
                                     self.decode_device)
        ks = [int(k) for k in ks]
        if num_workers > 0 and self.array is None and self._cache is None and len(ks) > 1:
            return torch.cat([b["image"] for b in self.loader(WORKER_PIECE, num_workers)(ks)])
        return torch.stack([_chw(self.arrays(k)[0]) for k in ks])

    def batches(self, order, batch_size: int, num_workers: int = 0):
        """``(rows, uint8 images [b, 3, H, W])`` for consecutive batches of ``order``: read by
        the persistent workers of :meth:`loader` (in pinned memory on CUDA) when ``num_workers``
        > 0, else in this process (:meth:`uint8_batch`). The same images either way (tests)."""
        order = np.asarray(order)
        parts = list(chunks(order, batch_size))
        if num_workers > 0:  # the loader first, so that zip runs it to its end
            for item, b in zip(self.loader(batch_size, num_workers)(order), parts):
                yield b, item["image"]
            return
        for b in parts:
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
# Images per worker task when :meth:`ImageDataset.uint8_batch` shares one batch among workers: a
# batch of 32 keeps 8 workers busy, and one loader (one set of worker processes) serves any rows.
WORKER_PIECE = 4


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
        return chunks(self.rows, self.batch_size)

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
