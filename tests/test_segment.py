"""Segmentation pieces: every loss against a value computed by hand on a tiny tensor, the
pseudo-label ignore logic, and each architecture's output shape at the profile's input size."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from cam2mask_lib.profiles import get_profile
from cam2mask_lib.losses import IGNORE, LOSSES, make_loss, to_class_index
from cam2mask_lib.segment import build_segmenter, confident_labels

LOGITS = torch.tensor([[[[0.0, 2.0], [-1.0, 1.0]]]])  # [1, 1, 2, 2]
TARGET = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.uint8)
sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
Z = [0.0, 2.0, -1.0, 1.0]
Y = [0, 1, 0, 1]
P = [sig(z) for z in Z]
BCE = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for y, p in zip(Y, P)) / 4
DICE = 2 * sum(p * y for p, y in zip(P, Y)) / (sum(P) + sum(Y))


def test_bce_minus_dice():
    assert make_loss("bce_dice", 1)(LOGITS, TARGET).item() == pytest.approx(0.7 * BCE - DICE, abs=1e-6)


def test_bce_minus_log_dice():
    assert make_loss("bce_logdice", 1)(LOGITS, TARGET).item() == pytest.approx(BCE - math.log(DICE), abs=1e-6)


def test_label_smoothing():
    a = 0.1
    ys = [y * (1 - a) + a / 2 for y in Y]
    ref = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for y, p in zip(ys, P)) / 4
    assert make_loss("bce_smooth", 1)(LOGITS, TARGET).item() == pytest.approx(ref, abs=1e-6)


def test_focal():
    import segmentation_models_pytorch as smp

    pt = [p if y else 1 - p for p, y in zip(P, Y)]
    ref = sum(-(1 - q) ** 2 * math.log(q) for q in pt) / 4
    assert make_loss("focal", 1)(LOGITS, TARGET).item() == pytest.approx(ref, abs=1e-6)
    # and smp's FocalLoss agrees where no pixel is ignored
    torch.manual_seed(0)
    z, t = torch.randn(2, 3, 4, 5), (torch.rand(2, 3, 4, 5) > 0.6).to(torch.uint8)
    lib = smp.losses.FocalLoss("multilabel", gamma=2.0)(z, t.float())
    assert make_loss("focal", 3)(z, t).item() == pytest.approx(lib.item(), abs=1e-6)


def test_lovasz_hinge_by_hand():
    # logits 0.5, 0.5 with labels 1, 0: hinge errors 0.5 and 1.5; sorted (1.5 on the negative,
    # 0.5 on the positive), the Jaccard gradient is (0.5, 0.5): loss = 1.5*0.5 + 0.5*0.5 = 1
    logits = torch.tensor([[[[0.5, 0.5]]]])
    target = torch.tensor([[[[1, 0]]]], dtype=torch.uint8)
    assert make_loss("lovasz", 1)(logits, target).item() == pytest.approx(1.0, abs=1e-6)


def test_weighted_cce_minus_quarter_dice():
    # 2 classes + background, 1 image of 3 pixels: background, class a, class b
    logits = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0]]]])  # [1, 3, 1, 3]
    masks = torch.tensor([[[[0, 1, 0]], [[0, 0, 1]]]], dtype=torch.uint8)  # [1, 2, 1, 3]
    w = [1.0, 2.0, 0.5]  # background, a, b
    z = logits[0, :, 0, :].numpy().T  # [pixel, class]
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = [0, 1, 2]
    ce = sum(w[t] * -math.log(p[i, t]) for i, t in enumerate(y)) / sum(w[t] for t in y)
    dice = np.mean([2 * p[k, k] / (p[:, k].sum() + 1) for k in range(3)])  # one true pixel each
    loss = make_loss("cce_dice", 2, class_weights=w[1:])
    assert loss(logits, masks).item() == pytest.approx(0.7 * ce - 0.25 * dice, abs=1e-6)


def test_ignored_pixels_do_not_count():
    target = TARGET.clone()
    target[0, 0, 1, 0] = IGNORE  # the pixel with logit -1 and label 0
    keep = [0, 1, 3]
    ref = -sum(Y[i] * math.log(P[i]) + (1 - Y[i]) * math.log(1 - P[i]) for i in keep) / 3
    assert make_loss("bce_smooth", 1, smoothing=0.0)(LOGITS, target).item() == pytest.approx(ref, abs=1e-6)
    dice = 2 * sum(P[i] * Y[i] for i in keep) / (sum(P[i] for i in keep) + sum(Y))
    assert make_loss("bce_dice", 1)(LOGITS, target).item() == pytest.approx(0.7 * ref - dice, abs=1e-6)


def test_confident_labels_trust_only_confident_pixels():
    maps = np.array([[[[0.9, 0.5, 0.1]], [[0.9, 0.5, 0.1]]]], np.float32)  # [1, 2, 1, 3]
    present = np.array([[True, False]])
    t = confident_labels(maps > 0.6, maps < 0.2, present)
    assert t[0, 0, 0].tolist() == [1, IGNORE, 0]   # present: confident fg, unsure, confident bg
    assert t[0, 1, 0].tolist() == [0, 0, 0]        # absent class: all background
    both = confident_labels(np.ones_like(maps, bool), np.ones_like(maps, bool), present)
    assert (both[0, 0] == 1).all()  # a pixel called both is defect


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confident_labels_of_a_tensor_equal_numpys_at_the_cuts(dtype):
    """On a tensor (the CAMs made on the context's device) the targets are a uint8 tensor with
    the values numpy gives, also at the cuts and one step either side of them."""
    cuts = [dtype(0.6), dtype(0.2)]
    vals = np.concatenate([[np.nextafter(c, dtype(-1)), c, np.nextafter(c, dtype(2))]
                           for c in cuts]).astype(dtype)
    maps = np.broadcast_to(vals, (2, 3, 1, len(vals))).copy()
    present = np.array([[True, False, True], [True, True, False]])
    ref = np.where(maps > 0.6, 1, np.where(maps < 0.2, 0, IGNORE)).astype(np.uint8)
    ref[~present] = 0
    m = torch.from_numpy(maps)
    got = confident_labels(m > 0.6, m < 0.2, present)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
    assert np.array_equal(got.numpy(), ref)
    assert np.array_equal(confident_labels(maps > 0.6, maps < 0.2, present), ref)


def test_class_index():
    m = torch.tensor([[[[1, 0, 0, 255]], [[0, 0, 1, 0]]]], dtype=torch.uint8)
    assert to_class_index(m)[0, 0].tolist() == [1, 0, 2, IGNORE]


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        make_loss("dice", 4)


CPU_ARCHS = [("unet", "resnet18"), ("unet", "tu-mobilenetv3_small_050"),
             ("unetplusplus", "resnet18"), ("fpn", "resnet18"), ("deeplabv3plus", "resnet18"),
             ("thesis_unet", None), ("resnet_encdec", "resnet18")]


@pytest.mark.parametrize("arch, encoder, profile",
                         [(a, e, "cpu") for a, e in CPU_ARCHS] + [("unet", "resnet18", "paper")])
def test_output_shape_at_the_profile_size(arch, encoder, profile):
    """Every architecture at the cpu profile's segmentation size; one at the paper's 256x1600."""
    h, w = get_profile(profile).segmentation.size
    model = build_segmenter(arch, encoder or "resnet18", classes=4, slim=True).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, h, w))
    assert out.shape == (1, 4, h, w)


def test_seg_size_must_be_divisible_by_32():
    with pytest.raises(ValueError, match="segmentation size 64x400 has a side not divisible by 32.*64x384"):
        get_profile("cpu", **{"segmentation.size": (64, 400)})
    with pytest.raises(ValueError, match="grid size 50x50 .* 32x32"):
        get_profile("cpu", **{"grid.size": (50, 50)})


def test_losses_are_a_registry_of_small_classes():
    assert set(LOSSES) == {"bce_dice", "cce_dice", "focal", "bce_logdice", "lovasz", "bce_smooth"}
    for name, cls in LOSSES.items():
        loss = make_loss(name, 2)
        assert type(loss) is cls and loss.name == name
    assert LOSSES["cce_dice"].softmax and not LOSSES["bce_dice"].softmax


def test_encoder_starts_from_the_classifier():
    from cam2mask_lib.classify import build_classifier
    from cam2mask_lib.segment import load_encoder

    torch.manual_seed(0)
    cls = build_classifier("mobilenetv3_small_050", 4)
    seg = build_segmenter("unet", "tu-mobilenetv3_small_050", classes=4, slim=True)
    load_encoder(seg, cls.encoder.state_dict())
    a, b = seg.encoder.model.state_dict(), cls.encoder.state_dict()
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="do not fit the encoder"):
        load_encoder(build_segmenter("unet", "resnet18", classes=4), cls.encoder.state_dict())


def test_a_frozen_encoder_keeps_its_stem_and_first_stages(synth_dir, tmp_path):
    """``freeze=1``: the stem and first stage keep the classifier's weights through training (no
    gradient, not in the optimiser) while the next stage and the decoder learn."""
    from cam2mask_lib.classify import build_classifier
    from cam2mask_lib.data import ImageDataset, load_dataset
    from cam2mask_lib.segment import SegConfig, SegmenterTrainer
    from cam2mask_lib.utils import ConfigError

    torch.manual_seed(0)
    state = build_classifier("mobilenetv3_small_050", 4).encoder.state_dict()
    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 64), with_masks=False)
    targets = lambda rows: (np.random.default_rng(len(rows)).random(  # noqa: E731
        (len(rows), 4, 32, 64)) > 0.9).astype(np.uint8)
    cfg = SegConfig(arch="unet", encoder="tu-mobilenetv3_small_050", slim=True, epochs=1,
                    batch_size=4, encoder_init="classifier", freeze=1)
    assert "first 1 stages frozen" in cfg.weights() and cfg.key()["freeze"] == 1
    tr = SegmenterTrainer(ds, targets, np.arange(8), 4, cfg, tmp_path / "f", progress=False,
                          encoder_state=state)
    enc = tr.model.encoder.model
    trained = {id(p) for g in tr.opt.param_groups for p in g["params"]}
    frozen = [p for m in (enc.conv_stem, enc.bn1, enc.blocks[0]) for p in m.parameters()]
    assert frozen and not any(id(p) in trained for p in frozen)
    tr.fit()
    after = enc.state_dict()
    for name, _ in (*enc.conv_stem.named_parameters("conv_stem"),
                    *enc.blocks[0].named_parameters("blocks.0")):
        assert torch.equal(after[name], state[name]), name
    assert not all(torch.equal(after[n], state[n]) for n, _ in
                   enc.blocks[1].named_parameters("blocks.1"))
    with pytest.raises(ConfigError, match="keeps them random"):
        SegConfig(arch="unet", encoder="tu-mobilenetv3_small_050", freeze=1)
    with pytest.raises(ConfigError, match="only a timm encoder"):
        SegConfig(arch="unet", encoder="efficientnet-b0", pretrained=True, freeze=1)


@pytest.mark.slow
def test_training_learns_ignores_and_resumes(synth_dir, tmp_path):
    from cam2mask_lib.data import ImageDataset, load_dataset
    from cam2mask_lib.segment import SegConfig, predict_masks, train_segmenter

    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 160), cache=True)
    truth = lambda rows: np.stack([ds[int(i)]["masks"].numpy() for i in rows])  # noqa: E731
    rows = np.arange(len(idx))
    cfg = SegConfig(arch="thesis_unet", loss="bce_dice", epochs=4, batch_size=8, lr=3e-3)
    model = train_segmenter(ds, truth, rows, 4, cfg, tmp_path / "a", progress=False)
    import json
    hist = json.loads((tmp_path / "a" / "done.json").read_text())["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    out = list(predict_masks(model, ds, rows[:5]))
    assert out[0][1].shape == (5, 4, 32, 160) and 0 <= out[0][1].min() <= out[0][1].max() <= 1
    # all pixels ignored: nothing to learn from, the loss is 0 - Dice term of empty targets
    ignore_all = lambda rows: np.full((len(rows), 4, 32, 160), IGNORE, np.uint8)  # noqa: E731
    cfg2 = SegConfig(arch="thesis_unet", loss="bce_smooth", epochs=1, batch_size=8)
    train_segmenter(ds, ignore_all, rows, 4, cfg2, tmp_path / "b", progress=False)
    hist = json.loads((tmp_path / "b" / "done.json").read_text())["history"]
    assert hist[0]["loss"] == 0.0
    # a finished run is loaded, not retrained; with EMA the averaged weights are returned
    again = train_segmenter(ds, truth, rows, 4, cfg, tmp_path / "a", progress=False)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg3 = SegConfig(arch="thesis_unet", loss="bce_dice", epochs=1, batch_size=8, ema=0.9)
    m3 = train_segmenter(ds, truth, rows, 4, cfg3, tmp_path / "c", progress=False)
    raw = torch.load(tmp_path / "c" / "state.pt", weights_only=False)["model"]
    k = "head.weight"
    assert not torch.equal(m3.state_dict()[k], raw[k])


def test_swa_averages_the_last_epochs(synth_dir, tmp_path):
    from cam2mask_lib.data import ImageDataset, load_dataset
    from cam2mask_lib.segment import SegConfig, train_segmenter

    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 160), cache=True)
    truth = lambda rows: np.stack([ds[int(i)]["masks"].numpy() for i in rows])  # noqa: E731
    rows = np.arange(len(idx))
    with pytest.raises(ValueError, match="swa_start must be an epoch"):
        SegConfig(epochs=2, swa_start=2)
    with pytest.raises(ValueError, match="ema or swa_start"):
        SegConfig(ema=0.9, swa_start=0)
    cfg = SegConfig(arch="thesis_unet", epochs=2, batch_size=8, lr=3e-3, swa_start=0)
    m = train_segmenter(ds, truth, rows, 4, cfg, tmp_path / "swa", progress=False)
    last = torch.load(tmp_path / "swa" / "state.pt", weights_only=False)["model"]
    k = "head.weight"
    assert not torch.equal(m.state_dict()[k], last[k])  # the average, not the last epoch


@pytest.mark.slow
def test_workers_change_no_weight_of_a_segmenter(synth_dir, tmp_path):
    """Images read by persistent DataLoader workers (training, SWA's BatchNorm update and
    prediction, from JPEG files: the paper profile's case) give the weights and probabilities of
    images read in the process; the workers' count is not part of the cache key."""
    from cam2mask_lib.data import ImageDataset, load_dataset
    from cam2mask_lib.segment import SegConfig, predict_masks, train_segmenter

    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 160), with_masks=False)  # no cache: decoded per batch
    masks = ImageDataset(idx, (32, 160), cache=True)
    truth = lambda rows: np.stack([masks[int(i)]["masks"].numpy() for i in rows])  # noqa: E731
    rows = np.arange(len(idx))
    cfg = SegConfig(arch="thesis_unet", epochs=2, batch_size=8, lr=3e-3, swa_start=1)
    cfg_w = dataclasses.replace(cfg, num_workers=1)
    assert cfg.key() == cfg_w.key()
    with pytest.raises(ValueError, match="num_workers=-1"):
        SegConfig(num_workers=-1)
    a = train_segmenter(ds, truth, rows, 4, cfg, tmp_path / "a", progress=False)
    b = train_segmenter(ds, truth, rows, 4, cfg_w, tmp_path / "b", progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pa = list(predict_masks(a, ds, rows[3:], batch_size=5))
    pb = list(predict_masks(a, ds, rows[3:], batch_size=5, num_workers=1))
    assert len(pa) == len(pb) == -(-(len(rows) - 3) // 5)
    assert all(np.array_equal(ra, rb) and np.array_equal(xa, xb)
               for (ra, xa), (rb, xb) in zip(pa, pb))


@pytest.mark.slow
def test_targets_that_read_the_training_images_are_given_the_batch(synth_dir, tmp_path):
    """Targets whose guide is the training dataset (refined self-training targets) get each
    batch's uint8 images from the trainer, with workers or without, unflipped and in the batch's
    order, instead of reading them a second time; the weights are those of the same targets
    given rows only; targets with another guide are given rows only."""
    from cam2mask_lib.data import ImageDataset, load_dataset
    from cam2mask_lib.seg_stage import Targets
    from cam2mask_lib.segment import SegConfig, train_segmenter

    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 160), with_masks=False)
    other = ImageDataset(idx, (32, 160), with_masks=False)  # the same images, read apart
    masks = ImageDataset(idx, (32, 160), cache=True)
    truth = lambda rows: np.stack([masks[int(i)]["masks"].numpy() for i in rows])  # noqa: E731
    rows = np.arange(len(idx))
    given = []

    def guided(r, images):
        assert torch.equal(images, other.uint8_batch(r))
        given.append(len(r))
        return truth(r)

    cfg = SegConfig(arch="thesis_unet", epochs=2, batch_size=8, lr=3e-3)
    a = train_segmenter(ds, truth, rows, 4, cfg, tmp_path / "a", progress=False)
    for w in (0, 1):
        given.clear()
        b = train_segmenter(ds, Targets("t", {}, guided, guide=ds), rows, 4,
                            dataclasses.replace(cfg, num_workers=w), tmp_path / f"b{w}",
                            progress=False)
        assert sum(given) == 2 * len(rows), w  # every image of both epochs, through the batch
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), w
    c = train_segmenter(ds, Targets("t", {}, truth, guide=other), rows, 4, cfg, tmp_path / "c",
                        progress=False)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


