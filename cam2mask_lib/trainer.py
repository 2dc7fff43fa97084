"""The resumable training loop that the classifier and the segmentation networks share.

:class:`ResumableTrainer` owns what every training run here needs and nothing else: per-epoch
random state derived from (seed, fold, epoch), so a resumed run draws exactly what an
uninterrupted one would; an atomic checkpoint after every epoch; resume from it; a progress bar.
A trainer subclasses it and overrides a few hooks (as pytorch-grad-cam's ``BaseCAM`` owns the CAM
loop and each method overrides ``get_cam_weights``): :meth:`run_epoch` (one epoch, returns its
record), :meth:`state` / :meth:`load_state` (what the checkpoint holds beyond the epoch and the
history) and optionally :meth:`after_epoch` (e.g. keep the best epochs' weights).
"""
from __future__ import annotations

import io
import multiprocessing
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from .utils import atomic_write_bytes, bars, say


def save_checkpoint(path: str | Path, obj) -> None:
    """``torch.save`` through a temporary file and a rename: never a half-written checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path):
    """A checkpoint written by :func:`save_checkpoint`, on the CPU (the caller moves it)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def epoch_generator(seed: int, fold: int, epoch: int) -> torch.Generator:
    """The random source of one epoch of one fold: shuffling, augmentation, and the seed of the
    global generator (dropout) all come from it, so an epoch is the same whether or not the run
    was interrupted before it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + fold * 10_007 + epoch)


def one_thread() -> None:
    """A worker process's initialiser in :func:`side_by_side`: one torch thread."""
    torch.set_num_threads(1)


def side_by_side(fn: Callable, jobs: list, processes: int) -> Iterator:
    """``fn(job)`` for every job, up to ``processes`` at a time, each in a fresh process with one
    torch thread (``spawn``: safe from notebooks and threads); yields the results as they finish.
    On 2 cores two 1-thread processes train 1.3-1.5x the images of one 2-thread process, and a
    network's weights no longer depend on the machine's core count (the thread count changes how
    sums are ordered). ``fn`` and the jobs must pickle. An error in one job, or an interrupt,
    stops the others at once; what they checkpointed stays, to resume."""
    pool = multiprocessing.get_context("spawn").Pool(min(processes, len(jobs)),
                                                     initializer=one_thread)
    try:
        yield from pool.imap_unordered(fn, jobs)
        pool.close()
    except BaseException:  # an error in a job, an interrupt, or the caller stopped reading
        pool.terminate()
        raise
    finally:
        pool.join()


class ResumableTrainer:
    """Train for ``epochs`` epochs, checkpointing ``out/state.pt`` after each and resuming from it.

    Subclasses set up their model and optimiser in ``__init__`` (before calling :meth:`fit`) and
    override the hooks below. ``fit`` returns the history (one record per epoch).
    """

    writer = True  # False on the ranks of a DDP run that leave the checkpoints to rank 0

    def __init__(self, out: str | Path, epochs: int, seed: int, fold: int = 0,
                 desc: str = "train", progress: bool = True):
        self.out, self.epochs, self.seed, self.fold = Path(out), int(epochs), int(seed), int(fold)
        self.desc, self.progress = desc, progress
        self.history: list[dict] = []

    # hooks ------------------------------------------------------------------------------------
    def run_epoch(self, epoch: int, gen: torch.Generator) -> dict:
        """Train one epoch with ``gen`` as its random source; return its record."""
        raise NotImplementedError

    def state(self) -> dict:
        """What the checkpoint must hold to continue exactly (models, optimiser, ...)."""
        raise NotImplementedError

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        raise NotImplementedError

    def after_epoch(self, epoch: int, record: dict) -> None:
        """Called after each epoch, before the checkpoint (default: nothing)."""

    def postfix(self, record: dict) -> dict:
        """Values shown on the progress bar."""
        return {}

    # the loop ---------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def fit(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        start = 0
        if self.state_path.is_file():
            st = load_checkpoint(self.state_path)
            self.load_state(st)
            self.history, start = st["history"], st["epoch"] + 1
        bar = tqdm(range(start, self.epochs), desc=self.desc, disable=not bars(self.progress),
                   initial=start, total=self.epochs, leave=False)
        for epoch in bar:
            gen = epoch_generator(self.seed, self.fold, epoch)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            record = self.run_epoch(epoch, gen)
            self.history.append(record)
            self.after_epoch(epoch, record)
            if self.writer:
                save_checkpoint(self.state_path, {**self.state(), "history": self.history,
                                                  "epoch": epoch})
            post = self.postfix(record)
            bar.set_postfix(post)
            say(self.progress, f"{self.desc}: epoch {epoch + 1}/{self.epochs} " +
                " ".join(f"{k} {v}" for k, v in post.items()))
        bar.close()
        return self.history
