import tracemalloc

import numpy as np
import pytest
import torch

from cam2mask_lib import cams
from cam2mask_lib.cams import library_cams, available_methods, cam_dataset, compute_cams
from cam2mask_lib.classify import build_classifier
from cam2mask_lib.data import ImageDataset, load_dataset


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {e: build_classifier(e, 4).eval() for e in ("mobilenetv3_small_050", "efficientnet_b0")}


@pytest.mark.parametrize("encoder", ["mobilenetv3_small_050", "efficientnet_b0"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
@pytest.mark.parametrize("aug", [False, True])
def test_equal_to_grad_cam(models, encoder, method, aug):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = models[encoder]
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 160)
    ours = compute_cams(model, x, method=method, aug_smooth=aug)
    assert ours.shape == (3, 4, 64, 160) and ours.dtype == np.float32
    assert ours.min() >= 0 and ours.max() <= 1 + 1e-6
    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}[method]
    with cls(model=model, target_layers=[model.target_layer]) as cam:
        for c in range(4):
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * 3, aug_smooth=aug)
            assert np.abs(ours[:, c] - ref).max() < 1e-4, (c, np.abs(ours[:, c] - ref).max())


@pytest.mark.parametrize("encoder", ["mobilenetv3_small_050", "efficientnet_b0"])
@pytest.mark.parametrize("aug", [False, True])
def test_stage_maps_equal_grad_cam_layercam_at_that_stage(models, encoder, aug):
    """LayerCAM at an encoder stage's output, every stage and class from one forward pass per
    view, equals pytorch-grad-cam's LayerCAM with that stage as its target layer, and the
    model's parameters keep their requires_grad flags."""
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = models[encoder]
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 160)
    low = cams.stage_views(model, x, (2, 4), aug_smooth=aug)
    assert [p.requires_grad for p in model.parameters()] == flags
    for stage in (2, 4):
        ours = cams._final_t(torch.from_numpy(low[stage]), (64, 160), aug).numpy()
        with LayerCAM(model=model, target_layers=[model.encoder.blocks[stage]]) as cam:
            for c in range(4):
                ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * 2, aug_smooth=aug)
                assert np.abs(ours[:, c] - ref).max() < 1e-4, (stage, c)
    with pytest.raises(ValueError, match="stage 9"):
        cams.stage_views(model, x, (9,), aug_smooth=False)


def test_other_methods_through_grad_cam(models):
    model = models["mobilenetv3_small_050"]
    x = torch.randn(2, 3, 64, 160)
    for m in ("hirescam", "xgradcam", "eigencam"):
        assert m in available_methods()
        out = compute_cams(model, x, method=m)
        assert out.shape == (2, 4, 64, 160) and 0 <= out.min() and out.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="unknown CAM method 'nope'; available"):
        compute_cams(model, x, method="nope")


def test_probability_target(models):
    model = models["mobilenetv3_small_050"]
    x = torch.randn(2, 3, 64, 160)
    ours = compute_cams(model, x, "gradcam++", target="prob")
    lib = library_cams(model, x, "gradcam++", False, model.target_layer, "prob", range(4))
    assert np.abs(ours - lib).max() < 1e-4


@pytest.fixture(scope="module")
def small_ds(synth_dir):
    idx = load_dataset(synth_dir)
    return idx, ImageDataset(idx, (32, 160), with_masks=False)


def test_cache_equals_direct_computation_and_resumes(small_ds, models, tmp_path, cut_short):
    idx, ds = small_ds
    model = models["mobilenetv3_small_050"]
    folds = np.arange(len(ds)) % 2
    by_fold = {0: model, 1: model}
    cache = cam_dataset(by_fold, ds, folds, tmp_path / "c", aug_smooth=True, batch_size=4,
                        progress=False)
    rows = [0, 3, 7]
    x = torch.stack([ds[r]["image"] for r in rows])
    direct = compute_cams(model, x, "gradcam++", aug_smooth=True)
    assert np.abs(cache.maps(rows, (32, 160)) - direct).max() < 5e-3  # float16 storage
    for aug in (True, False):  # made where the scoring runs: the same maps on the CPU
        on = cache.maps_on(torch.device("cpu"), rows, (32, 160), aug, classes=[1, 3])
        assert isinstance(on, torch.Tensor)
        assert np.array_equal(on.numpy(), cache.maps(rows, (32, 160), aug, classes=[1, 3]))
    # interrupted after two batches, then resumed: the same maps
    cut = cut_short(cams, "low_res_cams", 3)  # one call per batch (all views): the third batch
    with pytest.raises(KeyboardInterrupt):
        cam_dataset(by_fold, ds, folds, tmp_path / "r", aug_smooth=True, batch_size=4, progress=False)
    cut.at = None
    resumed = cam_dataset(by_fold, ds, folds, tmp_path / "r", aug_smooth=True, batch_size=4,
                          progress=False)
    assert np.array_equal(np.asarray(resumed.low()), np.asarray(cache.low()))


