"""Multi-label stratified folds, made once per data set and stored beside its artifacts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from ..utils import atomic_write_text
from .errors import DataError
from .index import DatasetIndex


# --------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------

def make_folds(labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Multi-label stratified K-fold: fold number (0..n_folds-1) for each row of ``labels``.

    Stratifies on every class and on "no defect", so each fold gets its share of every class and
    of clean images (iterative stratification, Sechidis et al. 2011, via the
    ``iterative-stratification`` package). Deterministic for a given seed.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n < n_folds:
        raise DataError(f"cannot split {n} images into {n_folds} folds; need at least "
                        f"{n_folds} images")
    y = np.concatenate([labels, (labels.sum(1) == 0)[:, None]], axis=1).astype(int)
    folds = np.full(n, -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(np.zeros(n), y)):
        folds[test] = f
    return folds

def folds_for(index: DatasetIndex, folder: str | Path, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """The dataset's folds, computed once and stored as ``folder/folds_k{n}_seed{s}.csv`` so that
    every stage uses the same split. A stored file for other images raises DataError rather than
    being overwritten."""
    path = Path(folder) / f"folds_k{n_folds}_seed{seed}.csv"
    if path.is_file():
        df = pd.read_csv(path, dtype={"image_id": str, "fold": int})
        if list(df["image_id"]) != list(index.image_ids):
            raise DataError(f"{path}: stored folds are for other images than {index.root}; "
                            f"delete the file (or the artifacts folder) to split again")
        return df["fold"].to_numpy()
    folds = make_folds(index.labels, n_folds, seed)
    df = pd.DataFrame({"image_id": index.image_ids, "fold": folds})
    atomic_write_text(path, df.to_csv(index=False))
    return folds
