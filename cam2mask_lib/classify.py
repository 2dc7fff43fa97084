"""The paper's multi-label classifier (section IV): timm encoder + Dropout-Linear-ELU-Dropout-Linear.

Training follows the paper unless the profile overrides it: BCE averaged over classes and batch,
Adam with lr 1e-4 for the encoder and 1e-3 for the head, ReduceLROnPlateau on the validation loss
(patience 3, factor 0.5), horizontal flips (vertical optional), K-fold cross-validation on the
folds of the data layer. The weights of the 3 epochs with the lowest validation loss are averaged
(``torch.optim.swa_utils.AveragedModel``; BatchNorm statistics recomputed on the training data with
``update_bn``) and the average makes the out-of-fold predictions and, later, the CAMs.

The network returns **logits**; probabilities are ``sigmoid(logits)`` (the paper's final Sigmoid).
The CAM stage differentiates the logits by default (as pytorch-grad-cam's ``ClassifierOutputTarget``
does); ``cam_target="prob"`` there differentiates the probabilities instead.

Every fold is checkpointed atomically after every epoch, with the random state needed to continue
exactly: an interrupted fold resumes where it stopped and ends with the same weights as an
uninterrupted run. Finished folds are reused unless their data or parameters changed (the run
folder's name is a hash of both).
"""
from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .profiles import TrainConfig  # noqa: F401  (re-exported: classify.TrainConfig)
from .utils import atomic_write_bytes, stable_hash, write_json


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for but could not be loaded (no network, no file)."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """timm encoder -> global average pooling -> paper head (logits, one per class).

    ``target_layer`` is the module whose output is the last activation before pooling (for timm
    EfficientNet: ``bn2``, i.e. conv_head -> BatchNorm -> SiLU); ``features(x)`` returns that
    activation and ``head_from_features(A)`` maps it to logits, so ``forward(x) ==
    head_from_features(features(x))``.
    """

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int,
                 hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(num_features, hidden), nn.ELU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.num_classes = num_classes

    @property
    def target_layer(self) -> nn.Module:
        enc = self.encoder
        if hasattr(enc, "conv_head") and hasattr(enc, "bn2"):  # timm EfficientNet family
            return enc.bn2
        return enc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def head_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(feats).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_from_features(self.features(x))

    def param_groups(self, lr_encoder: float, lr_head: float) -> list[dict]:
        return [{"params": list(self.encoder.parameters()), "lr": lr_encoder, "name": "encoder"},
                {"params": list(self.head.parameters()), "lr": lr_head, "name": "head"}]


def build_classifier(encoder: str, num_classes: int, pretrained: bool = False,
                     weights_path: str | Path | None = None, hidden: int = 256,
                     dropout: float = 0.2, allow_random_init: bool = False) -> Classifier:
    """A :class:`Classifier` with a timm encoder built by name (``efficientnet_b0``, ...).

    ``weights_path``: a local timm weights file for the encoder (works offline). ``pretrained``:
    timm's usual source (a model hub). If that fails, :class:`PretrainedUnavailable` is raised,
    or, with ``allow_random_init``, a warning says so plainly and the encoder starts from random
    weights.
    """
    import timm

    kwargs = dict(num_classes=0, global_pool="")
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights_path {path}: file not found")
        enc = timm.create_model(encoder, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    elif pretrained:
        try:
            enc = timm.create_model(encoder, pretrained=True, **kwargs)
        except Exception as e:  # network, hub, missing file: all mean "no weights here"
            msg = (f"ImageNet weights for {encoder!r} could not be loaded ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200] if str(e) else ''}). Give a local file with "
                   f"weights_path=, or allow random initialisation.")
            if not allow_random_init:
                raise PretrainedUnavailable(msg) from None
            warnings.warn(msg + " Continuing from RANDOM weights.", stacklevel=2)
            enc = timm.create_model(encoder, pretrained=False, **kwargs)
    else:
        enc = timm.create_model(encoder, pretrained=False, **kwargs)
    # channels of the spatial feature map: not always timm's num_features (MobileNetV3 applies
    # its conv_head spatially when global_pool=""), so measure it
    enc.eval()
    with torch.no_grad():
        channels = int(enc(torch.zeros(1, 3, 64, 64)).shape[1])
    enc.train()
    return Classifier(enc, channels, num_classes, hidden=hidden, dropout=dropout)


# --------------------------------------------------------------------------------------------
# Training configuration
# --------------------------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# Weight averaging
# --------------------------------------------------------------------------------------------

def average_state_dicts(states: Sequence[dict]) -> dict:
    """Element-wise mean of floating-point tensors of several state dicts (integer buffers such
    as BatchNorm's ``num_batches_tracked`` are taken from the first)."""
    if not states:
        raise ValueError("nothing to average")
    out = {}
    for k, v in states[0].items():
        if torch.is_floating_point(v):
            out[k] = sum(s[k].double() for s in states).div(len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def averaged_model(model: Classifier, states: Sequence[dict], bn_batches: Iterable[torch.Tensor],
                   device: torch.device) -> Classifier:
    """Average ``states`` into ``model`` with ``AveragedModel`` (equal weights), then recompute the
    BatchNorm statistics on ``bn_batches`` with ``update_bn``. Returns the plain module."""
    from torch.optim.swa_utils import AveragedModel, update_bn

    swa = AveragedModel(model)
    for s in states:
        model.load_state_dict(s)
        swa.update_parameters(model)
    update_bn(bn_batches, swa, device=device)
    return swa.module


# --------------------------------------------------------------------------------------------
# Training one fold (resumable)
# --------------------------------------------------------------------------------------------

def _save(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _rng_for(cfg: TrainConfig, fold: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + fold * 10_007 + epoch)


def _batches(ds, rows: np.ndarray, batch_size: int, gen: torch.Generator | None, num_workers: int):
    """Images and labels of ``ds`` in batches; shuffled with ``gen`` when given."""
    order = rows if gen is None else rows[torch.randperm(len(rows), generator=gen).numpy()]
    if num_workers > 0:
        from torch.utils.data import DataLoader, Subset

        loader = DataLoader(Subset(ds, order.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, persistent_workers=False)
        for b in loader:
            yield b["image"], b["labels"]
        return
    for s in range(0, len(order), batch_size):
        items = [ds[int(i)] for i in order[s:s + batch_size]]
        yield (torch.stack([it["image"] for it in items]),
               torch.stack([it["labels"] for it in items]))


def _augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.hflip:
        f = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    if cfg.vflip:
        f = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-2), x)
    return x


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict_logits(model: nn.Module, ds, rows: np.ndarray, batch_size: int,
                   device: torch.device, num_workers: int = 0) -> np.ndarray:
    model.eval()
    # a channels_last network gets channels_last batches (mixed layouts take a slow path on CPU)
    stem = next((p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    fmt = (torch.channels_last if stem is not None and not stem.is_contiguous()
           and stem.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    out = []
    for x, _ in _batches(ds, rows, batch_size, None, num_workers):
        with _autocast(device):
            out.append(model(x.to(device).contiguous(memory_format=fmt)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_classes), np.float32)


def roc_auc_per_class(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC-AUC of each column; NaN where a class has only positives or only negatives."""
    from sklearn.metrics import roc_auc_score

    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        if 0 < y[:, c].sum() < len(y):
            out[c] = roc_auc_score(y[:, c], p[:, c])
    return out


def train_fold(ds, labels: np.ndarray, folds: np.ndarray, fold: int, cfg: TrainConfig,
               out: Path, progress: bool = True) -> dict:
    """Train on all folds but ``fold``, validate on ``fold``; write checkpoints to ``out``.

    Returns ``{"oof": probs of the fold's rows, "rows": those rows, "history": [...]}``.
    A finished fold (``out/done.json``) is loaded, not retrained.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    train_rows = np.flatnonzero(folds != fold)
    val_rows = np.flatnonzero(folds == fold)
    done = out / "done.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        return {"oof": np.load(out / "oof.npy"), "rows": val_rows, "history": rec["history"]}
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed * 7919 + fold)
    model = build_classifier(cfg.encoder, labels.shape[1], pretrained=cfg.pretrained,
                             weights_path=cfg.weights_path, hidden=cfg.hidden,
                             dropout=cfg.dropout, allow_random_init=cfg.allow_random_init)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.param_groups(cfg.lr_encoder, cfg.lr_head))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    loss_fn = nn.BCEWithLogitsLoss()  # mean over classes and batch, as the paper's formula
    history: list[dict] = []
    top: list[tuple[float, int]] = []  # (val loss, epoch), best first
    start = 0
    state_path = out / "state.pt"
    if state_path.is_file():
        st = _load(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        history, top, start = st["history"], [tuple(t) for t in st["top"]], st["epoch"] + 1
    y_val = labels[val_rows]
    bar = tqdm(range(start, cfg.epochs), desc=f"fold {fold}", disable=not progress,
               initial=start, total=cfg.epochs, leave=False)
    for epoch in bar:
        gen = _rng_for(cfg, fold, epoch)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model.train()
        t0, tot, n = time.perf_counter(), 0.0, 0
        for x, y in _batches(ds, train_rows, cfg.batch_size, gen, cfg.num_workers):
            x = _augment(x, cfg, gen).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                loss = loss_fn(model(x).float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(x)
            n += len(x)
        logits = predict_logits(model, ds, val_rows, cfg.batch_size * 2, device, cfg.num_workers)
        val_loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(y_val.astype(np.float32))))
        auc = roc_auc_per_class(y_val, 1 / (1 + np.exp(-logits)))
        sched.step(val_loss)
        rec = {"fold": fold, "epoch": epoch, "train_loss": tot / max(n, 1), "val_loss": val_loss,
               "val_auc": float(np.nanmean(auc)) if not np.all(np.isnan(auc)) else float("nan"),
               "lr_encoder": opt.param_groups[0]["lr"], "lr_head": opt.param_groups[1]["lr"],
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        # keep the top-k epochs by validation loss
        top.append((val_loss, epoch))
        top.sort()
        if any(e == epoch for _, e in top[:cfg.top_k]):
            _save(out / f"epoch{epoch}.pt", model.state_dict())
        for _, e in top[cfg.top_k:]:
            (out / f"epoch{e}.pt").unlink(missing_ok=True)
        top = top[:cfg.top_k]
        _save(state_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "history": history, "top": top,
                           "epoch": epoch})
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{val_loss:.3f}",
                        auc=f"{rec['val_auc']:.3f}")
    bar.close()
    states = [_load(out / f"epoch{e}.pt") for _, e in top]
    bn_gen = torch.Generator().manual_seed(cfg.seed + fold)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    bn_batches = (x.contiguous(memory_format=fmt)
                  for x, _ in _batches(ds, train_rows, cfg.batch_size, bn_gen, cfg.num_workers))
    avg = averaged_model(model, states, bn_batches, device)
    _save(out / "final.pt", avg.state_dict())
    probs = 1 / (1 + np.exp(-predict_logits(avg, ds, val_rows, cfg.batch_size * 2, device,
                                             cfg.num_workers)))
    np.save(out / "oof.npy", probs)
    write_json(done, {"history": history, "averaged_epochs": [e for _, e in top]})
    return {"oof": probs, "rows": val_rows, "history": history}


# --------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------

def run_dir(base: Path, index, folds: np.ndarray, cfg: TrainConfig) -> Path:
    key = {"images": stable_hash(list(index.image_ids)), "labels": stable_hash(index.labels.tolist()),
           "folds": stable_hash(folds.tolist()), "train": cfg.key()}
    return Path(base) / f"{cfg.encoder}_{stable_hash(key)}"


def train_cv(index, folds: np.ndarray, cfg: TrainConfig, base: Path,
             only_folds: Iterable[int] | None = None, progress: bool = True, ds=None) -> dict:
    """Train every fold (or ``only_folds``) and collect out-of-fold probabilities.

    Returns ``{"dir", "oof" [N, C] (NaN for folds not trained), "history" DataFrame,
    "auc" per class on the union of folds, "complete"}``; also writes ``oof.csv`` and
    ``history.csv`` in the run folder.
    """
    import pandas as pd
    from tqdm import tqdm

    from .data import ImageDataset

    out = run_dir(base, index, folds, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"config": asdict(cfg), "n_images": len(index),
                                     "class_names": index.class_names})
    if ds is None:
        ds = ImageDataset(index, cfg.image_size, with_masks=False, cache=cfg.cache_images)
    n_folds = int(folds.max()) + 1
    todo = list(range(n_folds)) if only_folds is None else sorted(set(only_folds))
    for k in todo:
        if not 0 <= k < n_folds:
            raise ValueError(f"fold {k} does not exist; folds are 0..{n_folds - 1}")
    oof = np.full(index.labels.shape, np.nan, dtype=np.float64)
    hist = []
    for k in tqdm(range(n_folds), desc="folds", disable=not progress):
        fdir = out / f"fold{k}"
        if k not in todo and not (fdir / "done.json").is_file():
            continue
        res = train_fold(ds, index.labels, folds, k, cfg, fdir, progress=progress)
        oof[res["rows"]] = res["oof"]
        hist += res["history"]
    complete = not np.isnan(oof).any()
    history = pd.DataFrame(hist)
    df = pd.DataFrame(oof, columns=[f"p_{c}" for c in index.class_names])
    df.insert(0, "image_id", index.image_ids)
    df.insert(1, "fold", folds)
    from .utils import atomic_write_text
    atomic_write_text(out / "oof.csv", df.to_csv(index=False))
    atomic_write_text(out / "history.csv", history.to_csv(index=False))
    done_rows = ~np.isnan(oof).any(1)
    auc = roc_auc_per_class(index.labels[done_rows], oof[done_rows]) if done_rows.any() else \
        np.full(index.num_classes, np.nan)
    return {"dir": out, "oof": oof, "history": history, "auc": auc, "complete": complete}


def load_run(run: str | Path, class_names=None) -> dict:
    """A finished classifier run folder (``.../classifier/<encoder>_<hash>/``, as ``train_cv``
    writes it): ``{"config": TrainConfig, "class_names", "models": {fold: Classifier}}``. Raises
    a clear error for a folder that is not one, has no finished fold, or (with ``class_names``)
    was trained on other classes."""
    import json

    run = Path(run)
    cfg_file = run / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run}: not a classifier run folder (no config.json); give the "
                                f"folder that holds config.json and fold*/final.pt, e.g. "
                                f"artifacts/cpu/classifier/<encoder>_<hash> or OUT/work/classifier/...")
    meta = json.loads(cfg_file.read_text())
    vals = dict(meta["config"])
    vals["image_size"] = tuple(vals["image_size"])
    cfg = TrainConfig(**vals)
    names = [str(c) for c in meta.get("class_names", [])]
    if class_names is not None and len(names) != len(class_names):
        raise ValueError(f"{run}: the classifier has {len(names)} classes {names}; the data has "
                         f"{len(class_names)} {list(class_names)}")
    folds = sorted(int(p.parent.name[4:]) for p in run.glob("fold*/final.pt"))
    if not folds:
        raise FileNotFoundError(f"{run}: no finished fold (fold*/final.pt)")
    return {"config": cfg, "class_names": names, "dir": run,
            "models": {k: load_fold_model(run, k, len(names), cfg) for k in folds}}


def load_fold_model(run: Path, fold: int, num_classes: int, cfg: TrainConfig) -> Classifier:
    """The averaged (final) model of one fold, on the CPU, in eval mode."""
    model = build_classifier(cfg.encoder, num_classes, pretrained=False, hidden=cfg.hidden,
                             dropout=cfg.dropout)
    path = Path(run) / f"fold{fold}" / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fold {fold} has not finished training")
    model.load_state_dict(_load(path))
    return model.eval()


def table1(auc: np.ndarray, class_names: Sequence[str], label: str):
    """Table 1: ROC-AUC per class on the union of the folds, the paper's rows beside ours."""
    import pandas as pd

    from . import paper

    rows = [{"model": label, **{f"class {c}": float(a) for c, a in zip(class_names, auc)},
             "mean": float(np.nanmean(auc)), "source": "this run"}]
    if list(class_names) == list(paper.CLASS_COUNTS):
        for name, vals in paper.TABLE1.items():
            rows.append({"model": name, **{f"class {c}": v for c, v in zip(class_names, vals)},
                         "mean": float(np.mean(vals)), "source": "paper (Kaggle Severstal)"})
    return pd.DataFrame(rows)


def plot_history(history):
    """Training and validation loss, and validation AUC, per epoch and fold."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for f, h in history.groupby("fold"):
        axes[0].plot(h["epoch"], h["train_loss"], "--", color=f"C{f}", alpha=0.7)
        axes[0].plot(h["epoch"], h["val_loss"], "-", color=f"C{f}", label=f"fold {f}")
        axes[1].plot(h["epoch"], h["val_auc"], "-o", ms=3, color=f"C{f}", label=f"fold {f}")
    axes[0].set(xlabel="epoch", ylabel="BCE (dashed: train, solid: validation)", title="Loss")
    axes[1].set(xlabel="epoch", ylabel="mean ROC-AUC over classes", title="Validation AUC")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_roc(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]):
    """ROC curve of each class from out-of-fold probabilities (rows with NaN skipped)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    ok = ~np.isnan(probs).any(1)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for c, name in enumerate(class_names):
        y = labels[ok, c]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[ok, c])
            auc = roc_auc_per_class(y[:, None], probs[ok, c][:, None])[0]
            ax.plot(fpr, tpr, label=f"class {name}: AUC {auc:.3f} ({int(y.sum())} positives)")
    ax.plot([0, 1], [0, 1], ":", color="0.5")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title="Out-of-fold ROC curves")
    ax.legend(frameon=False, fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
