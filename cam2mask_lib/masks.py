"""``cam2mask masks``: image-level labels in, segmentation masks out, for anyone's data.

Given a dataset folder (generic ``images/`` + ``labels.csv`` [+ ``masks/``], or Severstal format):

1. train the classifier with cross-validation on the image labels (the profile's recipe), or, with
   ``model``, load a finished classifier run (its fold models are used as an ensemble: the
   probabilities and the CAMs are the means over the folds' models, no training, and the labels
   of the data are then only needed for tuning and scoring);
2. compute out-of-fold Grad-CAM++ maps (averaged weights, aug smoothing) for every image and,
   for the refined method, LayerCAM maps at the encoder's last stride-8 stage, multiplied with
   them (:mod:`fusion`), so that a defect smaller than a cell of the last layer's map keeps its
   shape;
3. turn them into masks, with ``method``:
   * "refined" (the default, label-only, :mod:`refine`): the CAM's region narrowed to the pixels
     whose grey level departs from the image's own (in the class's direction, darker or
     brighter, where the labels show one), then one U-Net per fold self-trained on those
     masks (an ignored band between defect and background); each image's mask is its held-out
     network's output where the classifier fires. Nothing is tuned on true masks, with or
     without them. With ``model`` (no folds to train on) the refined CAM masks are the result;
   * "paper": the paper's post-processing, tuned per class on the data when true masks exist
     (the untuned defaults' Dice reported beside it), otherwise the paper's defaults
     (confidence 0.5, threshold 0.3, no minimum area); the run says which;
4. write, at each image's own size: ``masks/<class>/<image>.png`` for every (image, class)
   (255 = defect, an all-black PNG = no mask), ``masks.csv`` (Kaggle RLE, non-empty masks),
   ``previews/`` (overlays of the first 100 images), ``params.json`` and, with true masks, ``dice_report.{md,csv}``.

Work (folds, checkpoints, CAMs) lives in ``OUT/work`` so an interrupted run resumes. An existing
``OUT`` made by another command or with other settings is refused unless ``force``.
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import paper
from . import postprocess as pp
from .cams import BEST_VARIANT, VARIANTS, compute_cams
from .classify import MAX_SIDE, load_run, predict_logits, roc_auc_per_class
from .data import DataError, check_complete, load_dataset, resize_mask
from .eda import overlay
from .fusion import describe_maps, fused_maps_stage
from .pipeline import cam_stage, classifier_stage, context, stats_from_cache
from .profiles import get_profile, with_random_weights
from .refine import RefineConfig, refine_stage
from .report import markdown_table, per_class_table
from .seg_stage import (predict_probs, refined_targets, seg_stats, teacher_thresholds,
                        train_segmenters)
from .utils import ConfigError, atomic_write_bytes, atomic_write_text, write_json

STATE_FILE = "cam2mask_masks.json"
MAX_PREVIEWS = 100


def _preview(index, i: int, masks: np.ndarray, folder: Path) -> None:
    """The image at its own size with its predicted masks tinted (JPEG)."""
    img = index.image(i)
    full = resize_mask(np.ascontiguousarray(masks), img.shape[:2])
    buf = io.BytesIO()
    Image.fromarray((overlay(img, full) * 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    atomic_write_bytes(folder / f"{Path(index.image_ids[i]).stem}.jpg", buf.getvalue())


def _check_out(out: Path, data: Path) -> None:
    """Refuse an ``--out`` that is the data folder, holds it or lies inside it: ``--force``
    replaces ``--out`` as a whole, which must never reach the user's images, labels or masks."""
    o, d = out.resolve(), data.resolve()
    if o == d or o in d.parents or d in o.parents:
        where = ("is" if o == d else "holds" if o in d.parents else "is inside")
        raise ConfigError(f"--out {out} {where} the data folder --data {data}: masks are written "
                          f"(and with --force replaced) there, so it must be a folder of its own "
                          f"outside the data; choose e.g. --out {d.parent / (d.name + '_masks')}")