# --------------------------------------------------------------------------------------------
# Where encoders start: local weight files (offline ImageNet), the explicit random flag
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, encoder, source", [
    ("unet", "tu-mobilenetv3_small_050", "timm"),   # a timm encoder: timm's state dict
    ("resnet_encdec", "resnet18", "timm"),          # the thesis's network: timm's too
    ("fpn", "resnet18", "smp"),                     # smp's own encoder: smp's state dict
])
def test_encoder_starts_from_a_local_weights_file(tmp_path, arch, encoder, source):
    import timm
    torch.manual_seed(1)
    if source == "timm":
        state = timm.create_model(encoder.removeprefix("tu-"), pretrained=False).state_dict()
    else:
        state = build_segmenter(arch, encoder, pretrained=False).encoder.state_dict()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")  # a checkpoint holding the state
    model = build_segmenter(arch, encoder, weights_path=tmp_path / "w.pth")
    enc = getattr(model.encoder, "model", model.encoder)
    own = enc.state_dict()
    assert own and all(torch.equal(own[k], state[k]) for k in own)
    random = build_segmenter(arch, encoder)  # without the file: not those weights
    other = getattr(random.encoder, "model", random.encoder).state_dict()
    assert not all(torch.equal(other[k], state[k]) for k in other if other[k].is_floating_point())


