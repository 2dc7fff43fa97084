"""Class activation maps for every class of a batch at once (sections II and V of the paper).

**Why this can be fast.** The classifier is ``logits = head(mean_ij A_ij)`` with ``A`` the last
feature map. The gradient of a class logit with respect to ``A`` only passes through the average
pooling and the head, so it is the same at every position:

    dz_c / dA^k_ij = (1 / hw) * dz_c / dp_k ,   p = mean_ij A_ij .

Grad-CAM's channel weights are the spatial mean of that gradient, and Grad-CAM++'s are a closed
form of it and of ``sum_ij A^k_ij``. So one forward pass of the backbone per view (no backward
graph) and the Jacobian of the small head at ``p`` (``[C, K]`` per image, ``torch.func``) give the
maps of **all classes**; generic CAM libraries run a full backward pass per class instead.

The maps are scaled exactly as pytorch-grad-cam scales them (ReLU, min-max, bilinear ``cv2.resize``
to the input size, min-max again; with ``aug_smooth`` the six views - original and horizontal flip,
times 0.9, 1.0, 1.1 - are each scaled, flipped back and averaged), and a test checks equality with
``GradCAM`` / ``GradCAMPlusPlus`` / ``LayerCAM`` within 1e-4. Other methods (HiResCAM, XGradCAM,
EigenGradCAM, ScoreCAM, ...) go through the grad-cam package itself.

For whole datasets :func:`cam_dataset` streams batches and stores the ReLU'd maps of every view at
feature-map resolution (``[N, views, C, h, w]`` float16 in a memory-mapped ``.npy``), so memory
stays flat and the final maps are made on demand (:func:`CamCache.maps`).
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch.func import jacrev, vmap
from tqdm import tqdm

from .device import autocast, model_device, to_model
from .utils import ConfigError, bars, say, write_json

FAST_METHODS = ("gradcam", "gradcam++", "layercam")
# the CAM variants of the paper's Table 2: name -> (method, aug smoothing, weights); the last is
# the best, the maps every later stage and ``cam2mask masks`` use
VARIANTS = {
    "Grad-CAM": ("gradcam", False, "best_epoch"),
    "Grad-CAM++": ("gradcam++", False, "best_epoch"),
    "Grad-CAM++ + SWA + aug smooth": ("gradcam++", True, "averaged"),
}
BEST_VARIANT = "Grad-CAM++ + SWA + aug smooth"
AUG_FACTORS = (0.9, 1.0, 1.1)
# the views of aug smoothing, in ttach's order: (horizontal flip, factor)
AUG_VIEWS = tuple((flip, f) for flip in (False, True) for f in AUG_FACTORS)


def _grad_cam_classes() -> dict:
    # imported here: pytorch-grad-cam pulls in scikit-learn, torchvision and OpenCV (~2 s), and
    # the fast path, which every stage uses, needs none of them
    import pytorch_grad_cam as pgc

    names = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
             "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM",
             "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM",
             "fullgrad": "FullGrad", "gradcamelementwise": "GradCAMElementWise",
             "kpcacam": "KPCA_CAM", "randomcam": "RandomCAM", "shapleycam": "ShapleyCAM",
             "finercam": "FinerCAM"}
    return {k: getattr(pgc, v) for k, v in names.items() if hasattr(pgc, v)}


def available_methods() -> list[str]:
    """Method names accepted by :func:`compute_cams`."""
    return sorted(set(FAST_METHODS) | set(_grad_cam_classes()))


# --------------------------------------------------------------------------------------------
# Scaling as pytorch-grad-cam does
# --------------------------------------------------------------------------------------------

def _minmax(x):
    """Per map (last two axes) ``(x - min) / (1e-7 + max)`` as grad-cam's scale_cam_image
    (numpy arrays or torch tensors)."""
    if isinstance(x, torch.Tensor):
        x = x - x.amin(dim=(-2, -1), keepdim=True)
        return x / (1e-7 + x.amax(dim=(-2, -1), keepdim=True))
    x = x - x.min(axis=(-2, -1), keepdims=True)
    return x / (1e-7 + x.max(axis=(-2, -1), keepdims=True))


def _upsample_t(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    lead = low.shape[:-2]
    flat = _minmax(low.reshape(-1, 1, *low.shape[-2:]).float())
    up = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    # two reductions: aminmax with a dim measured 5.7x slower on the CPU (same values)
    mn, mx = up.flatten(1).amin(1), up.flatten(1).amax(1)
    up.sub_(mn[:, None, None, None]).div_((mx - mn)[:, None, None, None] + 1e-7)
    return up.reshape(*lead, *size)


def upsample(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Final maps from ReLU'd feature-resolution maps ``[..., h, w]``: min-max, bilinear resize to
    ``size`` = (H, W), min-max again (grad-cam's two scale_cam_image calls). The resize is one
    batched ``torch.nn.functional.interpolate`` (half-pixel centres, as ``cv2.resize``'s
    INTER_LINEAR that grad-cam uses: equal within 1e-6, measured 5x faster than a cv2 loop)."""
    with torch.no_grad():
        return _upsample_t(torch.as_tensor(np.asarray(low, dtype=np.float32)), size).numpy()


