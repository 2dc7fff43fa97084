"""One device policy for every stage.

The device is resolved once (:func:`resolve_device`: ``"auto"`` is CUDA when present, else the
CPU) and carried by the context; after that it is read from the model, as pytorch-grad-cam does:
a batch goes to the device and memory layout of the network that consumes it (:func:`to_model`),
and results come back to numpy only through ``.cpu()``. Nothing here moves a model or changes its
layout behind the caller's back.

On the CPU, glibc's allocator hands every freed buffer above its mmap threshold back to the kernel
and maps it anew on the next allocation, so each training step pays page faults and zero-filling
for its large activations (half of a step's time was system time on the 2-core machine).
:func:`keep_cpu_buffers`, called when a device is resolved, raises the thresholds so that freed
activations are reused: the same arithmetic in the same order (bit-identical results), 1.2-1.25x
faster CPU training, measured by ``benchmarks/classifier_throughput.py --allocator``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch

from .data import normalize_images
from .utils import ConfigError


# glibc's mallopt parameters, and the values keep_cpu_buffers sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 1 << 30   # keep up to 1 GiB of freed memory in the process
_allocator_tuned: bool | None = None


def keep_cpu_buffers() -> bool:
    """Let glibc's malloc keep freed buffers of up to 32 MiB in the process instead of unmapping
    them (and up to 1 GiB of free memory before trimming). Process-wide, once; a no-op returning
    False off Linux/glibc or when the environment variable ``CAM2MASK_MALLOC=default`` asks for
    the C library's defaults. Changes speed and resident memory only, never a number."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("CAM2MASK_MALLOC", "").lower() == "default" or not sys.platform.startswith(
            "linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: leave them alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                            and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _allocator_tuned


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(name)``, refusing
    a CUDA device on a machine without one (a clear message instead of a deep traceback). Also
    tunes the CPU allocator once (:func:`keep_cpu_buffers`): data loading and CPU work run on
    every device."""
    keep_cpu_buffers()
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return _tuned(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device {name!r} is not a device name; expected auto, cpu, cuda or "
                             f"cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device here; use "
                         f"device='auto' or 'cpu'")
    return _tuned(dev)


def _tuned(dev: torch.device) -> torch.device:
    """On CUDA, cuDNN picks the fastest convolution algorithm for each input shape once
    (``cudnn.benchmark``: every stage feeds one shape per network); a GPU run was never bit for
    bit deterministic (atomic adds), and the tables' numbers are the CPU's."""
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def memory_format(model: torch.nn.Module) -> torch.memory_format:
    """``channels_last`` when the model's first 4-D weight with a spatial extent is stored that
    way (a channels_last network fed plain batches takes a slow path), else contiguous."""
    stem = next((p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    if (stem is not None and not stem.is_contiguous()
            and stem.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def to_model(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``x`` on the model's device, in the model's memory layout (non-blocking from pinned
    memory); uint8 images cross as uint8 and are normalised there."""
    x = x.to(model_device(model), non_blocking=True)
    if x.dtype == torch.uint8:
        x = normalize_images(x)
    return x.contiguous(memory_format=memory_format(model))


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
