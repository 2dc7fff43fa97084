import numpy as np
import pytest

from cam2mask_lib.utils import ConfigError
import torch
from torch import nn

from cam2mask_lib import classify
from cam2mask_lib.classify import (Classifier, PretrainedUnavailable, TrainConfig,
                                   average_state_dicts, averaged_model, build_classifier,
                                   train_cv)
from cam2mask_lib.data import folds_for, load_dataset

TINY = "mobilenetv3_small_050"


def test_head_is_the_papers_and_outputs_logits():
    m = build_classifier(TINY, 4).eval()
    kinds = [type(l) for l in m.head]
    assert kinds == [nn.Dropout, nn.Linear, nn.ELU, nn.Dropout, nn.Linear]
    assert m.head[-1].out_features == 4
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, 4)
        assert torch.allclose(out, m.head_from_features(m.features(x)))
    assert m.head[1].in_features == m.features(x).shape[1]  # measured channels, not num_features


def test_efficientnet_target_layer_is_bn2_with_silu():
    m = build_classifier("efficientnet_b0", 3).eval()
    assert m.target_layer is m.encoder.bn2
    assert isinstance(m.encoder.bn2.act, nn.SiLU)
    seen = {}
    h = m.target_layer.register_forward_hook(lambda mod, i, o: seen.setdefault("a", o))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = m.features(x)
    h.remove()
    assert torch.equal(seen["a"], feats) and feats.shape[1:] == (1280, 2, 3)


def test_learning_rate_groups():
    m = build_classifier(TINY, 4)
    opt = torch.optim.Adam(m.param_groups(1e-4, 1e-3))
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in m.head.parameters()}


def test_average_of_state_dicts_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(9)}
    avg = average_state_dicts([a, b, c])
    assert torch.allclose(avg["w"], torch.tensor([3.0, 3.0]))
    assert avg["n"].item() == 5


class _TinyEncoder(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2))


def test_averaged_model_averages_weights_and_recomputes_batchnorm():
    torch.manual_seed(0)
    models = [Classifier(_TinyEncoder(), 2, 1, hidden=3, dropout=0.0) for _ in range(3)]
    for m in models:  # give every model stale, different running statistics
        m.encoder[1].running_mean.fill_(float(torch.randn(1)))
    states = [m.state_dict() for m in models]
    data = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    avg = averaged_model(Classifier(_TinyEncoder(), 2, 1, hidden=3, dropout=0.0),
                         states, iter(data), torch.device("cpu"))
    w = torch.stack([s["encoder.0.weight"] for s in states]).mean(0)
    assert torch.allclose(avg.encoder[0].weight, w, atol=1e-6)
    assert torch.allclose(avg.head[1].weight, torch.stack([s["head.1.weight"] for s in states]).mean(0))
    # BatchNorm statistics: recomputed on the data with the averaged conv, not averaged
    with torch.no_grad():
        conv_out = torch.cat([nn.functional.conv2d(x, w) for x in data])
    expected = conv_out.mean(dim=(0, 2, 3))
    assert torch.allclose(avg.encoder[1].running_mean, expected, atol=1e-5)


@pytest.fixture
def tiny_run(synth_dir, tmp_path):
    idx = load_dataset(synth_dir)
    folds = folds_for(idx, tmp_path, n_folds=3, seed=0)
    cfg = TrainConfig(encoder=TINY, image_size=(32, 200), epochs=3, batch_size=8, lr_encoder=1e-3,
                      lr_head=1e-3, top_k=2, seed=1)
    return idx, folds, cfg