def smooth(views: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Aug smoothing from per-view low-resolution maps ``[N, V, C, h, w]`` (views in
    :data:`AUG_VIEWS` order, flipped views still flipped): scale each, flip back, average.
    Flipping back is done at feature resolution: min-max and the half-pixel-centred bilinear
    resize commute with a horizontal flip, and the small maps are cheap to flip."""
    with torch.no_grad():
        return _smooth_t(torch.as_tensor(np.asarray(views, dtype=np.float32)), size).numpy()


def unflip_views(low: torch.Tensor) -> torch.Tensor:
    """A float copy of per-view maps ``[N, V, ...]`` (views in :data:`AUG_VIEWS` order) with the
    flipped views flipped back."""
    low = low.float().clone()
    flipped = [v for v, (flip, _) in enumerate(AUG_VIEWS) if flip]
    low[:, flipped] = low[:, flipped].flip(-1)
    return low


def _smooth_t(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`smooth` on a tensor, on its device."""
    return _upsample_t(unflip_views(low), size).mean(dim=1)


def _final_t(low: torch.Tensor, size: tuple[int, int], aug_smooth: bool) -> torch.Tensor:
    """Final maps ``[N, C, H, W]`` from per-view low-resolution maps ``[N, V, C, h, w]`` on their
    device: every view smoothed, or the first upsampled."""
    return _smooth_t(low, size) if aug_smooth else _upsample_t(low[:, 0], size)


def absolute_maps_on(device, low: np.ndarray, size: tuple[int, int],
                     scales: np.ndarray | None = None) -> torch.Tensor:
    """Maps ``[N, C, H, W]`` from ReLU'd feature-resolution maps (``[N, V, C, h, w]``, views in
    :data:`AUG_VIEWS` order, or ``[N, C, h, w]``) without any per-image scaling, made on
    ``device`` (only the feature-resolution maps cross to it) as a float32 tensor: flipped views
    flipped back, every view resized (bilinear, half-pixel centres), the views averaged;
    ``scales`` ``[C]`` divides each class (``refine.maps.absolute_maps`` is the numpy twin)."""
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(low, dtype=np.float32)).to(device)
        if t.dim() == 4:
            t = t[:, None]
        if t.shape[1] == len(AUG_VIEWS):
            t = unflip_views(t)
        n, v, c, h, w = t.shape
        up = F.interpolate(t.reshape(n * v, c, h, w), size=tuple(size), mode="bilinear",
                           align_corners=False).reshape(n, v, c, *size).mean(1)
        if scales is not None:
            up /= torch.as_tensor(np.asarray(scales, np.float32), device=up.device)[
                None, :, None, None]
        return up



# --------------------------------------------------------------------------------------------
# The fast path: all classes of a batch from one backbone pass per view
# --------------------------------------------------------------------------------------------