def test_a_weights_file_of_another_encoder_is_refused(tmp_path):
    import timm
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="do not fit the encoder"):
        build_segmenter("unet", "tu-mobilenetv3_small_050", weights_path=tmp_path / "r18.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_segmenter("unet", "tu-mobilenetv3_small_050", weights_path=tmp_path / "nope.pth")


def test_unavailable_imagenet_weights_stop_with_the_ways_out(monkeypatch):
    from cam2mask_lib.segment import EncoderWeightsUnavailable
    import huggingface_hub.constants  # read once at import: the variable alone waits on the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderWeightsUnavailable, match="weights_path=FILE.*--random-weights"):
        build_segmenter("unet", "tu-mobilenetv3_small_050", pretrained=True)


def test_cache_key_follows_the_weights_file_not_its_path(tmp_path):
    from cam2mask_lib.segment import SegConfig
    for name, data in (("a.pth", b"one"), ("b.pth", b"one"), ("c.pth", b"two")):
        (tmp_path / name).write_bytes(data)
    key = {n: SegConfig(weights_path=str(tmp_path / n)).key() for n in ("a.pth", "b.pth", "c.pth")}
    assert key["a.pth"] == key["b.pth"] != key["c.pth"]
    assert "sha256" in SegConfig(weights_path=str(tmp_path / "a.pth")).weights()


def test_every_table_says_how_the_networks_start(tmp_path):
    from cam2mask_lib.profiles import get_profile, with_random_weights
    from cam2mask_lib.report import Provenance
    from cam2mask_lib.utils import ConfigError
    cpu = get_profile("cpu")
    line = Provenance("cpu", "data", 0, weights=cpu.weights()).line()
    assert "classifier RANDOM initialisation" in line and "started from the fold's classifier" in line
    paper = get_profile("paper")
    assert "RANDOM" not in paper.weights() and "ImageNet" in paper.weights()
    # the explicit flag: every network random, and the profile says so
    flagged = get_profile("paper", **with_random_weights({}))
    assert flagged.weights().count("RANDOM") == 3  # classifier, U-Net, grid's ResNet
    (tmp_path / "b0.pth").write_bytes(b"x")
    with pytest.raises(ConfigError, match="contradicts.*classifier.weights_path"):
        with_random_weights({"classifier.weights_path": str(tmp_path / "b0.pth")})
    with pytest.raises(ConfigError, match="grid.weights_path='/nowhere/r34.pth': no such file"):
        get_profile("paper", **{"grid.weights_path": "/nowhere/r34.pth"})
    local = get_profile("paper", **{"classifier.weights_path": str(tmp_path / "b0.pth")})
    assert local.weights().startswith("classifier ImageNet weights from b0.pth (sha256")


def test_the_grids_weights_file_goes_to_its_resnet_only(tmp_path):
    from types import SimpleNamespace

    from cam2mask_lib.experiments import LECTURE_RUNS, THESIS_ARCHS, grid_config
    (tmp_path / "r34.pth").write_bytes(b"x")
    gctx = SimpleNamespace(profile=get_profile("paper", **{"grid.weights_path":
                                                           str(tmp_path / "r34.pth")}))
    cls = SimpleNamespace(config=SimpleNamespace(encoder="efficientnet_b0"))
    got = {name: grid_config(gctx, spec, cls)
           for name, spec in {**THESIS_ARCHS, **LECTURE_RUNS}.items()}
    for name, cfg in got.items():
        thesis = name in ("U-Net with ResNet encoder", "ResNet encoder-decoder")
        assert (cfg.weights_path == str(tmp_path / "r34.pth")) == thesis, name
        assert (cfg.encoder_init == "classifier") == (name in LECTURE_RUNS), name


def test_augmentation_moves_each_image_with_its_targets():
    from cam2mask_lib.segment import SegConfig, augment
    gen = torch.Generator().manual_seed(0)
    n, h, w = 16, 8, 12
    y = (torch.rand(n, 2, h, w, generator=gen) < 0.3).to(torch.uint8)
    x = torch.cat([y[:, :1] * 200, torch.arange(h * w).reshape(1, 1, h, w).expand(n, 2, h, w)],
                  1).to(torch.uint8)  # channel 0 is class 0's target; 1-2 say where a pixel was
    cfg = SegConfig(hflip=True)
    xa, ya = augment(x, y, torch.Generator().manual_seed(1), cfg)
    assert (xa[:, 0] == ya[:, 0] * 200).all()  # the targets went where their pixels went
    assert (xa[:, 1] == xa[:, 2]).all()
    flipped = ~(xa == x).flatten(1).all(1)
    assert 0 < flipped.sum() < n  # each image drawn on its own
    for xi, x0, f in zip(xa, x, flipped):  # every image is its own pixels, flipped or not
        assert (xi[1] == (x0[1].flip(-1) if f else x0[1])).all()
    # the same generator state, the same batch; off, nothing moves
    xb, yb = augment(x, y, torch.Generator().manual_seed(1), cfg)
    assert (xb == xa).all() and (yb == ya).all()
    xc, yc = augment(x, y, torch.Generator().manual_seed(1), SegConfig(hflip=False))
    assert (xc == x).all() and (yc == y).all()


def test_a_field_at_its_default_stays_out_of_the_key():
    """One cache-key rule (utils.config_key): where and how fast are left out, and so is every
    field at its default, so a field added later leaves earlier keys as they were."""
    from cam2mask_lib.segment import SegConfig
    plain = SegConfig()
    assert plain.key() == {}
    assert SegConfig(device="cpu", num_workers=2).key() == {}
    assert SegConfig(epochs=3, hflip=False).key() == {"epochs": 3, "hflip": False}


@pytest.mark.slow
def test_networks_side_by_side_equal_one_thread_here(synth_dir, tmp_path):
    """Set-ups trained together with ``processes`` (every (set-up, fold) network in a 1-thread
    process, its targets made here first) give the weights that 1-thread training in this process
    gives, under a cache key of their own; the process count is speed only."""
    from cam2mask_lib import pipeline
    from cam2mask_lib.seg_stage import (Targets, fixed_targets, train_segmenter_sets,
                                        true_targets)
    from cam2mask_lib.segment import SegConfig

    ctx = pipeline.context("smoke", data_dir=synth_dir, artifacts_dir=tmp_path / "art",
                           segmentation={"folds": (0, 1)})
    cfg = SegConfig(arch="thesis_unet", epochs=1, batch_size=8, lr=3e-3, slim=True)
    true = true_targets(ctx)
    grey = Targets("grey", {"masks": "grey"},  # another set-up: targets read from the images
                   lambda rows: (ctx.seg_images().uint8_batch(rows).float().mean(1, keepdim=True)
                                 > 100).expand(-1, 4, -1, -1).to(torch.uint8))
    sets = [(ctx, true, cfg), (ctx, grey, dataclasses.replace(cfg, loss="focal"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train_segmenter_sets(sets, progress=False)
    finally:
        torch.set_num_threads(threads)
    par_sets = [(c, t, dataclasses.replace(g, processes=2)) for c, t, g in sets]
    par = train_segmenter_sets(par_sets, progress=False)
    for a, b in zip(ref, par):
        assert list(a.models) == list(b.models) == [0, 1] and a.dir != b.dir
        for k in a.models:
            sa, sb = a.models[k].state_dict(), b.models[k].state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa), (b.dir, k)
    assert par[0].config.key()["threads"] == 1 and "threads" not in ref[0].config.key()
    stamp = {p: p.stat().st_mtime_ns for r in par for p in r.dir.glob("fold*/final.pt")}
    again = train_segmenter_sets([(c, t, dataclasses.replace(g, processes=3))
                                  for c, t, g in sets], progress=False)
    assert [r.dir for r in again] == [r.dir for r in par]
    assert stamp == {p: p.stat().st_mtime_ns for r in again for p in r.dir.glob("fold*/final.pt")}
    rows = np.array([5, 2, 9])
    fixed = fixed_targets(grey, ctx.seg_images(), rows, batch=2)
    assert np.array_equal(fixed([9, 5]), grey([9, 5]).numpy())
    with pytest.raises(ValueError, match="processes=-1: must be >= 0"):
        SegConfig(processes=-1)
