"""torchrun on the CPU: two gloo processes train the smoke profile's classifier folds and then
every segmentation network of notebooks 04-06 between them, and the result equals a single
process's, bit for bit."""
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
