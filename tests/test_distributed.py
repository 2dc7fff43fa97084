"""torchrun on the CPU: two gloo processes train the smoke profile's classifier folds between
them, and the result equals a single process's, bit for bit."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cam2mask_lib.distributed import my_folds


def test_folds_are_dealt_round_robin():
    assert my_folds(range(5), 0, 2) == [0, 2, 4] and my_folds(range(5), 1, 2) == [1, 3]
    assert my_folds([0, 1], 2, 3) == []  # more ranks than folds: a rank may have none
    assert sorted(sum((my_folds(range(7), r, 3) for r in range(3)), [])) == list(range(7))


def _train(args, tmp, env):
    out = subprocess.run(args + ["train", "--profile", "smoke", "--artifacts-dir", str(tmp),
                                 "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's standalone rendezvous on Linux")
def test_torchrun_two_gloo_processes_give_the_single_process_folds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # as torchrun's
    single = _train([sys.executable, "-m", "cam2mask_lib"], tmp_path / "one", env)
    multi = _train([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "cam2mask_lib"], tmp_path / "two", env)
    assert "on 2 ranks" in multi and "ROC-AUC (all folds)" in multi
    a = pd.read_csv(next((tmp_path / "one" / "classifier").glob("*/oof.csv")))
    b = pd.read_csv(next((tmp_path / "two" / "classifier").glob("*/oof.csv")))
    assert a.columns.tolist() == b.columns.tolist() and len(a) == 40
    assert np.array_equal(a.filter(like="p_").to_numpy(), b.filter(like="p_").to_numpy())
