"""Several processes (one per GPU) through ``torch.distributed``: ``torchrun --nproc_per_node=G``.

Cross-validation folds are independent and each is seeded by (seed, fold), so spreading them over
ranks changes no number: rank ``r`` of ``G`` trains folds ``r, r + G, ...`` (:func:`my_folds`),
every rank waits for the others (a barrier), and rank 0 assembles the out-of-fold table from the
finished folds exactly as a single process would. With fewer folds than ranks, the ranks train
each fold together instead (DDP inside a fold: every rank a slice of every batch, BatchNorm over
the whole batch by :func:`sync_batchnorm`). The segmentation networks of notebooks 04-06
are dealt the same way, one (network, held-out fold) pair at a time (:func:`my_share`, used by
:func:`cam2mask_lib.experiments.train_networks`). Work that every rank reads (the synthetic set,
the folds file, the resized-image cache) is made by rank 0 first (:func:`rank_zero_first`).
Backends: NCCL on CUDA, gloo on the CPU (the test runs two gloo processes).
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


BARRIER_TIMEOUT = datetime.timedelta(hours=24)


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> tuple[int, int, str]:
    """Join the process group (NCCL when CUDA is present, else gloo); returns ``(rank, world,
    device)``, the device being ``cuda:<LOCAL_RANK>`` on a GPU machine, else ``cpu``."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        # ranks wait at barriers for the slowest: with 5 folds on 2 GPUs one rank waits a whole
        # fold (30 epochs of 10,000 images at 256x1600), past NCCL's default of 10 minutes
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
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


# ------------------------------------------------------------------------------------------------
# DDP inside a fold: every rank a slice of every batch, BatchNorm over the whole batch
# ------------------------------------------------------------------------------------------------

def batch_slices(order, batch_size: int, this_rank: int, n_ranks: int):
    """This rank's images of each batch of ``order`` (batches of ``batch_size``, in order):
    ``(mine, sizes)``, ``mine`` the concatenated slices ``batch[this_rank::n_ranks]`` and
    ``sizes`` the whole batches' sizes. ``batch_size`` must divide by ``n_ranks``, so every slice
    but the last has ``batch_size // n_ranks`` images and ``mine`` can be read in batches of that
    size; a last batch with fewer images than ranks is left out, so that every rank takes the
    same number of steps."""
    import numpy as np

    if batch_size % n_ranks:
        raise ValueError(f"batch size {batch_size} does not divide among {n_ranks} ranks")
    order = np.asarray(order)
    starts = range(0, len(order), batch_size)
    sizes = [min(batch_size, len(order) - s) for s in starts]
    if sizes and sizes[-1] < n_ranks:
        sizes = sizes[:-1]
    parts = [order[s:s + n][this_rank::n_ranks] for s, n in zip(starts, sizes)]
    return (np.concatenate(parts) if parts else order[:0]), sizes


# BatchNorm over every rank's slice of a batch (DDP inside a fold)
# ------------------------------------------------------------------------------------------------

def _all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks, differentiable: the backward sums the gradients
    (torch's functional collectives)."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", dist.group.WORLD))


def _synced(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Batch normalisation of ``x`` with the mean and (biased) variance of every rank's ``x``
    together, as one process would compute them on the whole batch; the running statistics are
    updated with the unbiased variance, as ``nn.BatchNorm2d`` does. The sums cross ranks through
    an all-reduce whose backward all-reduces the gradients, so that every rank's input gradient
    is that of the sum of the ranks' losses."""
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = (1, c) + (1,) * (x.dim() - 2)
    count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
    sums = _all_sum(torch.cat([x.sum(dims), count]))
    n = sums[c]
    mean = sums[:c] / n
    centred = x - mean.view(shape)
    var = _all_sum((centred * centred).sum(dims)) / n
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


class _RankSynced:
    """Mixed into a BatchNorm class by :func:`sync_batchnorm`: in training, with more than one
    rank, statistics over all ranks (:func:`_synced`); timm's ``BatchNormAct2d`` keeps its drop
    and activation after the normalisation; otherwise the class's own forward."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y = _synced(x, self)
        if hasattr(self, "drop"):
            y = self.drop(y)
        if hasattr(self, "act"):
            y = self.act(y)
        return y


_SYNCED_CLASSES: dict[type, type] = {}


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm statistics computed over every rank's slice of the batch: on CUDA
    torch's ``SyncBatchNorm`` (through timm's converter, which keeps timm's norm + activation
    layers); on the CPU, where ``SyncBatchNorm`` has no kernel, each BatchNorm module's class is
    swapped for a subclass that all-reduces the sums over gloo (:func:`_synced`, tested against
    ``nn.BatchNorm2d`` on the whole batch). Parameter and buffer names are unchanged, so a
    checkpoint fits the plain model. The batch norms of frozen stages stay as they are: their
    statistics are fixed (:func:`weights.freeze_stem`), nothing to synchronise."""
    from .weights import is_frozen_stats

    if any(p.is_cuda for p in model.parameters()):
        from timm.layers import convert_sync_batchnorm

        frozen = {n: m for n, m in model.named_modules() if is_frozen_stats(m)}
        model = convert_sync_batchnorm(model)
        for name, m in frozen.items():  # put back, unconverted
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)
        return model
    for m in model.modules():
        if is_frozen_stats(m):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _RankSynced):
            cls = type(m)
            if cls not in _SYNCED_CLASSES:
                _SYNCED_CLASSES[cls] = type(f"RankSynced{cls.__name__}", (_RankSynced, cls), {})
            m.__class__ = _SYNCED_CLASSES[cls]
    return model
