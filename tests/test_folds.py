import numpy as np
import pytest

from cam2mask_lib.data import DataError, folds_for, load_dataset, make_folds
from cam2mask_lib.synth import assign_labels


def test_folds_are_stratified_for_every_class():
    labels = assign_labels(800, seed=0)
    folds = make_folds(labels, n_folds=5, seed=0)
    sizes = np.bincount(folds)
    assert len(sizes) == 5 and np.all(np.abs(sizes - 160) <= 3), sizes  # balanced, not exact
    y = np.concatenate([labels, (labels.sum(1) == 0)[:, None]], 1)
    for col in range(y.shape[1]):
        per_fold = np.array([y[folds == f, col].sum() for f in range(5)])
        expected = y[:, col].sum() / 5
        assert np.all(np.abs(per_fold - expected) <= 1.0), (col, per_fold)


def test_unstratified_split_would_fail_the_same_check():
    # the check above can fail: a random split misses the per-class balance for the rare class
    labels = assign_labels(800, seed=0)
    worst = 0.0
    for s in range(20):
        folds = np.random.default_rng(s).permutation(np.arange(800) % 5)
        per_fold = np.array([labels[folds == f, 1].sum() for f in range(5)])
        worst = max(worst, np.abs(per_fold - labels[:, 1].sum() / 5).max())
    assert worst > 1.0


def test_folds_deterministic_by_seed():
    labels = assign_labels(300, seed=1)
    assert np.array_equal(make_folds(labels, 5, 7), make_folds(labels, 5, 7))
    assert not np.array_equal(make_folds(labels, 5, 7), make_folds(labels, 5, 8))


def test_folds_saved_and_reused(synth_dir, tmp_path):
    idx = load_dataset(synth_dir)
    f1 = folds_for(idx, tmp_path, n_folds=3, seed=0)
    path = tmp_path / "folds_k3_seed0.csv"
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    assert np.array_equal(folds_for(idx, tmp_path, n_folds=3, seed=0), f1)
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="stored folds are for other images"):
        folds_for(idx.subset(range(10)), tmp_path, n_folds=3, seed=0)


def test_too_few_images():
    with pytest.raises(DataError, match="cannot split 3 images into 5 folds"):
        make_folds(np.zeros((3, 4)), 5)