def test_resume_after_interruption_gives_the_same_weights(tiny_run, tmp_path, cut_short):
    idx, folds, cfg = tiny_run
    ref = train_cv(idx, folds, cfg, tmp_path / "ref", only_folds=[0], progress=False)
    cut = cut_short(classify, "_augment", 5)  # inside epoch 1 (each epoch has 3 batches of 8)
    with pytest.raises(KeyboardInterrupt):
        train_cv(idx, folds, cfg, tmp_path / "res", only_folds=[0], progress=False)
    cut.at = None
    res = train_cv(idx, folds, cfg, tmp_path / "res", only_folds=[0], progress=False)
    a = torch.load(ref.dir / "fold0" / "final.pt")
    b = torch.load(res.dir / "fold0" / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(ref.oof[folds == 0], res.oof[folds == 0])
    assert np.isnan(res.oof[folds != 0]).all() and not res.complete
    # a finished fold is reused, not retrained
    again = train_cv(idx, folds, cfg, tmp_path / "res", only_folds=[0], progress=False)
    assert np.array_equal(again.oof[folds == 0], res.oof[folds == 0])
    # other parameters: another run folder
    other = train_cv(idx, folds, TrainConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path / "res",
                     only_folds=[0], progress=False)
    assert other.dir != res.dir


def test_missing_weights_message(monkeypatch, tmp_path):
    import huggingface_hub.constants  # read once at import: the variable alone waits on the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedUnavailable, match="ImageNet weights for 'mobilenetv3_small_050' could not be loaded"):
        build_classifier(TINY, 4, pretrained=True)
    with pytest.raises(PretrainedUnavailable, match="--random-weights"):  # never a silent fallback
        build_classifier(TINY, 4, pretrained=True)
    # a local weights file works offline
    import timm
    src = timm.create_model(TINY, pretrained=False, num_classes=0, global_pool="")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = build_classifier(TINY, 4, weights_path=tmp_path / "w.pth")
    assert torch.equal(m.encoder.conv_stem.weight, src.conv_stem.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_classifier(TINY, 4, weights_path=tmp_path / "nope.pth")


def test_config_of_the_paper_profile_and_bad_values():
    from cam2mask_lib.profiles import get_profile
    cfg = get_profile("paper").classifier
    assert (cfg.encoder, cfg.lr_encoder, cfg.lr_head, cfg.batch_size, cfg.plateau_patience,
            cfg.plateau_factor, cfg.top_k) == ("efficientnet_b0", 1e-4, 1e-3, 64, 3, 0.5, 3)
    with pytest.raises(ConfigError, match=r"unknown classifier field\(s\) \['learning_rate'\]"):
        get_profile("cpu", classifier={"learning_rate": 1})
    for bad in (0, -1):  # no epoch trained must not pass as "trained with cross-validation"
        with pytest.raises(ValueError, match=f"classifier epochs={bad}: must be at least 1"):
            TrainConfig(epochs=bad)
    with pytest.raises(ValueError, match="image_size"):
        TrainConfig(image_size=(0, 0))


def test_workers_change_no_weight(tiny_run, tmp_path):
    """A fold trained with persistent DataLoader workers (every epoch, validation, BatchNorm
    update and out-of-fold pass through the same workers) equals one trained without."""
    import dataclasses
    idx, folds, cfg = tiny_run
    ref = train_cv(idx, folds, cfg, tmp_path / "ref", only_folds=[0], progress=False)
    cfg_w = dataclasses.replace(cfg, num_workers=1, cache_images=False)
    res = train_cv(idx, folds, cfg_w, tmp_path / "res", only_folds=[0], progress=False)
    a = torch.load(ref.dir / "fold0" / "final.pt")
    b = torch.load(res.dir / "fold0" / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(ref.oof[folds == 0], res.oof[folds == 0])


@pytest.mark.slow
def test_folds_in_processes_equal_one_thread_here(tiny_run, tmp_path):
    """Folds trained side by side in 1-thread processes (a memory-mapped image array crossing
    as its file's name) give the weights and out-of-fold probabilities that a 1-thread run in
    this process gives, and a cache key of their own."""
    import dataclasses

    from cam2mask_lib.data import ImageDataset, image_array
    idx, folds, cfg = tiny_run
    arr = image_array(idx, cfg.image_size, tmp_path / "images", progress=False)
    ds = ImageDataset(idx, cfg.image_size, with_masks=False, array=arr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train_cv(idx, folds, cfg, tmp_path / "ref", progress=False, ds=ds)
    finally:
        torch.set_num_threads(threads)
    par = dataclasses.replace(cfg, fold_processes=2)
    res = train_cv(idx, folds, par, tmp_path / "par", progress=False, ds=ds)
    assert res.complete and res.trained == (0, 1, 2)
    for k in range(3):
        a = torch.load(ref.dir / f"fold{k}" / "final.pt")
        b = torch.load(res.dir / f"fold{k}" / "final.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert np.array_equal(ref.oof, res.oof)
    assert res.dir.name != ref.dir.name and par.key()["threads"] == 1
    # the process count is speed only: 3 processes reuse the folds 2 made
    again = train_cv(idx, folds, dataclasses.replace(cfg, fold_processes=3), tmp_path / "par",
                     progress=False, ds=ds)
    assert again.dir == res.dir and again.trained == ()
    with pytest.raises(ValueError, match="fold_processes=-1: must be >= 0"):
        TrainConfig(fold_processes=-1)


def test_flips_follow_the_batch_device():
    """The flip draws come from a CPU generator and meet the batch where it lies (a batch that
    device decoding put on a GPU): checked with a batch on the meta device, which refuses to
    meet a CPU tensor."""
    cfg = TrainConfig(encoder=TINY, image_size=(32, 64), hflip=True, vflip=True)
    x = torch.zeros(4, 3, 32, 64, device="meta")
    out = classify._augment(x, cfg, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == x.shape
    # the same draws as before on the CPU: an image flipped iff its draw is under 0.5
    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    flips = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    got = classify._augment(x, TrainConfig(encoder=TINY, image_size=(32, 64)),
                            torch.Generator().manual_seed(1))
    for i in range(4):
        assert torch.equal(got[i], x[i].flip(-1) if flips[i] else x[i])
