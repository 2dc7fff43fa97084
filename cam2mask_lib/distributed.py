"""Several processes (one per GPU) through ``torch.distributed``: ``torchrun --nproc_per_node=G``.

Cross-validation folds are independent and each is seeded by (seed, fold), so spreading them over
ranks changes no number: rank ``r`` of ``G`` trains folds ``r, r + G, ...`` (:func:`my_folds`),
every rank waits for the others (a barrier), and rank 0 assembles the out-of-fold table from the
finished folds exactly as a single process would. The segmentation networks of notebooks 04-06
are dealt the same way, one (network, held-out fold) pair at a time (:func:`my_share`, used by
:func:`cam2mask_lib.experiments.train_networks`). Work that every rank reads (the synthetic set,
the folds file, the resized-image cache) is made by rank 0 first (:func:`rank_zero_first`).
Backends: NCCL on CUDA, gloo on the CPU (the test runs two gloo processes).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> tuple[int, int, str]:
    """Join the process group (NCCL when CUDA is present, else gloo); returns ``(rank, world,
    device)``, the device being ``cuda:<LOCAL_RANK>`` on a GPU machine, else ``cpu``."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def my_share(items, this_rank: int | None = None, n_ranks: int | None = None) -> list:
    """The items (in the given order) this rank does: every ``n_ranks``-th, from ``this_rank``."""
    this_rank = rank() if this_rank is None else this_rank
    n_ranks = world() if n_ranks is None else n_ranks
    return [x for i, x in enumerate(items) if i % n_ranks == this_rank]


def my_folds(folds, this_rank: int | None = None, n_ranks: int | None = None) -> list[int]:
    """The folds (of the given ones) this rank trains: every ``n_ranks``-th, from ``this_rank``."""
    return [int(f) for f in my_share(sorted(folds), this_rank, n_ranks)]


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (making shared files); the others run it after, reading them."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