def head_jacobian(model, pooled: torch.Tensor, target: str = "logit") -> torch.Tensor:
    """``d target_c / d p`` for every image and class: ``[N, C, K]`` (head in eval mode)."""
    def f(p):
        z = model.head(p[None])[0]
        return torch.sigmoid(z) if target == "prob" else z

    return vmap(jacrev(f))(pooled)


def low_res_cams(model, x: torch.Tensor, method: str = "gradcam++", target: str = "logit",
                 feats: torch.Tensor | None = None) -> np.ndarray:
    """ReLU'd Grad-CAM / Grad-CAM++ / LayerCAM maps at feature resolution, ``[N, C, h, w]``
    float32 (LayerCAM weighs each position by the positive part of the gradient there, which
    under average pooling is the same at every position)."""
    if method not in FAST_METHODS:
        raise ValueError(f"fast path supports {FAST_METHODS}, got {method!r}")
    if feats is None:
        with torch.no_grad(), autocast(model_device(model)):  # bf16 backbone on CUDA
            feats = model.features(x)
    A = feats.detach().float()  # the weighting in float32, as grad-cam's
    n, k, h, w = A.shape
    pooled = A.mean(dim=(2, 3))
    with torch.enable_grad():
        J = head_jacobian(model, pooled, target).detach()  # [N, C, K], float32 like grad-cam
    g = J / (h * w)  # the gradient at every position
    if method == "gradcam":
        weights = g  # spatial mean of a constant
    elif method == "layercam":  # LayerCAM: ReLU(gradient) x activation at each position
        weights = torch.clamp(g, min=0)
    else:  # Grad-CAM++, eq. 19 of Chattopadhyay et al., as pytorch-grad-cam computes it
        g2, g3 = g ** 2, g ** 3
        s = A.sum(dim=(2, 3))[:, None, :]  # [N, 1, K]
        aij = g2 / (2 * g2 + s * g3 + 1e-6)
        aij = torch.where(g != 0, aij, torch.zeros_like(aij))
        weights = (torch.clamp(g, min=0) * aij) * (h * w)  # summed over h*w equal positions
    cam = torch.einsum("nck,nkhw->nchw", weights, A)
    return torch.clamp(cam, min=0).detach().cpu().numpy()


def _views(x: torch.Tensor, aug_smooth: bool):
    # keep a channels_last batch channels_last (a flip returns a plain contiguous tensor, and a
    # channels_last network fed one takes a path measured ~1.7x slower on CPU)
    fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
           and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    for flip, f in (AUG_VIEWS if aug_smooth else ((False, 1.0),)):
        v = x.flip(-1) if flip else x
        yield (v * f if f != 1.0 else v).contiguous(memory_format=fmt), flip


def low_res_views(model, x: torch.Tensor, method: str, aug_smooth: bool, target: str = "logit"
                  ) -> np.ndarray:
    """ReLU'd low-resolution maps of every view: ``[N, V, C, h, w]`` (V = 6 with aug smoothing).
    The backbone runs view by view (measured faster than one 6x larger batch) on the model's
    device and layout; the head's Jacobian and the weighting run once for all views."""
    x = to_model(x, model)
    with torch.no_grad(), autocast(model_device(model)):  # bf16 backbone on CUDA
        feats = [model.features(v) for v, _ in _views(x, aug_smooth)]
    low = low_res_cams(model, None, method, target, feats=torch.cat(feats))  # [V*N, C, h, w]
    return low.reshape(len(feats), len(x), *low.shape[1:]).swapaxes(0, 1)


def stage_output(model, stage: int) -> torch.nn.Module:
    """The encoder stage whose output :func:`stage_views` reads: ``model.encoder.blocks[stage]``
    (timm EfficientNet and MobileNet: stage 2 ends at stride 8, stages 3-4 at 16)."""
    blocks = getattr(model.encoder, "blocks", None)
    if blocks is None or not 0 <= stage < len(blocks):
        raise ConfigError(f"CAM stage {stage}: the classifier's encoder "
                          f"{type(model.encoder).__name__} has "
                          f"{'no stages (blocks)' if blocks is None else f'stages 0 to {len(blocks) - 1}'}")
    return blocks[stage]


