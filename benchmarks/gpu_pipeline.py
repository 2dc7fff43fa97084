"""The pipeline's images/s beside the bare network's, stage by stage, on one device; and the
paper profile's wall time projected from the measured rates.

For each stage the same network, input shape, batch size, precision (bf16 autocast on CUDA) and
memory layout are timed twice in the same run: through the pipeline (data from the dataset
object, the stage's own loop) and bare (a batch already on the device, the same computation).
Their ratio is what the input pipeline and the stage's bookkeeping cost.

    .venv/bin/python benchmarks/gpu_pipeline.py                       # CPU: small, ~2 minutes
    python benchmarks/gpu_pipeline.py --encoder efficientnet_b0 --size 256 1600 --images 512 \\
        --batch 64 --seg-batch 16 --workers 8                         # one GPU, the paper's shapes

Data: a synthetic Severstal-format set generated in a temporary folder (``cam2mask synth``), read
as the paper profile reads Severstal: JPEG files decoded per batch by the DataLoader workers
(``--decode device``: their bytes decoded on the device; ``--cached``: the memory-mapped array of
the CPU profiles instead). The segmentation networks' encoder is the paper profile's (smp's
``efficientnet-b0``) when ``--encoder`` is its classifier's, else timm's (``tu-<encoder>``).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cam2mask_lib import paper
from cam2mask_lib.cams import CamCache, cam_dataset
from cam2mask_lib.classify import ClassifierTrainer, TrainConfig, _batches, predict_logits
from cam2mask_lib.data import ImageDataset, image_array, load_dataset, resize_mask
from cam2mask_lib.device import autocast, resolve_device
from cam2mask_lib.experiments import grid_profile
from cam2mask_lib.losses import make_loss
from cam2mask_lib.postprocess import THRESHOLDS, collect_stats
from cam2mask_lib.profiles import get_profile
from cam2mask_lib.refine import refine_stage
from cam2mask_lib.report import machine, software
from cam2mask_lib.seg_stage import held_out_folds
from cam2mask_lib.segment import SegConfig, SegmenterTrainer
from cam2mask_lib.synth import generate
from cam2mask_lib.trainer import epoch_generator
from cam2mask_lib.utils import chunks


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def bare_train(model, loss_fn, x, y, opt, steps, device):
    """forward + backward + Adam on a batch already on the device."""
    def run():
        for _ in range(steps):
            with autocast(device):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


class _Rows(list):
    """(stage, pipeline images/s, bare network images/s) rows, each printed as it is added."""

    def append(self, row):
        super().append(row)
        name, p, b = row
        print(f"measured: {name}: pipeline {p:.1f} images/s, bare network {b:.1f}, "
              f"{p / b:.0%}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="mobilenetv3_small_050", help="timm classifier encoder")
    ap.add_argument("--size", type=int, nargs=2, default=(64, 400), metavar=("H", "W"))
    ap.add_argument("--images", type=int, default=64, help="images per timed pass")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seg-batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--decode", choices=("workers", "device"), default="workers",
                    help="where the JPEG files are decoded (the classifier's decode setting)")
    ap.add_argument("--cached", action="store_true",
                    help="read a memory-mapped array of decoded images (the CPU profiles' path) "
                         "instead of the JPEG files")
    ap.add_argument("--seg-encoder", default=None,
                    help="the U-Net's encoder (default: the paper profile's when --encoder is its "
                         "classifier's, else tu-<encoder>)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    paper_prof = get_profile("paper")
    seg_encoder = args.seg_encoder or (
        paper_prof.segmentation.net.encoder if args.encoder == paper_prof.classifier.encoder
        else f"tu-{args.encoder}")
    device = resolve_device(args.device)
    size, n = tuple(args.size), args.images
    fmt = torch.channels_last
    print(f"device: {machine(device)}; {software()}")
    reads = ("a memory-mapped array of decoded images" if args.cached else
             f"JPEG files decoded {'on the device' if args.decode == 'device' else 'by PIL'}")
    print(f"shapes: {args.encoder} at {size[0]}x{size[1]}, batch {args.batch} (segmentation "
          f"{seg_encoder}, batch {args.seg_batch}), {n} images per pass, {args.workers} workers; "
          f"synthetic data, read as {reads}")
    rows_out = _Rows()  # each figure printed as soon as it is measured: a cut run keeps it
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(tmp / "data", n=n, seed=0, height=size[0], width=size[1], progress=False)
        index = load_dataset(data)
        ds = ImageDataset(index, size, with_masks=False,
                          array=(image_array(index, size, tmp / "images", progress=False)
                                 if args.cached else None),
                          decode_device=device if args.decode == "device" and not args.cached
                          else None)
        labels = index.labels
        folds = np.where(np.arange(n) < n // 2, 0, 1)  # train on the second half: n/2 images
        cfg = TrainConfig(encoder=args.encoder, image_size=size, epochs=1, batch_size=args.batch,
                          device=str(device), num_workers=args.workers, seed=0,
                          cache_images=args.cached,
                          decode="workers" if args.cached else args.decode)

        # 1. classifier training: one epoch of the stage vs bare steps on a resident batch
        tr = ClassifierTrainer(ds, labels, folds, 0, cfg, tmp / "cls", progress=False)
        tr.run_epoch(0, epoch_generator(0, 0, 0))  # warm-up (cudnn autotune, allocator)
        t_epoch = timed(lambda: tr.run_epoch(1, epoch_generator(0, 0, 1)), device)
        t_val = timed(lambda: predict_logits(tr.model, ds, tr.val_rows, args.batch * 2,
                                             args.workers), device)
        t_pipe = t_epoch - t_val  # an epoch also validates: count its training part only
        n_pipe = len(tr.train_rows)
        x = torch.randn(args.batch, 3, *size, device=device).contiguous(memory_format=fmt)
        y = torch.from_numpy(labels[:args.batch].astype(np.float32)).to(device)
        steps = max(1, len(tr.train_rows) // args.batch)
        run = bare_train(tr.model, tr.loss_fn, x, y, tr.opt, steps, device)
        run()
        t_bare = timed(run, device)
        rows_out.append(("classifier training", n_pipe / t_pipe,
                         steps * args.batch / t_bare))

        # 2. out-of-fold prediction
        model = tr.model.eval()
        rows = np.arange(n)
        predict_logits(model, ds, rows, args.batch * 2, args.workers)
        t_pipe = timed(lambda: predict_logits(model, ds, rows, args.batch * 2, args.workers), device)
        xb = torch.randn(args.batch * 2, 3, *size, device=device).contiguous(memory_format=fmt)

        def fwd(k=max(1, n // (args.batch * 2))):
            with torch.no_grad(), autocast(device):
                for _ in range(k):
                    model(xb)
        fwd()
        t_bare = timed(fwd, device)
        rows_out.append(("out-of-fold prediction", n / t_pipe,
                         max(1, n // (args.batch * 2)) * args.batch * 2 / t_bare))

        # 3. CAM stage: Grad-CAM++ with aug smoothing (6 views) vs 6 bare forward passes
        models = {0: model, 1: model}
        cam_dir = tmp / "cams"
        cam_dataset(models, ds, folds, tmp / "cams_warm", batch_size=32, progress=False,
                    num_workers=args.workers)
        t_pipe = timed(lambda: cam_dataset(models, ds, folds, cam_dir, batch_size=32,
                                           progress=False, num_workers=args.workers), device)
        x32 = torch.randn(32, 3, *size, device=device).contiguous(memory_format=fmt)

        def six(k=max(1, n // 32)):
            with torch.no_grad(), autocast(device):
                for _ in range(6 * k):
                    model.features(x32)
        six()
        t_bare = timed(six, device)
        rows_out.append(("CAM stage (Grad-CAM++, aug smoothing)", n / t_pipe,
                         max(1, n // 32) * 32 / t_bare))

        # 3b. scoring the cached CAMs as Table 2 does: the aug-smoothed maps at the input size
        # and their counts at every threshold, made on the device (only the counts come back),
        # beside the same on the CPU with numpy; the true masks are decoded beforehand
        cache = CamCache(cam_dir)
        parts = list(chunks(rows, 32))
        trues = [np.stack([resize_mask(index.mask(int(i)), size) for i in c]) for c in parts]
        scoring = {}
        for where in dict.fromkeys((device, torch.device("cpu"))):
            def score(where=where):
                collect_stats((cache.maps_on(where, c, size) for c in parts), trues, THRESHOLDS)
            score()
            scoring[where] = n / timed(score, device)
            print(f"measured: scoring cached CAMs on {where}: {scoring[where]:.1f} images/s",
                  flush=True)

        # 3c. Table 5's self-training targets (the default refinement, calibrated on the labels),
        # made on the device from each batch's images as the trainer hands them over; the paper
        # profile keeps no memo, so they are made again in every epoch of its network
        workers_only = SimpleNamespace(classifier=SimpleNamespace(num_workers=args.workers))
        refined = refine_stage(SimpleNamespace(images=lambda: ds, device=device, index=index,
                                               profile=workers_only), cache, size=size)

        def self_targets():
            for c in parts:
                refined.targets(c, ds.uint8_batch(c, args.workers))
        self_targets()
        targets_rate = n / timed(self_targets, device)
        print(f"measured: Table 5's self-training targets on {device}: {targets_rate:.1f} "
              f"images/s", flush=True)

        # 4. segmentation training: a U-Net with the classifier's encoder on the true masks
        seg = SegConfig(arch="unet", encoder=seg_encoder, epochs=1,
                        batch_size=args.seg_batch, device=str(device), slim=device.type == "cpu",
                        num_workers=args.workers)
        masks = {int(i): m for i, m in enumerate(np.stack([index.mask(i) for i in range(n)]))}
        def targets(b):
            return np.stack([resize_mask(masks[int(i)], size) for i in b])

        st = SegmenterTrainer(ds, targets, np.arange(n), index.num_classes, seg, tmp / "seg",
                              progress=False)
        st.run_epoch(0, epoch_generator(0, 0, 0))
        t_pipe = timed(lambda: st.run_epoch(1, epoch_generator(0, 0, 1)), device)
        xs = torch.randn(args.seg_batch, 3, *size, device=device).contiguous(memory_format=fmt)
        ys = torch.from_numpy(targets(np.arange(args.seg_batch))).to(device)
        loss = make_loss("bce_dice", index.num_classes).to(device)
        steps = max(1, n // args.seg_batch)
        run = bare_train(st.model, loss, xs, ys, st.opt, steps, device)
        run()
        t_bare = timed(run, device)
        rows_out.append(("segmentation training", n / t_pipe, steps * args.seg_batch / t_bare))

        # 5. reading the JPEG files, as the paper profile does (it caches nothing): decoded by PIL
        # in the DataLoader workers, or read there and decoded per batch on the device
        # (classifier decode="device": torchvision's decode_jpeg, nvJPEG on CUDA)
        workers, reading = max(1, args.workers), {}
        for how, where in (("PIL in the workers", None), (f"decode_jpeg on {device}", device)):
            rds = ImageDataset(index, size, with_masks=False, decode_device=where)

            def sweep(rds=rds):
                for xb_, _ in _batches(rds, rows, args.batch, None, workers):
                    xb_.to(device, non_blocking=True)
            sweep()
            reading[how] = n / timed(sweep, device)

    print()
    print("| stage | pipeline images/s | bare network images/s | ratio |")
    print("| --- | --- | --- | --- |")
    for name, p, b in rows_out:
        print(f"| {name} | {p:.1f} | {b:.1f} | {p / b:.0%} |")
    print(f"\nreading {n} JPEG files at {size[0]}x{size[1]} ({workers} workers), images/s: " +
          "; ".join(f"{how} {r:.1f}" for how, r in reading.items()) +
          f" (the bare classifier trains {rows_out[0][2]:.1f})")
    print(f"scoring cached CAMs (aug smoothing, {len(THRESHOLDS)} thresholds), images/s: " +
          "; ".join(f"on {where} {r:.1f}" for where, r in scoring.items()))
    print(f"Table 5's self-training targets (default refinement) on {device}, images/s: "
          f"{targets_rate:.1f}")
    rate = {name.split(" (")[0]: p for name, p, _ in rows_out}
    # the paper profile's counts: 12,568 images, 5 folds x 30 epochs (4/5 trained, 1/5 validated
    # per epoch, counted at the training rate), 3 CAM variants (one with 6 views: counted at its
    # measured rate, the others at 6x it); segmentation (experiments.network_jobs): Table 3's 4
    # training sets and Table 5's self-trained network on all images of 4 folds, x 5 held-out
    # folds, and Table 4's 17 grid runs on the defective ones, x the grid's held-out folds (the
    # paper profile: fold 0 only, one split as in the thesis), each 20 epochs at the same size
    N = paper.TOTAL_IMAGES
    defective = paper.TOTAL_IMAGES - paper.DEFECT_FREE_IMAGES
    prof = paper_prof
    seg_epochs, n_folds = prof.segmentation.net.epochs, prof.n_folds
    seg_folds = len(held_out_folds(prof))
    grid_folds = len(held_out_folds(grid_profile(prof)))
    cls_epochs = prof.classifier.epochs
    fold_s = (cls_epochs * N / rate["classifier training"]
              + N / n_folds / rate["out-of-fold prediction"])
    cam_s = N / rate["CAM stage"] * (1 + 2 / 6)
    # scoring: Table 2's three cached variants and Table 3's CAM masks, each a pass over every
    # image at every threshold, on the device (the networks' scoring rides on their inference)
    score_s = 4 * N / scoring[device]
    unit = {"tables 3 and 5": (5 * seg_folds, seg_epochs * N * 4 / 5),
            "grid": (17 * grid_folds, seg_epochs * defective * 4 / 5)}
    seg_s = sum(n * imgs for n, imgs in unit.values()) / rate["segmentation training"]
    # Table 5's network: its targets made per batch, every epoch, on every held-out fold
    targets_s = seg_folds * seg_epochs * N * 4 / 5 / targets_rate
    total = n_folds * fold_s + cam_s + score_s + seg_s + targets_s
    n_nets = sum(n for n, _ in unit.values())
    print(f"\nprojected paper profile on this device at these shapes: classifier + out-of-fold "
          f"{n_folds * fold_s / 3600:.2f} h, CAMs {cam_s / 60:.1f} min, scoring them "
          f"{score_s / 60:.1f} min, segmentation networks "
          f"{seg_s / 3600:.2f} h ({n_nets} network trainings: 5 set-ups x {seg_folds} folds, "
          f"17 grid runs x {grid_folds}) and Table 5's self-training targets "
          f"{targets_s / 60:.1f} min; total {total / 3600:.2f} h")
    # several such devices under torchrun (cam2mask train --stages classifier segmentation grid):
    # folds dealt round-robin, CAMs on rank 0, (network, fold) pairs dealt round-robin
    pairs = [imgs / rate["segmentation training"] for n, imgs in unit.values()
             for _ in range(n)]  # in the order train_networks deals them
    for g in (2, 4, 8):
        seg_g = max(sum(pairs[r::g]) for r in range(g))
        spread = (-(-n_folds // g) * fold_s + cam_s + score_s + seg_g
                  + targets_s / min(g, seg_folds))
        print(f"  on {g} such devices (torchrun, assuming the same rate per device): "
              f"{spread / 3600:.2f} h")


if __name__ == "__main__":
    main()
