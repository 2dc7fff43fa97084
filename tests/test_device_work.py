"""Work that must stay on the accelerator, checked on the CPU: a training epoch reads its loss
back once (not once per step: on a GPU each read waits for every queued kernel), and training,
prediction and the CAM backbone run under the device's autocast (bf16 on CUDA)."""
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

from cam2mask_lib import cams, segment
from cam2mask_lib.classify import TrainConfig, train_cv
from cam2mask_lib.data import ImageDataset, folds_for, load_dataset
from cam2mask_lib.segment import SegConfig, predict_masks, train_segmenter


def _count_reads(monkeypatch) -> list:
    """Every ``float(tensor)`` and ``tensor.item()`` that the project's own code makes from now
    on (the libraries' are theirs: Adam reads its step counter, which lives on the CPU; timm's
    BatchNorm reads its batch count while the averaged weights' statistics are recomputed)."""
    reads, real_float, real_item = [], torch.Tensor.__float__, torch.Tensor.item
    own = str(Path(cams.__file__).parent)

    def counted(real):
        def read(t):
            if sys._getframe(1).f_code.co_filename.startswith(own):
                reads.append(sys._getframe(1).f_code.co_name)
            return real(t)
        return read

    monkeypatch.setattr(torch.Tensor, "__float__", counted(real_float))
    monkeypatch.setattr(torch.Tensor, "item", counted(real_item))
    return reads


def test_a_segmentation_epoch_reads_its_loss_once(synth_dir, tmp_path, monkeypatch):
    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 64), with_masks=False)
    targets = lambda rows: np.zeros((len(rows), 4, 32, 64), np.uint8)  # noqa: E731
    reads = _count_reads(monkeypatch)
    counts = {}
    for bs in (2, 8):  # 8 steps, then 2: the same number of reads
        reads.clear()
        train_segmenter(ds, targets, np.arange(16), 4, SegConfig(arch="thesis_unet", epochs=1,
                                                                  batch_size=bs),
                        tmp_path / f"b{bs}", progress=False)
        counts[bs] = len(reads)
    assert counts[2] == counts[8] <= 2


def test_a_classifier_epoch_reads_its_loss_once(synth_dir, tmp_path, monkeypatch):
    idx = load_dataset(synth_dir)
    folds = folds_for(idx, tmp_path, n_folds=3, seed=0)
    reads = _count_reads(monkeypatch)
    counts = {}
    for bs in (2, 8):
        reads.clear()
        cfg = TrainConfig(encoder="mobilenetv3_small_050", image_size=(32, 64), epochs=1,
                          batch_size=bs, top_k=1)
        train_cv(idx, folds, cfg, tmp_path / f"b{bs}", only_folds=[0], progress=False)
        counts[bs] = len(reads)
    assert counts[2] == counts[8]  # the validation's loss is read once too, whatever the steps


def test_training_prediction_and_cams_run_under_the_devices_autocast(synth_dir, tmp_path,
                                                                     monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(torch.device(device).type)
        yield

    for module in (segment, cams):
        monkeypatch.setattr(module, "autocast", recording)
    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 64), with_masks=False)
    targets = lambda rows: np.zeros((len(rows), 4, 32, 64), np.uint8)  # noqa: E731
    m = train_segmenter(ds, targets, np.arange(8), 4, SegConfig(arch="thesis_unet", epochs=1,
                                                                 batch_size=4),
                        tmp_path / "s", progress=False)
    assert entered == ["cpu", "cpu"]  # one per training step
    entered.clear()
    list(predict_masks(m, ds, np.arange(8), batch_size=4))
    assert entered == ["cpu", "cpu"]
    entered.clear()
    from cam2mask_lib.classify import build_classifier
    clf = build_classifier("mobilenetv3_small_050", 4).eval()
    cams.compute_cams(clf, ds.uint8_batch(np.arange(4)), "gradcam++", aug_smooth=True)
    assert entered == ["cpu"]