@contextmanager
def _reading_stages(model, stages: Sequence[int]):
    """While inside: a forward pass of ``model`` records the output of each of ``stages`` in the
    yielded dict, the earliest cut from what comes before it (a leaf that requires grad), and no
    parameter requires grad, so a backward pass runs from the logits down to the earliest stage
    only and computes no weight gradient. The flags and hooks are restored on leaving."""
    acts: dict[int, torch.Tensor] = {}
    first = min(stages)

    def hook(stage):
        def record(_module, _inputs, out):
            acts[stage] = out.detach().requires_grad_() if stage == first else out
            return acts[stage]
        return record

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    handles = [stage_output(model, s).register_forward_hook(hook(s)) for s in stages]
    try:
        for p in params:
            p.requires_grad_(False)
        yield acts
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def stage_views(model, x: torch.Tensor, stages: Sequence[int], aug_smooth: bool,
                classes: Sequence[int] | None = None, last: str | None = None) -> dict:
    """LayerCAM (Jiang et al., 2021) at the output ``A`` of each encoder stage of ``stages``:
    ``ReLU(sum_k ReLU(dz_c / dA^k_ij) * A^k_ij)`` for every class ``c`` of ``classes`` (default
    all), ``{stage: [N, V, C, h, w]}`` float32 (V = 6 views with aug smoothing, flipped views
    still flipped, as :func:`low_res_views`). An earlier stage sees a smaller neighbourhood, so
    its map can follow a defect smaller than one cell of the last layer's. One forward pass per
    view and one backward pass per class and view, from the logits down to the earliest stage
    (every stage's gradient from the same pass). ``last``: a fast-path method (e.g.
    "gradcam++"); then key ``"last"`` holds that method's maps at the last layer for every class,
    made from the same forward passes' features (:func:`low_res_views` without its own passes)."""
    classes = list(range(model.num_classes)) if classes is None else list(classes)
    stages = sorted(set(stages))
    x = to_model(x, model)
    per_stage: dict[int, list] = {s: [] for s in stages}
    feats = []
    with _reading_stages(model, stages) as acts, torch.enable_grad(), \
            autocast(model_device(model)):
        for v, _ in _views(x, aug_smooth):
            A = model.features(v)
            if last is not None:
                feats.append(A.detach())
            z = model.head_from_features(A).float()
            maps = {s: [] for s in stages}
            for i, c in enumerate(classes):
                grads = torch.autograd.grad(z[:, c].sum(), [acts[s] for s in stages],
                                            retain_graph=i < len(classes) - 1)
                for s, g in zip(stages, grads):
                    a = acts[s].detach().float()
                    maps[s].append((g.float().clamp(min=0) * a).sum(1).clamp(min=0))
            for s in stages:
                per_stage[s].append(torch.stack(maps[s], 1))  # [N, C, h, w]
    out: dict = {s: torch.stack(v, 1).cpu().numpy() for s, v in per_stage.items()}
    if last is not None:
        low = low_res_cams(model, None, last, feats=torch.cat(feats))  # [V*N, C, h, w]
        out["last"] = low.reshape(len(feats), len(x), *low.shape[1:]).swapaxes(0, 1)
    return out


