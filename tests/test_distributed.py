"""torchrun on the CPU: two gloo processes train the smoke profile's classifier folds and then
every segmentation network of notebooks 04-06 between them, and the result equals a single
process's, bit for bit; with fewer folds than ranks they train the fold together (DDP), whose
synchronised BatchNorm step equals one process's to rounding."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from cam2mask_lib.distributed import my_folds, my_share


def test_folds_are_dealt_round_robin():
    assert my_folds(range(5), 0, 2) == [0, 2, 4] and my_folds(range(5), 1, 2) == [1, 3]
    assert my_folds([0, 1], 2, 3) == []  # more ranks than folds: a rank may have none
    assert sorted(sum((my_folds(range(7), r, 3) for r in range(3)), [])) == list(range(7))
    assert my_share(["b", "a", "c"], 1, 2) == ["a"]  # in the given order, not sorted


def _train(args, tmp, env):
    out = subprocess.run(args + ["train", "--profile", "smoke", "--artifacts-dir", str(tmp),
                                 "--stages", "classifier", "segmentation", "grid",
                                 "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's standalone rendezvous on Linux")
def test_torchrun_two_gloo_processes_give_the_single_process_networks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # as torchrun's
    single = _train([sys.executable, "-m", "cam2mask_lib"], tmp_path / "one", env)
    multi = _train([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "cam2mask_lib"], tmp_path / "two", env)
    assert "on 2 ranks" in multi and "ROC-AUC (all folds)" in multi
    a = pd.read_csv(next((tmp_path / "one" / "classifier").glob("*/oof.csv")))
    b = pd.read_csv(next((tmp_path / "two" / "classifier").glob("*/oof.csv")))
    assert a.columns.tolist() == b.columns.tolist() and len(a) == 40
    assert np.array_equal(a.filter(like="p_").to_numpy(), b.filter(like="p_").to_numpy())
    # every segmentation network (Tables 3-5: 21 set-ups x 1 held-out fold) trained once, by
    # one rank or the other, with the single process's weights
    one = sorted((tmp_path / "one" / "segmentation").glob("*/fold*/final.pt"))
    two = sorted((tmp_path / "two" / "segmentation").glob("*/fold*/final.pt"))
    assert len(one) == 21 and [p.relative_to(tmp_path / "one") for p in one] == \
        [p.relative_to(tmp_path / "two") for p in two]
    assert "rank 0 trained or reused 11 (network, fold) pairs on 2 ranks" in multi
    for p, q in zip(one, two):
        a, b = torch.load(p), torch.load(q)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), p.parent


def test_fold_with_segmentation_stages_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cam2mask_lib", "train", "--profile", "smoke",
                          "--artifacts-dir", str(tmp_path), "--fold", "0", "--stages",
                          "classifier", "grid"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--fold" in out.stderr and "every fold" in out.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_batch_slices_deal_every_batch_among_the_ranks():
    from cam2mask_lib.distributed import batch_slices

    order = np.arange(100, 123)  # 23 images in batches of 8: 8, 8, 7
    parts = [batch_slices(order, 8, r, 2) for r in range(2)]
    assert all(sizes == [8, 8, 7] for _, sizes in parts)
    for b, start in enumerate(range(0, 23, 8)):  # each batch's slices are the batch, once
        got = np.concatenate([mine[4 * b:4 * b + 4] for mine, _ in parts])
        assert sorted(got) == list(order[start:start + 8])
    # a last batch with fewer images than ranks is left out on every rank (same step count)
    mine, sizes = batch_slices(np.arange(9), 4, 3, 4)
    assert sizes == [4, 4] and list(mine) == [3, 7]
    with pytest.raises(ValueError, match="does not divide"):
        batch_slices(order, 6, 0, 4)


def test_flips_of_a_slice_are_the_whole_batch_flips():
    from cam2mask_lib.classify import TrainConfig, _augment

    cfg = TrainConfig(encoder="mobilenetv3_small_050", vflip=True)
    x = torch.arange(7 * 3 * 4 * 5, dtype=torch.uint8).reshape(7, 3, 4, 5)
    whole = _augment(x, cfg, torch.Generator().manual_seed(3))
    for r in range(2):
        part = _augment(x[r::2], cfg, torch.Generator().manual_seed(3), (r, 2), len(x))
        assert torch.equal(part, whole[r::2])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's standalone rendezvous on Linux")
def test_synchronised_batchnorm_step_equals_one_process_step(tmp_path):
    """One DDP step of two gloo ranks (4 and 3 images) equals one process's step on the 7 images
    with torch's BatchNorm, in float64: outputs, every gradient, running statistics."""
    out = tmp_path / "diff.json"
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", worker, str(out)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    diff = json.loads(out.read_text())
    assert diff["synced modules"] > 10 and diff["names"]
    assert diff["logits"] < 1e-12 and diff["running stats"] < 1e-12 and diff["grads"] < 1e-10


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's standalone rendezvous on Linux")
def test_torchrun_with_fewer_folds_than_ranks_trains_each_fold_together(tmp_path):
    """--fold 0 on two ranks: DDP inside the fold. Rank 0 writes the fold once; without dropout
    the losses follow one process's to rounding (Adam amplifies rounding where a gradient is
    zero up to it, so the weights are compared through the losses, loosely)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["train", "--profile", "smoke", "--fold", "0", "--override", "classifier.dropout=0",
            "--no-progress", "--artifacts-dir"]
    one = subprocess.run([sys.executable, "-m", "cam2mask_lib", *args, str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "cam2mask_lib", *args, str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "on 2 ranks (DDP inside each fold)" in two.stdout
    fold = [next((tmp_path / d / "classifier").glob("*/fold0")) for d in ("one", "two")]
    assert sorted(p.name for p in fold[1].iterdir()) == sorted(p.name for p in fold[0].iterdir())
    assert not list(fold[1].parent.glob("fold1"))
    h = [json.loads((f / "done.json").read_text())["history"] for f in fold]
    assert len(h[0]) == len(h[1]) == 2
    for a, b in zip(*h):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.01 and abs(a["val_loss"] - b["val_loss"]) < 0.01
