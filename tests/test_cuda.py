"""The stages on a CUDA device (skipped on machines without one, as CI's): CAMs computed on the GPU
equal pytorch-grad-cam's within 1e-3 in fp32, and the smoke profile's stages run end to end on
the device the context resolves."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
@pytest.mark.parametrize("aug", [False, True])
def test_cams_on_cuda_equal_grad_cam(method, aug):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cam2mask_lib.cams import compute_cams
    from cam2mask_lib.classify import build_classifier

    torch.manual_seed(0)
    model = build_classifier("efficientnet_b0", 4).eval().cuda()
    x = torch.randn(3, 3, 64, 160, device="cuda")
    ours = compute_cams(model, x, method=method, aug_smooth=aug)
    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}[method]
    with cls(model=model, target_layers=[model.target_layer]) as cam:
        for c in range(4):
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * 3, aug_smooth=aug)
            assert np.abs(ours[:, c] - ref).max() < 1e-3


def test_smoke_stages_on_cuda(tmp_path):
    from cam2mask_lib import experiments, pipeline

    ctx = pipeline.context("smoke", artifacts_dir=tmp_path / "a", figures_dir=tmp_path / "f",
                           device="cuda")
    assert ctx.device.type == "cuda"
    run = pipeline.classifier_stage(ctx, progress=False)
    assert run.complete and np.isfinite(run.oof).all()
    assert all(next(m.parameters()).is_cuda for m in ctx.fold_models(run).values())
    cache = pipeline.cam_stage(ctx, run, progress=False)
    assert np.isfinite(np.asarray(cache.low())).all()
    seg = experiments.segmentation_stage(ctx, run, cache, progress=False)
    assert seg.table["Dice (defective images)"].between(0, 1).all()


def test_jpegs_decoded_on_cuda_are_pils_within_rounding(synth_dir):
    """nvJPEG's decoding (``decode_device="cuda"``) against PIL's, batch by batch through the
    workers: the IDCT and the chroma upsampling may round differently, never by more than a few
    grey levels, and the classifier's stage runs on those batches."""
    from cam2mask_lib.classify import _batches
    from cam2mask_lib.data import ImageDataset, load_dataset, resize_mask

    index = load_dataset(synth_dir)
    native = tuple(int(v) for v in index.shapes[0])
    rows = np.arange(len(index))
    want = ImageDataset(index, native, with_masks=False).uint8_batch(rows)
    dev = ImageDataset(index, native, with_masks=False, decode_device="cuda")
    got = torch.cat([x.cpu() for x, _ in _batches(dev, rows, 8, None, 2)])
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 4 and float(diff.float().mean()) < 0.5, (int(diff.max()),
                                                                        float(diff.float().mean()))


def test_smoke_classifier_with_device_decoding(tmp_path):
    from cam2mask_lib import pipeline

    ctx = pipeline.context("smoke", artifacts_dir=tmp_path / "a", figures_dir=tmp_path / "f",
                           device="cuda", **{"classifier.decode": "device",
                                             "classifier.cache_images": False,
                                             "classifier.num_workers": 2})
    assert ctx.images().decode_device.type == "cuda"
    run = pipeline.classifier_stage(ctx, progress=False)
    assert run.complete and np.isfinite(run.oof).all()


def test_scoring_on_cuda_equals_the_cpus(synth_dir, tmp_path):
    # maps made and counted on the GPU: the counts of the CPU's numpy path, up to the few pixels
    # where CUDA's bilinear resize rounds a map across a threshold
    from cam2mask_lib import postprocess as pp
    from cam2mask_lib.cams import cam_dataset
    from cam2mask_lib.classify import build_classifier
    from cam2mask_lib.data import ImageDataset, load_dataset, resize_mask

    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (64, 400), with_masks=False)
    torch.manual_seed(0)
    model = build_classifier("mobilenetv3_small_050", idx.num_classes).eval().cuda()
    n = min(len(idx), 24)
    cache = cam_dataset({0: model}, ds, np.zeros(len(idx), int), tmp_path / "c", progress=False)
    rows = np.arange(n)
    true = np.stack([resize_mask(idx.mask(int(r)), (64, 400)) for r in rows])
    th = [0.1, 0.3, 0.5, 0.75]
    gpu = pp.collect_stats([cache.maps_on("cuda", rows, (64, 400))], [true], th)
    cpu = pp.collect_stats([cache.maps(rows, (64, 400))], [true], th)
    assert np.array_equal(gpu.true_area, cpu.true_area)
    assert np.abs(gpu.area - cpu.area).max() <= 0.001 * 64 * 400
    assert np.abs(gpu.inter - cpu.inter).max() <= 0.001 * 64 * 400


def test_refinement_runs_where_its_images_are():
    # PAR and the grey-level test follow their guide images onto the GPU (image_loader puts them
    # on the context's device): the CPU's results within float rounding
    # and so do the absolute ("negatives") maps
    from cam2mask_lib.refine import absolute_maps, absolute_maps_on, grey_zscore, par

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 48, 96, generator=g) * 255
    maps = torch.rand(2, 4, 48, 96, generator=g)
    assert np.abs(par(maps, imgs.cuda()) - par(maps, imgs)).max() < 1e-4
    assert np.abs(grey_zscore(imgs.cuda()) - grey_zscore(imgs)).max() < 1e-4
    low = torch.rand(2, 6, 4, 3, 6, generator=g).numpy()
    on = absolute_maps_on("cuda", low, (48, 96), np.array([1.0, 2.0, 0.5, 4.0]))
    assert on.is_cuda
    ref = absolute_maps(low, (48, 96), np.array([1.0, 2.0, 0.5, 4.0]))
    assert np.abs(on.cpu().numpy() - ref).max() < 1e-5