def compute_cams(model, images: torch.Tensor, method: str = "gradcam++", aug_smooth: bool = False,
                 target_layer=None, target: str = "logit", classes: Sequence[int] | None = None,
                 batch_size: int = 16) -> np.ndarray:
    """CAMs of every class: ``[N, num_classes, H, W]`` float32 in [0, 1], as grad-cam scales them.

    ``method``: "gradcam", "gradcam++" and "layercam" use the fast path (``target_layer`` must be None or the
    model's own ``target_layer``); any other grad-cam method name (see :func:`available_methods`)
    runs through pytorch-grad-cam, one call per class. ``target``: differentiate the "logit"
    (default, grad-cam's ClassifierOutputTarget) or the sigmoid "prob". ``classes``: a subset.
    """
    method = method.lower()
    model.eval()
    n, _, H, W = images.shape
    classes = list(range(model.num_classes)) if classes is None else list(classes)
    own = getattr(model, "target_layer", None)
    if method in FAST_METHODS and (target_layer is None or target_layer is own):
        out = np.empty((n, len(classes), H, W), np.float32)
        for s in range(0, n, batch_size):
            x = images[s:s + batch_size]
            out[s:s + len(x)] = fast_cams(model, x, method, aug_smooth, target, classes).cpu().numpy()
        return out
    return library_cams(model, images, method, aug_smooth, target_layer or own, target, classes)


def fast_cams(model, x: torch.Tensor, method: str = "gradcam++", aug_smooth: bool = False,
              target: str = "logit", classes: Sequence[int] | None = None) -> torch.Tensor:
    """The fast path's final maps of one batch, ``[N, C, H, W]`` float32 on the model's device
    (:func:`compute_cams` is this, brought to numpy): only the small feature-resolution maps
    leave the device between the weighting and the scaling, and the resize runs there."""
    low = low_res_views(model, x, method, aug_smooth, target)
    if classes is not None:
        low = low[:, :, list(classes)]
    with torch.no_grad():
        low = torch.from_numpy(np.ascontiguousarray(low)).to(model_device(model))
        return _final_t(low, x.shape[-2:], aug_smooth)


