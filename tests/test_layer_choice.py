"""Each class's map chosen by the classifier's deletion test, labels only (layer_choice)."""
import json

import numpy as np
import torch

from cam2mask_lib import layer_choice as lc
from cam2mask_lib.cams import AUG_VIEWS, CamCache, absolute_maps_on
from cam2mask_lib.classify import build_classifier


def _cache(path, low):
    path.mkdir(parents=True)
    np.save(path / "maps.npy", low.astype(np.float16))
    (path / "meta.json").write_text(json.dumps({"settings": {}}))
    return CamCache(path)


def test_each_class_is_served_from_its_chosen_cache(tmp_path):
    rng = np.random.default_rng(0)
    a = _cache(tmp_path / "a", rng.random((5, 6, 2, 3, 4)))  # last layer: 3x4 cells
    b = _cache(tmp_path / "b", rng.random((5, 6, 2, 12, 16)))  # an earlier stage: 12x16
    choice = lc.LayerChoice({"a": a, "b": b}, ["b", "a"])
    rows, size = [4, 1], (24, 32)
    got = choice.maps(rows, size)
    assert got.shape == (2, 2, 24, 32)
    assert np.array_equal(got[:, 0], b.maps(rows, size, classes=[0])[:, 0])
    assert np.array_equal(got[:, 1], a.maps(rows, size, classes=[1])[:, 0])
    assert np.array_equal(choice.maps(rows, size, classes=[1])[:, 0], got[:, 1])
    scales = np.array([2.0, 0.5])
    ab = choice.absolute_on("cpu", rows, size, scales).numpy()
    assert np.allclose(ab[:, 0], absolute_maps_on("cpu", b.low()[rows], size)[:, 0].numpy() / 2)
    assert np.allclose(ab[:, 1], absolute_maps_on("cpu", a.low()[rows], size)[:, 1].numpy() * 2)
    assert "b" in choice.describe(["x", "y"]).split(";")[0]


class _SpotModel(torch.nn.Module):
    """Class 0's logit rises with the brightness of the top-left 4x4 patch; class 1 reads the
    whole image's mean."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        spot = x[:, :, :4, :4].mean((1, 2, 3))
        return torch.stack([self.w * 4 * (spot - 1), self.w * x.mean((1, 2, 3))], 1)


class _Images:
    def __init__(self, n):
        x = np.zeros((n, 3, 32, 32), np.uint8)
        x[:, :, :4, :4] = 255  # the evidence of class 0
        self.x = torch.from_numpy(x)

    def uint8_batch(self, rows):
        return self.x[np.asarray(rows)]


def _views(one):
    """Six aug-smoothing views of ``[N, C, h, w]`` maps, the flipped ones stored flipped."""
    return np.stack([one[..., ::-1] if flip else one for flip, _ in AUG_VIEWS], 1)


def test_the_deletion_test_prefers_the_map_that_holds_the_evidence(tmp_path):
    n = 8
    on = np.zeros((n, 2, 8, 8), np.float32)
    on[:, 0, 0, 0] = 1.0  # the spot's cell
    on[:, 0, 1:, 1:] = 0.01
    off = np.zeros((n, 2, 8, 8), np.float32)
    off[:, 0, 4:, 4:] = 1.0  # elsewhere
    on, off = _views(on), _views(off)
    caches = {"spot": _cache(tmp_path / "on", on), "elsewhere": _cache(tmp_path / "off", off)}
    labels = np.zeros((n, 2), bool)
    labels[:, 0] = True
    model = _SpotModel().eval()
    test = lc.DeletionTest(fractions=(0.02, 0.05), images=6, blur=1 / 8)
    choice = lc.choose(caches, {0: model, 1: model}, _Images(n), np.arange(n) % 2, labels,
                       ["spotty", "never"], (32, 32), test, progress=False)
    assert choice.chosen == ["spot", lc.LAST]  # no positives: the last layer's map
    s = choice.scores["spotty"]
    assert s["spot"] < s["elsewhere"] - 0.1
    rec = choice.record(["spotty", "never"])
    assert rec["spotty"]["chosen"] == "spot" and rec["never"]["deletion_scores"] == {}


def test_candidates_are_the_last_stage_at_strides_8_and_16():
    assert lc.stage_candidates(build_classifier("tf_efficientnet_lite0", 2)) == {
        "stride 8": 2, "stride 16": 4}
    assert lc.stage_candidates(build_classifier("mobilenetv3_small_050", 2)) == {
        "stride 8": 1, "stride 16": 3}
    plain = torch.nn.Module()
    plain.encoder = torch.nn.Identity()  # no stages: every class reads the last layer
    assert lc.stage_candidates(plain) == {}
