"""One device policy for every stage.

The device is resolved once (:func:`resolve_device`: ``"auto"`` is CUDA when present, else the
CPU) and carried by the context; after that it is read from the model, as pytorch-grad-cam does:
a batch goes to the device and memory layout of the network that consumes it (:func:`to_model`),
and results come back to numpy only through ``.cpu()``. Nothing here moves a model or changes its
layout behind the caller's back.
"""
from __future__ import annotations

import contextlib

import torch

from .data import normalize_images
from .utils import ConfigError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(name)``, refusing
    a CUDA device on a machine without one (a clear message instead of a deep traceback)."""
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device {name!r} is not a device name; expected auto, cpu, cuda or "
                             f"cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device here; use "
                         f"device='auto' or 'cpu'")
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