def _claim_output(out: Path, settings: dict, force: bool) -> None:
    """Make ``out`` this run's: resume it when it holds this run's settings, else refuse it
    (or, with ``force``, replace it); a folder that cannot be written is a user error."""
    try:
        _claim(out, settings, force)
    except FileExistsError:
        raise  # a folder that holds something else: its own message
    except OSError as e:  # permission, a read-only file system, a file where a folder must be
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); choose a folder "
                          f"you can write to") from None


def _claim(out: Path, settings: dict, force: bool) -> None:
    state = out / STATE_FILE
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file, not a folder; choose a folder")
    if out.exists() and any(out.iterdir()):
        mine = False
        if state.is_file():
            try:
                mine = json.loads(state.read_text()).get("settings") == settings
            except json.JSONDecodeError:
                mine = False
        if not mine:
            if not force:
                raise FileExistsError(
                    f"{out} exists and holds something else (another run's settings or other "
                    f"files); choose another --out or pass --force to replace it")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not state.is_file():
        write_json(state, {"settings": settings, "complete": False})


class _Ensemble:
    """Probabilities and CAMs of a loaded classifier run: means over its fold models."""

    def __init__(self, run: dict, ds, batch: int = 16, num_workers: int = 0):
        self.models, self.ds, self.batch = list(run["models"].values()), ds, batch
        self.workers = num_workers  # image files decoded by this many workers (uint8_batch)

    def probs(self, rows) -> np.ndarray:
        """``[len(rows), C]``: the mean of the fold models' sigmoid probabilities."""
        rows = np.asarray(rows)
        with np.errstate(over="ignore"):  # exp of a large -logit is inf: the probability 0
            return np.mean([1 / (1 + np.exp(-predict_logits(m, self.ds, rows, self.batch)))
                            for m in self.models], axis=0).astype(np.float64)

    def maps(self, rows) -> np.ndarray:
        """``[len(rows), C, H, W]``: the mean of the fold models' Grad-CAM++ (aug smoothing)."""
        # uint8, normalised on each model's device
        x = self.ds.uint8_batch(np.asarray(rows), self.workers)
        return np.mean([compute_cams(m, x, "gradcam++", aug_smooth=True, batch_size=self.batch)
                        for m in self.models], axis=0)


def fit_input_size(shapes: np.ndarray, budget: tuple[int, int]) -> tuple[int, int]:
    """A network input for images of these ``shapes`` ``[N, 2]``: their median aspect ratio, the
    pixel count of ``budget`` (the profile's input, so the cost per image stays the profile's)
    or of the images themselves where they hold fewer (enlarging adds pixels, not detail), each
    side a multiple of 32 (the encoder's stride) and at least 64 (feature maps of 2 or more
    cells). 256x1600 images with a 128x800 budget keep 128x800; 200x200 images get 192x192."""
    h, w = (float(v) for v in np.median(np.asarray(shapes, float), axis=0))
    pixels = min(budget[0] * budget[1], h * w)
    height = (pixels * h / w) ** 0.5
    return (max(64, int(round(height / 32)) * 32), max(64, int(round(height * w / h / 32)) * 32))


def _folds(asked: int | None, default: int, n_images: int, data: Path) -> int:
    """The number of folds: ``--folds`` as given (2 to the number of images), or the profile's,
    lowered to the number of images for a tiny data set."""
    if asked is not None:
        if asked < 2:
            raise ConfigError(f"--folds {asked}: cross-validation needs at least 2 folds")
        if asked > n_images:
            raise ConfigError(f"--folds {asked}: {data} has only {n_images} images; at most "
                              f"{n_images} folds")
        return int(asked)
    if n_images < 2:
        raise DataError(f"{data}: {n_images} image; cross-validation needs at least 2 images")
    return min(default, n_images)


