"""compute_cams against pytorch-grad-cam on the same model and batch (all classes, 6 views).

    python benchmarks/cam_speed.py [--profile cpu] [--batch 16] [--encoder NAME] [--repeats 2]

Prints the time of: 6 plain forward passes of the batch (the floor: aug smoothing has 6 views),
our ``compute_cams(method="gradcam++", aug_smooth=True)``, and grad-cam's ``GradCAMPlusPlus``
with ``aug_smooth=True`` called once per class; then the two ratios the project promises:
grad-cam / ours >= 10 and ours / 6 forward passes <= 1.5. Also checks that both give the same maps.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cam2mask_lib.cams import library_cams, compute_cams
from cam2mask_lib.classify import build_classifier
from cam2mask_lib.profiles import get_profile


def best_of(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--encoder", help="default: the profile's")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    prof = get_profile(args.profile)
    enc = args.encoder or prof.classifier.encoder
    torch.manual_seed(0)
    model = build_classifier(enc, args.classes).eval()
    x = torch.randn(args.batch, 3, *prof.image_size)
    print(f"{enc}, batch {args.batch} x {prof.image_size[0]}x{prof.image_size[1]}, "
          f"{args.classes} classes, 6 aug-smoothing views, torch threads {torch.get_num_threads()}")

    def forwards():
        with torch.no_grad():
            for _ in range(6):
                model(x)

    forwards()  # warm-up
    t_fwd, _ = best_of(forwards, args.repeats)
    t_ours, ours = best_of(lambda: compute_cams(model, x, "gradcam++", aug_smooth=True,
                                                batch_size=args.batch), args.repeats)
    t_lib, lib = best_of(lambda: library_cams(model, x, "gradcam++", True, model.target_layer,
                                               "logit", range(args.classes)), 1)
    print(f"6 plain forward passes      {t_fwd:8.3f} s")
    print(f"compute_cams (ours)         {t_ours:8.3f} s")
    print(f"grad-cam GradCAMPlusPlus    {t_lib:8.3f} s")
    print(f"speed-up over grad-cam      {t_lib / t_ours:8.1f}x   (goal >= 10x)")
    print(f"ours / 6 forward passes     {t_ours / t_fwd:8.2f}x   (goal <= 1.5x)")
    print(f"max |ours - grad-cam|       {float(np.abs(ours - lib).max()):.2e}")


if __name__ == "__main__":
    main()