def library_cams(model, images, method, aug_smooth, target_layer, target, classes) -> np.ndarray:
    """Maps ``[N, len(classes), H, W]`` from pytorch-grad-cam's own class for ``method``, one call
    per class (logit targets, or sigmoid probabilities with ``target="prob"``): the reference the
    fast path is tested against, and the route for every other method."""
    table = _grad_cam_classes()
    if method not in table:
        raise ValueError(f"unknown CAM method {method!r}; available: {available_methods()}")
    if target_layer is None:
        raise ValueError("target_layer is needed for a model without a target_layer attribute")

    class _Prob(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def __call__(self, out):
            return torch.sigmoid(out)[..., self.c] if out.ndim == 1 else torch.sigmoid(out)[:, self.c]

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images = to_model(images, model)
    cam = table[method](model=model, target_layers=[target_layer])
    try:
        maps = []
        for c in classes:
            tgt = ClassifierOutputTarget(c) if target == "logit" else _Prob(c)
            maps.append(cam(input_tensor=images, targets=[tgt] * len(images), aug_smooth=aug_smooth))
    finally:
        cam.activations_and_grads.release()
    return np.stack(maps, axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Guided Grad-CAM (section II)
# --------------------------------------------------------------------------------------------

def guided_gradcam(model, image: torch.Tensor, cls: int, cam: np.ndarray | None = None) -> np.ndarray:
    """Guided Grad-CAM of one image ``[3, H, W]`` for class ``cls``: the upsampled Grad-CAM times
    guided-backpropagation saliency (pytorch-grad-cam's GuidedBackpropReLUModel), ``[H, W]``
    normalised to [0, 1] (computed on the model's device)."""
    if cam is None:
        cam = compute_cams(model, image[None], method="gradcam", classes=[cls])[0, 0]
    device = model_device(model)
    from pytorch_grad_cam import GuidedBackpropReLUModel

    gb_model = GuidedBackpropReLUModel(model=copy.deepcopy(model).eval(), device=device)
    gb = gb_model(image[None].clone().to(device), target_category=cls)  # [H, W, 3]
    sal = np.abs(gb).mean(axis=-1) * cam
    return (sal - sal.min()) / (sal.max() - sal.min() + 1e-12)


# --------------------------------------------------------------------------------------------
# Whole datasets: streamed, cached at feature resolution
# --------------------------------------------------------------------------------------------

@dataclass
class CamCache:
    """Low-resolution maps of a dataset on disk: ``maps.npy`` ``[N, V, C, h, w]`` float16
    (memory-mapped), V = 6 aug-smoothing views (or 1), and ``meta.json``."""

    path: Path

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    def low(self) -> np.ndarray:
        return np.load(self.path / "maps.npy", mmap_mode="r")

    def maps(self, rows: Sequence[int], size: tuple[int, int], aug_smooth: bool = True,
             classes: Sequence[int] | None = None) -> np.ndarray:
        """Final maps ``[len(rows), C, H, W]`` in [0, 1] for ``rows``, upsampled now."""
        return self.maps_on("cpu", rows, size, aug_smooth, classes).numpy()

    def absolute_on(self, device, rows: Sequence[int], size: tuple[int, int],
                    scales: np.ndarray | None = None) -> torch.Tensor:
        """The maps of ``rows`` in their own units (:func:`absolute_maps_on`), made on ``device``."""
        return absolute_maps_on(device, self.low()[list(rows)], size, scales)

    def maps_on(self, device, rows: Sequence[int], size: tuple[int, int], aug_smooth: bool = True,
                classes: Sequence[int] | None = None) -> torch.Tensor:
        """:meth:`maps` as a float32 tensor made on ``device``: only the small feature-resolution
        maps cross to it, the scaling and the resize to ``size`` run there."""
        low = np.asarray(self.low()[list(rows)])
        if classes is not None:
            low = low[:, :, list(classes)]
        if aug_smooth and low.shape[1] != len(AUG_VIEWS):
            raise ValueError(f"{self.path} holds {low.shape[1]} view(s); aug smoothing needs "
                             f"{len(AUG_VIEWS)}")
        with torch.no_grad():
            return _final_t(torch.from_numpy(low).to(device).float(), size, aug_smooth)


def cam_dataset(models_by_fold: dict, ds, folds: np.ndarray, out: Path, method: str = "gradcam++",
                aug_smooth: bool = True, target: str = "logit", batch_size: int = 32,
                progress: bool = True, num_workers: int = 0) -> CamCache:
    """CAMs of every image from its own fold's model (out-of-fold, as the paper scores them),
    streamed batch by batch into ``out/maps.npy`` at feature-map resolution. An existing complete
    cache with the same settings is reused; a partial one resumes from its last finished batch.
    Each model runs on its own device and layout (as :func:`classify.fold_models` loads it);
    ``num_workers``: the images are decoded by the dataset's persistent workers while the model
    runs (the same images, :meth:`data.ImageDataset.batches`)."""
    settings = _last_settings(next(iter(models_by_fold.values())), ds, method, aug_smooth, target)
    return _stream(models_by_fold, ds, folds, {"last": (Path(out), settings)},
                   lambda model, x: {"last": low_res_views(model, x, method, aug_smooth, target)},
                   f"CAMs ({method}{', aug smooth' if aug_smooth else ''})", batch_size,
                   progress, num_workers)["last"]


def _last_settings(model, ds, method: str, aug_smooth: bool, target: str) -> dict:
    """What a cache of the last layer's maps records (:func:`cam_dataset`): made by either
    function below, it is the same cache, reused by the other."""
    with torch.no_grad():
        probe = model.eval().features(to_model(ds.uint8_batch([0]), model))
    return {"method": method, "aug_smooth": aug_smooth, "target": target, "n": len(ds),
            "shape": [len(ds), len(AUG_VIEWS) if aug_smooth else 1, model.num_classes,
                      *probe.shape[-2:]]}


def stage_cam_dataset(models_by_fold: dict, ds, folds: np.ndarray, out: dict[int, Path],
                      aug_smooth: bool = True, batch_size: int = 32, progress: bool = True,
                      num_workers: int = 0, last: tuple[str, Path] | None = None) -> dict:
    """:func:`cam_dataset` for LayerCAM at encoder stages (:func:`stage_views`): ``out`` maps
    each stage to its cache folder; every stage's maps come from the same passes. ``last``:
    ``(method, folder)``, the last layer's cache of :func:`cam_dataset` (logit target) filled
    from the same forward passes too, under key ``"last"`` (one pass over the images instead of
    two)."""
    any_model = next(iter(models_by_fold.values())).eval()
    with _reading_stages(any_model, list(out)) as acts, torch.no_grad():
        any_model(to_model(ds.uint8_batch([0]), any_model))
        sizes = {s: list(acts[s].shape[-2:]) for s in out}
    n, V, C = len(ds), len(AUG_VIEWS) if aug_smooth else 1, any_model.num_classes
    caches: dict = {s: (Path(folder), {"method": "layercam", "stage": int(s),
                                       "aug_smooth": aug_smooth, "target": "logit", "n": n,
                                       "shape": [n, V, C, *sizes[s]]})
                    for s, folder in out.items()}
    method = None
    if last is not None:
        method, folder = last
        if method not in FAST_METHODS:
            raise ValueError(f"last-layer maps in the same pass: {FAST_METHODS}, got {method!r}")
        caches["last"] = (Path(folder), _last_settings(any_model, ds, method, aug_smooth, "logit"))
    what = f"LayerCAM at stage(s) {', '.join(map(str, out))}" + (f" and {method}" if method else "")
    return _stream(models_by_fold, ds, folds, caches,
                   lambda model, x: stage_views(model, x, list(out), aug_smooth, last=method),
                   f"CAMs ({what})", batch_size, progress, num_workers)


def _stream(models_by_fold: dict, ds, folds: np.ndarray, caches: dict, compute, desc: str,
            batch_size: int, progress: bool, num_workers: int) -> dict:
    """Fill one cache folder per key of ``caches`` (``key: (folder, settings)``, the settings'
    ``shape`` the array's) with ``compute(model, x)``'s ``{key: [b, V, C, h, w]}`` of every
    image, each from its own fold's model; reused when complete with the same settings, resumed
    from the last batch every folder finished."""
    todo, arrays, done_rows = {}, {}, None
    for key, (out, settings) in caches.items():
        out.mkdir(parents=True, exist_ok=True)
        meta = out / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
            continue
        todo[key] = (out, settings)
        maps_path, prog_path = out / "maps.npy", out / "progress.json"
        rows: set[int] = set()
        prog = json.loads(prog_path.read_text()) if prog_path.is_file() else {}
        if maps_path.is_file() and prog.get("settings") == settings:
            rows = set(prog["rows"])
            arrays[key] = open_memmap(maps_path, mode="r+")
        else:
            arrays[key] = open_memmap(maps_path, mode="w+", dtype=np.float16,
                                      shape=tuple(settings["shape"]))
        done_rows = rows if done_rows is None else done_rows & rows
    if todo:
        n = len(ds)
        bar = tqdm(total=n, desc=desc, disable=not bars(progress), initial=len(done_rows))
        for f in sorted(models_by_fold):
            model = models_by_fold[f].eval()
            rows = [int(r) for r in np.flatnonzero(folds == f) if int(r) not in done_rows]
            say(progress, f"{desc}: fold {f}, {len(rows)} images")
            for chunk, x in ds.batches(np.asarray(rows, dtype=np.int64), batch_size, num_workers):
                chunk = [int(r) for r in chunk]  # x: uint8, normalised on the model's device
                maps = compute(model, x)
                done_rows.update(chunk)
                for key, (out, settings) in todo.items():
                    arrays[key][chunk] = maps[key].astype(np.float16)
                    arrays[key].flush()
                    write_json(out / "progress.json",
                               {"settings": settings, "rows": sorted(done_rows)})
                bar.update(len(chunk))
        bar.close()
        for key, (out, settings) in todo.items():
            del arrays[key]
            write_json(out / "meta.json", {"settings": settings,
                                           "feature_size": settings["shape"][-2:]})
            (out / "progress.json").unlink(missing_ok=True)
    return {key: CamCache(out) for key, (out, _) in caches.items()}