class _EnsembleMaps:
    """The refinement's view of a loaded classifier run: its ensemble's maps at any size."""

    def __init__(self, ens: _Ensemble):
        self.ens = ens

    def maps_on(self, device, rows, size) -> torch.Tensor:
        """The maps of ``rows`` at ``size``, resized on ``device`` (as ``CamCache.maps_on``)."""
        m = torch.from_numpy(self.ens.maps(np.asarray(rows))).to(device)
        if tuple(size) == tuple(m.shape[-2:]):
            return m
        return torch.nn.functional.interpolate(m, size=tuple(size), mode="bilinear",
                                               align_corners=False)

    def maps(self, rows, size) -> np.ndarray:
        return self.maps_on("cpu", rows, size).numpy()


# The self-trained U-Nets of the refined method train at least this many epochs: on NEU-Seg dev
# (160x160) 3 epochs did not learn the small "inclusion" spots its teacher marks (student 0.796 <
# teacher 0.809 on defective images), 6 did (0.834); chosen on that development set.
SELF_TRAIN_EPOCHS = 6
# ... and at least this many training images in all (epochs x the images of the other folds), up
# to SELF_TRAIN_MAX_EPOCHS: NEU-Seg dev's 6 epochs x 2,083 images. A small set needs more epochs
# for as many optimiser steps: on one-class sets of 1,200 and 800 images derived from NEU-Seg dev
# (README: Real steel) 6 epochs left the student below its teacher (0.643 < 0.659, 0.233 <
# 0.368); 15 and 23 epochs by this rule gave 0.695 (above) and 0.338 (nearer).
SELF_TRAIN_IMAGES = 12_000
SELF_TRAIN_MAX_EPOCHS = 24
# ... and train side by side, up to this many at a time, each in a process of one thread
# (seg_stage.train_segmenter_sets): the U-Net's training step on 2 cores, two 1-thread processes
# against one 2-thread one, 43.3 against 33.7 images/s (1.28x; 160x160, batch 16, measured)
SEG_PROCESSES = 3


# The classifier of `cam2mask masks` unless --random-weights, --encoder or --weights-path say
# otherwise: EfficientNet-Lite0 from the ImageNet weights that install with the project
# (cam2mask_lib/weights.py), its stem and first two stages frozen (2.4x faster training on 2
# cores: 18 -> 44 images/s at 192x192, measured; their batch-norm statistics the fold's images',
# their output computed once per fold: 1.7x faster steps again, classify.StemFeatures),
# fine-tuned with the paper's ratio of learning rates (encoder 1/10 of the head's) for 4 epochs:
# a pretrained encoder needs few. Its folds train one after another (the real-data tables were
# measured so; side by side they took 691 s against 706 on NEU-Seg, 2%: docs/real_data.md).
PRETRAINED_CLASSIFIER = {"encoder": "tf_efficientnet_lite0", "pretrained": True, "freeze": 2,
                         "lr_encoder": 3e-4, "lr_head": 3e-3, "epochs": 4, "fold_processes": 0}


def classifier_recipe(base, overrides: dict) -> dict:
    """The classifier's settings of a masks run: :data:`PRETRAINED_CLASSIFIER` under the user's
    ``overrides`` where the profile ``base`` starts its classifier from random weights; the
    profile's own recipe where it has ImageNet weights of its own (paper) or the user asked for
    random weights or chose the encoder or its weights."""
    own = base.classifier.pretrained or base.classifier.weights_path is not None
    if own or {"random_weights", "encoder", "weights_path"} & set(overrides):
        return dict(overrides)
    return {**PRETRAINED_CLASSIFIER, **overrides}


