"""The refined method's maps: the last layer's Grad-CAM++ times LayerCAM at stride 8 (fusion)."""
import json

import numpy as np
import torch

from cam2mask_lib import fusion
from cam2mask_lib.cams import CamCache, absolute_maps_on
from cam2mask_lib.classify import build_classifier


def _cache(path, low):
    path.mkdir(parents=True)
    np.save(path / "maps.npy", low.astype(np.float16))
    (path / "meta.json").write_text(json.dumps({"settings": {}}))
    return CamCache(path)


def test_the_fused_map_is_the_product_of_the_two_maps_scaled_to_its_peak(tmp_path):
    rng = np.random.default_rng(0)
    coarse = _cache(tmp_path / "a", rng.random((5, 6, 2, 3, 4)))  # the last layer: 3x4 cells
    fine = _cache(tmp_path / "b", rng.random((5, 6, 2, 12, 16)))  # a stride-8 stage: 12x16
    fused = fusion.FusedMaps(coarse, fine, stage=2)
    rows, size = [4, 1], (24, 32)
    got = fused.maps(rows, size)
    prod = coarse.maps(rows, size) * fine.maps(rows, size)
    assert got.shape == (2, 2, 24, 32)
    assert np.allclose(got, prod / prod.max((-2, -1), keepdims=True), atol=1e-6)
    assert np.allclose(got.max((-2, -1)), 1.0) and got.min() >= 0
    assert np.array_equal(fused.maps(rows, size, classes=[1])[:, 0], got[:, 1])
    assert not np.allclose(got, coarse.maps(rows, size))  # the fine map changed it
    scales = np.array([2.0, 0.5])
    ab = fused.absolute_on("cpu", rows, size, scales).numpy()
    both = (absolute_maps_on("cpu", coarse.low()[rows], size)
            * absolute_maps_on("cpu", fine.low()[rows], size)).numpy()
    assert np.allclose(ab, both / scales[None, :, None, None], rtol=1e-5)
    assert fused.paths() == [coarse.path, fine.path]
    assert "stage 2 (stride 8)" in fusion.describe_maps(fused)
    assert "the paper's" in fusion.describe_maps(coarse)


def test_a_map_that_is_zero_stays_zero(tmp_path):
    coarse = _cache(tmp_path / "a", np.zeros((2, 6, 1, 3, 4)))
    fine = _cache(tmp_path / "b", np.ones((2, 6, 1, 12, 16)))
    got = fusion.FusedMaps(coarse, fine, 2).maps([0, 1], (24, 32))
    assert np.isfinite(got).all() and not got.any()


def test_the_fine_stage_is_the_last_of_stride_8():
    assert fusion.fine_stage(build_classifier("tf_efficientnet_lite0", 2)) == 2
    assert fusion.fine_stage(build_classifier("mobilenetv3_small_050", 2)) == 1
    plain = torch.nn.Module()
    plain.encoder = torch.nn.Identity()  # no stages: the last layer's maps alone
    assert fusion.fine_stage(plain) is None