def test_stage_caches_equal_direct_maps_and_resume(small_ds, models, tmp_path, cut_short):
    """Every stage's cache holds the maps of :func:`cams.stage_views` from each image's own fold
    model; an interrupted run resumes to the same arrays."""
    idx, ds = small_ds
    ds = ImageDataset(idx, (64, 160), with_masks=False)
    a, b = models["mobilenetv3_small_050"], build_classifier("mobilenetv3_small_050", 4).eval()
    folds = np.arange(len(ds)) % 2
    out = {s: tmp_path / "c" / f"s{s}" for s in (1, 3)}
    caches = cams.stage_cam_dataset({0: a, 1: b}, ds, folds, out, batch_size=4, progress=False)
    for rows, model in (([0, 2], a), ([1, 5], b)):
        direct = cams.stage_views(model, ds.uint8_batch(rows), (1, 3), aug_smooth=True)
        for s in (1, 3):
            got = np.asarray(caches[s].low()[rows], np.float32)
            assert got.shape == direct[s].shape
            assert np.abs(got - direct[s]).max() <= 2e-3 * max(1.0, direct[s].max())
    cut = cut_short(cams, "stage_views", 3)
    again = {s: tmp_path / "r" / f"s{s}" for s in (1, 3)}
    with pytest.raises(KeyboardInterrupt):
        cams.stage_cam_dataset({0: a, 1: b}, ds, folds, again, batch_size=4, progress=False)
    assert not (again[1] / "meta.json").exists()
    cut.at = None
    resumed = cams.stage_cam_dataset({0: a, 1: b}, ds, folds, again, batch_size=4, progress=False)
    for s in (1, 3):
        assert np.array_equal(np.asarray(resumed[s].low()), np.asarray(caches[s].low()))


def test_last_layer_maps_from_the_stage_pass_are_cam_datasets_cache(small_ds, models, tmp_path,
                                                                      monkeypatch):
    """The last layer's Grad-CAM++ made from the stage maps' own forward passes equals
    :func:`cams.low_res_views`' (its own passes), and the cache it fills is the one
    :func:`cam_dataset` makes: reused by it, not recomputed."""
    idx, ds = small_ds
    ds = ImageDataset(idx, (64, 160), with_masks=False)
    model = models["efficientnet_b0"]
    x = ds.uint8_batch([0, 1, 2])
    for aug in (False, True):
        both = cams.stage_views(model, x, (2,), aug_smooth=aug, last="gradcam++")
        alone = cams.low_res_views(model, x, "gradcam++", aug)
        assert both["last"].shape == alone.shape and set(both) == {2, "last"}
        assert np.abs(both["last"] - alone).max() <= 1e-5 * max(1.0, alone.max())
    folds = np.arange(len(ds)) % 2
    made = cams.stage_cam_dataset({0: model, 1: model}, ds, folds, {2: tmp_path / "s2"},
                                  batch_size=4, progress=False, last=("gradcam++", tmp_path / "l"))
    monkeypatch.setattr(cams, "low_res_views", lambda *a, **k: pytest.fail("recomputed"))
    reused = cam_dataset({0: model, 1: model}, ds, folds, tmp_path / "l", batch_size=4,
                         progress=False)
    assert np.array_equal(np.asarray(reused.low()), np.asarray(made["last"].low()))
    with pytest.raises(ValueError, match="hirescam"):
        cams.stage_cam_dataset({0: model}, ds, np.zeros(len(ds), int), {2: tmp_path / "x"},
                               last=("hirescam", tmp_path / "y"))


def test_streaming_memory_is_flat(small_ds, models, tmp_path):
    idx, ds = small_ds
    model = models["mobilenetv3_small_050"]

    def peak(n):
        sub = ImageDataset(idx, (32, 160), rows=np.resize(np.arange(len(idx)), n), with_masks=False)
        folds = np.zeros(n, int)
        tracemalloc.start()
        cam_dataset({0: model}, sub, folds, tmp_path / f"m{n}", aug_smooth=True, batch_size=4,
                    progress=False)
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    small, large = peak(12), peak(48)
    assert large < 2 * small, (small, large)


def test_hirescam_equals_gradcam_under_average_pooling(models):
    """With global average pooling the gradient is the same at every position, so HiResCAM
    (gradient x activation, summed over channels) is exactly Grad-CAM; this is why Table 2 leaves
    it out by default. LayerCAM (a ReLU on the gradient) does differ."""
    model = models["efficientnet_b0"]
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 160)
    ref = compute_cams(model, x, "gradcam")
    assert np.abs(compute_cams(model, x, "hirescam") - ref).max() < 1e-4
    layer = library_cams(model, x, "layercam", False, model.target_layer, "logit", range(4))
    assert np.abs(layer - ref).max() > 1e-2


def test_images_decoded_by_workers_give_the_same_cache(small_ds, models, tmp_path):
    """The CAM stage may read its images through the dataset's workers (the paper profile's
    JPEGs): the same maps, bit for bit."""
    idx, ds = small_ds
    model = models["mobilenetv3_small_050"]
    folds = np.arange(len(ds)) % 2
    here = cam_dataset({0: model, 1: model}, ds, folds, tmp_path / "here", batch_size=4,
                       progress=False)
    there = cam_dataset({0: model, 1: model}, ds, folds, tmp_path / "there", batch_size=4,
                        progress=False, num_workers=2)
    assert np.array_equal(here.low(), there.low())