def _n_train(n_images: int, n_folds: int) -> int:
    """About how many images a fold's network trains on: those of the other folds."""
    return max(1, n_images * (n_folds - 1) // n_folds)


def self_train_epochs(base_epochs: int, n_images: int, n_folds: int) -> int:
    """Epochs of the refined method's self-trained U-Nets on ``n_images`` split in ``n_folds``:
    the profile's ``base_epochs``, at least :data:`SELF_TRAIN_EPOCHS`, and at least enough
    epochs to see :data:`SELF_TRAIN_IMAGES` training images (capped at
    :data:`SELF_TRAIN_MAX_EPOCHS`, so a tiny set stays quick)."""
    by_images = min(SELF_TRAIN_MAX_EPOCHS, -(-SELF_TRAIN_IMAGES // _n_train(n_images, n_folds)))
    return max(base_epochs, SELF_TRAIN_EPOCHS, by_images)


def masks_profile(base, index, n_folds, overrides, method):
    """The profile of a masks run: the classifier's overrides, and for the refined method a
    segmentation input fitted to the data like the classifier's (the profile's segmentation
    pixel budget) with every fold held out once, self-trained for ``seg_epochs`` (default:
    :func:`self_train_epochs`); where every encoder
    starts (local files, or random weights when asked)."""
    overrides, seg, net = dict(overrides), {}, {}
    seg_epochs = overrides.pop("seg_epochs", None)
    if seg_epochs is not None and seg_epochs < 1:
        raise ConfigError(f"--seg-epochs {seg_epochs}: must be at least 1")
    if seg_epochs is not None and method != "refined":
        raise ConfigError(f"--seg-epochs {seg_epochs}: only --method refined trains segmentation "
                          f"networks (this run: --method {method})")
    if overrides.pop("random_weights", False):
        flags = with_random_weights({"classifier.weights_path": overrides.get("weights_path"),
                                     "segmentation.net.weights_path": overrides.get(
                                         "seg_weights_path")})
        overrides["pretrained"] = flags["classifier.pretrained"]
        net["pretrained"] = flags["segmentation.net.pretrained"]
    if "seg_weights_path" in overrides:
        net["weights_path"] = overrides.pop("seg_weights_path")
    if method == "refined":
        budget = base.segmentation.size or base.image_size
        seg = {"size": fit_input_size(index.shapes, budget), "folds": tuple(range(n_folds)),
               "defective_only": False}
        net["epochs"] = (seg_epochs if seg_epochs is not None else self_train_epochs(
            base.segmentation.net.epochs, len(index.shapes), n_folds))
        net["processes"] = SEG_PROCESSES
        if base.segmentation.net.encoder_init == "classifier":
            if "encoder" in overrides:
                net["encoder"] = f"tu-{overrides['encoder']}"
            # what the classifier kept at its ImageNet weights stays so in its U-Nets (1.27x
            # faster training at 96x256 on 2 cores, measured)
            net["freeze"] = overrides.get("freeze", base.classifier.freeze)
    if net:
        seg["net"] = net
    return get_profile(base, n_folds=n_folds, classifier=overrides, segmentation=seg)


def make_masks(data: str | Path, out: str | Path, profile: str = "cpu", force: bool = False,
               progress: bool = True, model: str | Path | None = None, method: str = "refined",
               **overrides) -> dict:
    """Run the whole method on ``data`` and write masks to ``out``; returns a summary dict (also
    written to ``out/cam2mask_masks.json``; the method's parameters to ``out/params.json``).
    ``method``: "refined" (default: the label-only refinement of :mod:`refine` and a U-Net
    self-trained on it, :class:`RefinedMasks`) or "paper" (the paper's post-processing of the
    CAMs, :class:`PaperMasks`). ``model``: a finished classifier run folder to use instead of
    training one. ``overrides``: ``image_size``, ``epochs``, ``encoder`` (the classifier's),
    ``seg_epochs`` (the self-trained U-Nets'), ``n_folds``, ``weights_path`` and
    ``seg_weights_path`` (local ImageNet weights of the classifier's and the segmentation
    network's encoders) and ``random_weights`` (every network from random weights)."""
    data, out = Path(data), Path(out)
    plan = _plan(data, out, profile, model, method, overrides)  # every input checked first
    _claim_output(out, plan.settings, force)
    ctx = context(plan.profile, data, artifacts_dir=out / "work", figures_dir=out,
                  progress=progress, index=plan.index)
    job = _Job(ctx, out, progress, method)
    _announce(job, plan)
    _classify(job, plan.run)
    batches = METHODS[method]().batches(job)

    def with_previews():  # streamed: memory does not grow with the number of images
        for c, m in batches():
            for k, i in enumerate(c):
                if i < MAX_PREVIEWS:
                    _preview(ctx.index, int(i), m[k], out / "previews")
            yield c, m

    pp.write_predictions(ctx.index, with_previews(), out, png=True, empty_png=True,
                         csv_name="masks.csv")
    job.summary["out"] = str(out)
    write_json(out / STATE_FILE, {"settings": plan.settings, "complete": True,
                                  "summary": job.summary})
    return job.summary


@dataclass
class _Plan:
    """What a run of :func:`make_masks` will do, decided before anything is written: the data's
    ``index``, the resolved ``profile``, a loaded classifier ``run`` (or None), the input size
    ``fitted`` to the data (None when given), the ``overrides`` asked and the ``settings`` that
    name the output folder's run."""

    index: object
    profile: object
    run: dict | None
    fitted: tuple[int, int] | None
    overrides: dict
    settings: dict
    base_seg_epochs: int


_OPTIONS = ("image_size", "epochs", "encoder", "seg_epochs", "n_folds", "weights_path",
            "seg_weights_path", "random_weights")


def _plan(data: Path, out: Path, profile: str, model, method: str, overrides: dict) -> _Plan:
    """Check every input (options, the data, the loaded classifier) and resolve the profile."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {tuple(METHODS)}")
    _check_out(out, data)
    size = overrides.get("image_size")
    if size is not None and (len(size) != 2 or min(size) < 32 or max(size) > MAX_SIDE):
        raise ConfigError(f"--image-size {' '.join(map(str, size))}: expected H W, each side "
                          f"from 32 to {MAX_SIDE} pixels")
    index = load_dataset(data)  # fails early, naming the file, on bad input
    check_complete(index.image_paths)  # a truncated file is refused before --out is claimed
    # None: not given; random_weights=False: the flag not set
    overrides = {k: v for k, v in overrides.items()
                 if v is not None and not (k == "random_weights" and not v)}
    unknown = sorted(set(overrides) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; masks takes {', '.join(_OPTIONS)}")
    if not index.labels.sum(0).any():
        raise DataError(f"{index.csv_path}: no image is labelled with any class "
                        f"({', '.join(index.class_names)}): there is nothing for the classifier "
                        f"to learn and no defect to find, so no masks are made")
    run = None
    if model is not None:
        fixed = sorted(set(overrides) & {"image_size", "encoder", "epochs", "weights_path"})
        if fixed:
            raise ConfigError(f"--model fixes the classifier; do not also give {fixed}")
        run = load_run(model, index.class_names)
        overrides["image_size"] = run["config"].image_size
    asked_folds = overrides.pop("n_folds", None)
    base = get_profile(profile)
    fitted = None
    if "image_size" not in overrides:  # follow the data, not the profile's Severstal shape
        fitted = fit_input_size(index.shapes, base.image_size)
        overrides["image_size"] = fitted
    n_folds = _folds(asked_folds, base.n_folds, len(index), data)
    if run is None:
        overrides = classifier_recipe(base, overrides)
    prof = masks_profile(base, index, n_folds, overrides, method)  # options checked first
    settings = {"data": str(data.resolve()), "profile": prof.name, "method": method,
                "overrides": {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in sorted(overrides.items())},
                "n_folds": n_folds, "model": str(Path(model).resolve()) if model else None}
    return _Plan(index, prof, run, fitted, overrides, settings, base.segmentation.net.epochs)


class _Job:
    """One run of :func:`make_masks` on its context: what every step reads (the classifier's
    ``probs``, its out-of-fold ``cls`` run, its last layer's CAM ``cache`` and each class's
    chosen ``maps``, or a loaded ensemble ``ens``) and
    the ``summary`` they add to."""

    def __init__(self, ctx, out: Path, progress: bool, method: str):
        self.ctx, self.out, self.progress = ctx, out, progress
        self.say = print if progress else (lambda *a, **k: None)
        self.rows = np.arange(len(ctx.index))
        self.positives = ctx.index.labels.sum(0)  # images labelled with each class
        self.always = [c for c, n in zip(ctx.index.class_names, self.positives)
                       if n == len(ctx.index)]
        self.cls = self.cache = self.maps = self.ens = self.probs = None
        self.summary: dict = {"images": len(ctx.index), "classes": ctx.index.class_names,
                              "method": method}

    def dice_report(self, rep, heading: str, note: str, size, extra: str = "") -> None:
        """``dice_report.{md,csv}``: per class and overall, with what was (not) tuned on the
        masks; the overall Dice also in the summary."""
        names = self.ctx.index.class_names
        table = per_class_table(rep, names)
        s = rep.summary()
        table.loc[len(table)] = {"class": "all",
                                 "Dice (defective images)": s["dice_defective_images"],
                                 "Dice (non-empty masks)": s["dice_nonempty_masks"],
                                 "non-empty masks": int(rep.true_nonempty.sum())}
        index = self.ctx.index
        truth = index.csv_path if index.format == "severstal" else index.root / "masks"
        atomic_write_text(self.out / "dice_report.csv", table.to_csv(index=False))
        atomic_write_text(self.out / "dice_report.md",
            f"### Dice of the masks against {truth}\n\n{heading} ({note}). Kaggle Dice per "
            f"(image, class), 1 when both are empty, at {size[0]}x{size[1]}.\n\n"
            f"{markdown_table(table)}\n{extra}")
        self.summary["dice"] = {k: float(v) for k, v in s.items() if isinstance(v, float)}


def _announce(job: _Job, plan: _Plan) -> None:
    """Say what the run will do before it trains anything."""
    ctx, say = job.ctx, job.say
    say(ctx.describe())
    job.summary["input_size"] = list(ctx.profile.image_size)
    if plan.fitted:
        h, w = (int(v) for v in np.median(plan.index.shapes, axis=0))
        why = (f"the images' median shape {h}x{w} at the profile's pixel budget, sides "
               f"multiples of 32")
        say(f"input size {plan.fitted[0]}x{plan.fitted[1]}: {why} (--image-size H W to choose)")
    else:
        why = "the loaded classifier's" if plan.run is not None else "--image-size"
    job.summary["input_size_from"] = why
    if plan.settings["method"] == "refined" and plan.run is None:
        e, n_folds = ctx.profile.segmentation.net.epochs, ctx.profile.n_folds
        say(f"self-training: a U-Net per fold, {e} epochs" + (
            " (--seg-epochs)" if "seg_epochs" in plan.overrides else
            f" (the profile's {plan.base_seg_epochs}, at least {SELF_TRAIN_EPOCHS}, and "
            f"enough to train on {SELF_TRAIN_IMAGES:,} images in all with "
            f"{_n_train(len(ctx.index), n_folds)} per fold's network, at most "
            f"{SELF_TRAIN_MAX_EPOCHS}; --seg-epochs N to choose)"))
    if job.always:  # said before the training, which cannot fix it
        say(f"class(es) {job.always}: every image is labelled with them, so the classifier has no "
            f"image without them to contrast: their CAMs show where it looked, not what "
            f"differs, and their ROC-AUC is undefined. Add defect-free images (labelled 0) "
            f"for masks that follow the evidence")


def _classify(job: _Job, run: dict | None) -> None:
    """The classifier's probabilities and CAMs: trained with cross-validation (out-of-fold), or
    the mean of a loaded run's fold models. A class without positive images gets none."""
    ctx = job.ctx
    if run is None:
        job.cls = classifier_stage(ctx, progress=job.progress)
        if job.summary["method"] == "refined":  # the paper's method keeps the paper's maps
            job.maps = fused_maps_stage(ctx, job.cls, progress=job.progress)
            job.summary["maps"] = describe_maps(job.maps)
        # the paper's maps; for the refined method made in the same passes, so reused here
        job.cache = cam_stage(ctx, job.cls, *VARIANTS[BEST_VARIANT], progress=job.progress)
        probs, auc = job.cls.oof, job.cls.auc
    else:
        job.say(f"classifier: loaded from {run['dir']} ({len(run['models'])} fold models, their "
                f"mean), not trained")
        run["models"] = {k: m.to(ctx.device) for k, m in run["models"].items()}
        job.ens = _Ensemble(run, ctx.images(), num_workers=ctx.profile.classifier.num_workers)
        probs = job.ens.probs(job.rows)
        auc = roc_auc_per_class(ctx.index.labels, probs)
    job.summary.update({"classifier": str(run["dir"]) if run else
                        "trained with cross-validation",
                        "classifier_auc": dict(zip(ctx.index.class_names,
                                                   [float(a) for a in auc]))})
    if job.always:
        job.summary["classes_on_every_image"] = job.always
    positives = job.positives
    never = [c for c, n in zip(ctx.index.class_names, positives) if n == 0]
    if never:  # no positive image: nothing to localise, and ROC-AUC is undefined
        probs = probs.copy()
        probs[:, positives == 0] = -np.inf  # below every confidence: no mask is ever drawn
        job.summary["classes_without_positives"] = never
        job.say(f"class(es) {never}: no image is labelled with them, so they get no masks and no "
                f"ROC-AUC (undefined without positives)")
    job.probs = probs


def _chunks(rows):
    return np.array_split(rows, max(1, len(rows) // 32))


class PaperMasks:
    """The paper's post-processing of the CAMs: tuned per class on the true masks when there are
    some (an optimistic estimate; the untuned defaults' Dice is reported beside it), otherwise
    the paper's defaults."""

    def batches(self, job: _Job):
        """Writes ``params.json`` (and the Dice report), returns the mask batches' generator."""
        ctx, probs, cache, rows = job.ctx, job.probs, job.cache, job.rows
        size = ctx.profile.image_size
        maps_of = (lambda c: cache.maps(c, size)) if cache is not None else job.ens.maps
        defaults = pp.Params(**paper.PAPER_POSTPROCESS)
        if ctx.index.has_masks:
            if cache is not None:
                stats = stats_from_cache(ctx, cache, rows, pp.THRESHOLDS, VARIANTS[BEST_VARIANT][1])
            else:
                stats = pp.collect_stats((maps_of(c) for c in _chunks(rows)),
                                         (ctx.true_masks(c) for c in _chunks(rows)),
                                         pp.THRESHOLDS)
            params, _ = pp.search(stats, probs, pp.CONFIDENCES, pp.min_area_grid(size),
                                  per_class=True)
            rep = pp.report(stats, probs, params, ctx.index.class_names)
            untuned = pp.report(stats, probs, defaults, ctx.index.class_names).summary()
            job.summary["postprocessing"] = (
                "the paper's post-processing, tuned per class on the true masks (" +
                ("out-of-fold CAMs)" if cache is not None else "CAMs of the loaded classifier)"))
            job.summary["dice_untuned"] = {k: float(v) for k, v in untuned.items()
                                           if isinstance(v, float)}
            job.dice_report(rep, f"Post-processing {params.describe()}",
                            "tuned per class on these masks: an optimistic estimate", size,
                            f"\nUntuned (the paper's defaults {defaults.describe()}): Dice "
                            f"{untuned['dice_defective_images']:.4f} on defective images, "
                            f"{untuned['dice_nonempty_masks']:.4f} on non-empty masks.\n")
        else:
            params = defaults
            job.summary["postprocessing"] = ("no true masks: the paper's defaults (confidence "
                                             "0.5, threshold 0.3, min area 0), not tuned")
        job.say(f"post-processing: {params.describe()} - {job.summary['postprocessing']}")
        write_json(job.out / "params.json", {"method": "paper", "params": vars(params),
                                             "note": job.summary["postprocessing"]})

        def batches():
            for c in _chunks(rows):
                yield c, pp.apply(maps_of(c), probs[c], params)
        return batches


class RefinedMasks:
    """The label-only default: the CAM region narrowed to the pixels that depart from the
    image's grey level (:mod:`refine`), then a U-Net per fold self-trained on those masks (an
    ignored band between defect and background) whose held-out predictions, gated by the
    classifier, are the masks. Nothing is tuned on true masks; with them, the Dice of the
    refined CAM masks and of the network's masks are both reported. With a loaded classifier
    (no folds to train on) the refined CAM masks are the result."""

    def batches(self, job: _Job):
        """Writes ``params.json`` (and the Dice report), returns the mask batches' generator."""
        ctx, probs, rows = job.ctx, job.probs, job.rows
        cfg, size = RefineConfig(), ctx.seg_size
        source = job.maps if job.maps is not None else _EnsembleMaps(job.ens)
        refined = refine_stage(ctx, source, cfg, size)
        net, gate = None, None
        if job.cls is not None:
            net = train_segmenters(ctx, refined_targets(ctx, refined), classifier=job.cls,
                                   progress=job.progress)
            gate = pp.Params(cfg.confidence, teacher_thresholds(ctx, net, refined).tolist(), 0)
        maps = (f"maps: {describe_maps(job.maps)}" if job.maps is not None
                else "the mean of its folds' Grad-CAM++ maps")
        note = self._note(ctx, cfg, net, gate, maps)
        job.summary["postprocessing"] = note
        job.say(f"masks: {note}")
        epochs = ctx.profile.segmentation.net.epochs
        write_json(job.out / "params.json", {
            "method": "refined", "maps": job.summary.get("maps", "the loaded classifier's "
                                                         "Grad-CAM++ at its last layer"),
            "refine": refined.describe(), "segmentation_size": list(size),
            "network": str(net.dir) if net is not None else None,
            "network_epochs": epochs if net is not None else None,
            "network_thresholds": list(gate.threshold) if gate is not None else None,
            "note": note})
        if ctx.index.has_masks:
            self._score(job, refined, net, gate, size)

        def batches():
            if net is None:
                for c, _, m in refined.batches(rows, probs):
                    yield c, m
                return
            for c, p in predict_probs(ctx, net, rows, size):
                yield c, pp.apply(p, probs[c], gate)
        return batches

    @staticmethod
    def _note(ctx, cfg, net, gate, maps: str) -> str:
        """What the masks are, in words (the summary's and params.json's ``note``)."""
        if net is None:
            how = " (a loaded classifier: no self-training)"
        else:
            cuts = ", ".join(f"{t:g} (class {c})"
                             for c, t in zip(ctx.index.class_names, gate.threshold))
            how = (f", then a U-Net per fold self-trained on those masks "
                   f"({ctx.profile.segmentation.net.epochs} epochs), its output > {cuts} (the "
                   f"thresholds whose masks agree best with the refined masks it learned from) "
                   f"where the classifier's probability >= {cfg.confidence:g}")
        return (f"{maps}; label-only refinement ({cfg.describe()}){how}; nothing tuned on "
                f"true masks")

    @staticmethod
    def _score(job: _Job, refined, net, gate, size) -> None:
        """The Dice of the refined CAM masks and, where a network was trained, of its masks."""
        cam_rep = refined.score(job.rows, job.probs)
        c = cam_rep.summary()
        job.summary["dice_refined_cams"] = {k: float(v) for k, v in c.items()
                                            if isinstance(v, float)}
        line = (f"\nThe refined CAM masks alone: Dice {c['dice_defective_images']:.4f} on "
                f"defective images, {c['dice_nonempty_masks']:.4f} on non-empty masks.\n")
        if net is not None:
            st = seg_stats(job.ctx, net, thresholds=sorted(set(gate.threshold)), score_size=size)
            rep = pp.report(st, job.probs[st.rows], gate, job.ctx.index.class_names)
        else:
            rep, line = cam_rep, ""
        job.dice_report(rep, job.summary["postprocessing"], "nothing tuned on these masks", size,
                        line)


METHODS = {"refined": RefinedMasks, "paper": PaperMasks}
