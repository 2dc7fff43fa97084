"""Training and inference throughput of the profile's classifier on this machine.

    python benchmarks/classifier_throughput.py [--profile cpu] [--batches 5] [--allocator]

Prints images/s for a training step (forward, backward, Adam step) and for inference at the
profile's input size and batch size, and the same for the paper's EfficientNet-b0 measured in the
same run, so the ratio says what the profile's encoder choice buys on this machine.

``--allocator`` instead measures the profile's encoder twice, each in a fresh process: with the C
library's default allocator settings (``CAM2MASK_MALLOC=default``) and with the ones cam2mask sets
(:func:`cam2mask_lib.device.keep_cpu_buffers`), alternating ``--repeats`` times, and prints the
ratio of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from cam2mask_lib.classify import build_classifier
from cam2mask_lib.device import keep_cpu_buffers, resolve_device
from cam2mask_lib.profiles import get_profile


def throughput(encoder: str, size, batch: int, batches: int, device, channels_last: bool):
    model = build_classifier(encoder, 4).to(device)
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, 2, (batch, 4), device=device).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    model.train()
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train = batch * batches / (time.perf_counter() - t)
    model.eval()
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        infer = batch * batches / (time.perf_counter() - t)
    return train, infer


def compare_allocator(args) -> None:
    """The profile's encoder in fresh processes, glibc's defaults vs cam2mask's settings."""
    rates: dict[str, list[float]] = {"default": [], "cam2mask": []}
    for _ in range(args.repeats):
        for name in rates:
            env = dict(os.environ, CAM2MASK_MALLOC="default" if name == "default" else "")
            out = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--batches",
                                  str(args.batches), "--json"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rates[name].append(r["train"])
            print(f"allocator {name:9s} tuned={r['tuned']!s:5s} train {r['train']:6.1f} img/s   "
                  f"inference {r['inference']:6.1f} img/s", flush=True)
    d, c = statistics.median(rates["default"]), statistics.median(rates["cam2mask"])
    print(f"training, median of {args.repeats}: default {d:.1f} img/s, cam2mask {c:.1f} img/s, "
          f"ratio {c / d:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--reference", default="efficientnet_b0", help="encoder to compare with")
    ap.add_argument("--allocator", action="store_true",
                    help="compare the C library's default allocator settings with cam2mask's")
    ap.add_argument("--repeats", type=int, default=3, help="with --allocator: runs of each")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allocator:
        return compare_allocator(args)
    prof = get_profile(args.profile)
    cfg = prof.classifier
    device = resolve_device(cfg.device)
    size, bs = cfg.image_size, cfg.batch_size
    print(f"profile {prof.name}: {cfg.encoder}, input {size[0]}x{size[1]}, batch {bs}, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    tr, inf = throughput(cfg.encoder, size, bs, args.batches, device, cfg.channels_last)
    if args.json:
        print(json.dumps({"train": tr, "inference": inf, "tuned": keep_cpu_buffers()}))
        return
    print(f"{cfg.encoder:24s} train {tr:7.1f} img/s   inference {inf:7.1f} img/s")
    if args.reference != cfg.encoder:
        rtr, rinf = throughput(args.reference, size, bs, max(2, args.batches // 2), device,
                               cfg.channels_last)
        print(f"{args.reference:24s} train {rtr:7.1f} img/s   inference {rinf:7.1f} img/s")
        print(f"ratio {cfg.encoder} / {args.reference}: train {tr / rtr:.1f}x, "
              f"inference {inf / rinf:.1f}x")
    n = prof.data.synthetic_n
    n_train = int(n * (prof.n_folds - 1) / prof.n_folds) if n else None
    if n_train:
        est = prof.n_folds * cfg.epochs * n_train / tr
        print(f"estimated pure training time for the profile: {prof.n_folds} folds x "
              f"{cfg.epochs} epochs x {n_train} images = {est / 60:.1f} min (+ validation)")


if __name__ == "__main__":
    main()
