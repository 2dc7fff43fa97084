"""Command line: ``cam2mask`` (or ``python -m cam2mask_lib``).

    cam2mask synth --out DIR --n N [--seed S] [--height H] [--width W] [--force] [--workers K]
    cam2mask check DIR
    cam2mask train [--profile P] [--data-dir DIR] [--fold K ...] [--encoder NAME] [--epochs N]
                   [--weights-path FILE | --random-weights]
    cam2mask reproduce [--profile P] [--only NN ...] [--data-dir DIR] [--set KEY=VALUE ...]
                       [--override FIELD=VALUE ...] [--random-weights]
    cam2mask masks --data DIR --out OUT [--profile P] [--method refined|paper] [--model RUN]
                   [--image-size H W] [--epochs N] [--seg-epochs N] [--weights-path FILE]
                   [--seg-weights-path FILE] [--random-weights] [--force]
"""
from __future__ import annotations

import argparse
import ast
import sys

from . import __version__
from .utils import ConfigError, UserError


RANDOM_WEIGHTS_HELP = ("start every network from random weights (the tables say so); without it, a "
                       "profile that wants ImageNet weights stops when they cannot be loaded")


def _parse_set(items: list[str], option: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default said once: "(default: X)" is added only where the help does not
    already name the default and the option has one worth saying (not None, not a flag's
    False)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if ("default" in help or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or action.default == []):
            return help
        return help + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = argparse.ArgumentParser(
        prog="cam2mask", formatter_class=fmt,
        description="Image-level labels -> Grad-CAM -> segmentation masks: a reproducible "
                    "companion to Sydorskyi (2022).")
    p.add_argument("--version", action="version", version=f"cam2mask {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _synth_command(sub, fmt)
    _check_command(sub, fmt)
    _train_command(sub, fmt)
    _masks_command(sub, fmt)
    _reproduce_command(sub, fmt)
    return p


def _no_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: one plain line per stage, fold and epoch instead")


def _synth_command(sub, fmt) -> None:
    """`cam2mask synth`: write a synthetic data set."""
    s = sub.add_parser("synth", formatter_class=fmt,
                       help="write a synthetic steel-defect dataset in the Kaggle Severstal format",
                       description="Write a synthetic steel-defect dataset (train_images/*.jpg + "
                                   "train.csv with RLE masks, current Kaggle layout). Same seed, "
                                   "same bytes; an interrupted run resumes.")
    s.add_argument("--out", required=True, help="output folder (must be new or empty, or --force)")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--height", type=int, default=256, help="image height in pixels")
    s.add_argument("--width", type=int, default=1600, help="image width in pixels")
    s.add_argument("--force", action="store_true", help="replace an existing different --out")
    s.add_argument("--workers", type=int, default=None,
                   help="processes drawing images (default: one per core, at most 8; the bytes "
                        "do not depend on it)")


def _check_command(sub, fmt) -> None:
    """`cam2mask check`: validate a data set."""
    c = sub.add_parser("check", formatter_class=fmt,
                       help="validate a dataset folder (Severstal or generic format) and summarise it",
                       description="Read a dataset folder, decode every image and mask, and print "
                                   "a summary; any problem is reported with its file and line.")
    c.add_argument("data", help="dataset folder")


def _train_command(sub, fmt) -> None:
    """`cam2mask train`: train ahead of the notebooks."""
    t = sub.add_parser("train", formatter_class=fmt,
                       help="train the classifier with cross-validation (all folds or --fold K), "
                            "and the notebooks' segmentation networks ahead of them (--stages)",
                       description="Train the paper's classifier on every fold of the profile (or "
                                   "only --fold K, e.g. one fold per GPU), reusing finished folds "
                                   "and resuming interrupted ones; prints ROC-AUC per class on "
                                   "the union of the finished folds. With --stages segmentation "
                                   "grid it then computes the CAMs and trains every segmentation "
                                   "network that notebooks 04-06 (segmentation) and 05 (grid) "
                                   "train with their default parameters, so that the notebooks "
                                   "reuse them. Under torchrun --nproc_per_node=G the folds and "
                                   "the (network, fold) pairs are spread over the G ranks; every "
                                   "network is the one a single process trains. With fewer "
                                   "classifier folds than ranks (e.g. --fold 0 on two GPUs) the "
                                   "ranks train each fold together instead (DDP, BatchNorm over "
                                   "the whole batch).")
    t.add_argument("--profile", default="cpu", help="smoke, lecture, cpu or paper")
    t.add_argument("--data-dir", help="dataset folder; default: the profile's synthetic set")
    t.add_argument("--fold", type=int, nargs="+", metavar="K",
                   help="train only these folds of the classifier")
    t.add_argument("--override", nargs="+", metavar="FIELD=VALUE", default=[],
                   help="profile fields, dotted (e.g. classifier.batch_size=32)")
    t.add_argument("--stages", nargs="+", default=["classifier"],
                   choices=["classifier", "segmentation", "grid"],
                   help="what to train: the classifier (always, when a later stage needs it), "
                        "the segmentation networks of notebooks 04 and 06, the grid of "
                        "notebook 05")
    t.add_argument("--encoder", help="timm encoder name (default: the profile's)")
    t.add_argument("--epochs", type=int, help="epochs (default: the profile's)")
    t.add_argument("--weights-path", help="local timm weights file for the encoder")
    t.add_argument("--random-weights", action="store_true",
                   help=RANDOM_WEIGHTS_HELP)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: the profile's)")
    t.add_argument("--artifacts-dir", help="default: artifacts/<profile>")
    _no_progress(t)


def _masks_command(sub, fmt) -> None:
    """`cam2mask masks`: masks from image labels."""
    m = sub.add_parser("masks", formatter_class=fmt,
                       help="turn a labelled image folder into segmentation masks",
                       description="Train the classifier with cross-validation on the image labels "
                                   "of DIR (generic: images/ + labels.csv [+ masks/], or Severstal "
                                   "format; by default an EfficientNet-Lite0 from the ImageNet "
                                   "weights that install with cam2mask), compute out-of-fold Grad-CAM++ maps, turn them into "
                                   "masks (default --method refined: label-only refinement and a "
                                   "self-trained U-Net, nothing tuned on true masks; --method "
                                   "paper: the paper's post-processing, tuned on DIR/masks when it "
                                   "exists, otherwise its defaults), and write "
                                   "masks/<class>/<image>.png at each image's own size, masks.csv "
                                   "(Kaggle RLE), previews/ and, with true masks, dice_report.md. "
                                   "An interrupted run resumes.")
    m.add_argument("--data", required=True, help="dataset folder")
    m.add_argument("--out", required=True, help="output folder (new, or this command's own)")
    m.add_argument("--profile", default="cpu", help="smoke, lecture, cpu or paper: the training recipe")
    m.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="network input size (default: the profile's)")
    m.add_argument("--epochs", type=int,
                   help="classifier epochs (default: 4 with the ImageNet-pretrained encoder, "
                        "else the profile's)")
    m.add_argument("--seg-epochs", type=int,
                   help="epochs of the self-trained U-Nets (--method refined; default: the "
                        "profile's segmentation epochs, at least 6, and on a small set enough "
                        "to train on 12,000 images in all, at most 24)")
    m.add_argument("--encoder",
                   help="timm encoder, trained with the profile's recipe (default: "
                        "tf_efficientnet_lite0 from packaged ImageNet weights, stem and first two "
                        "stages frozen; the profile's own where it has ImageNet weights of its own)")
    m.add_argument("--folds", type=int, help="cross-validation folds (default: the profile's)")
    m.add_argument("--model", metavar="RUN",
                   help="use a finished classifier run folder (holding config.json and "
                        "fold*/final.pt, e.g. artifacts/cpu/classifier/<encoder>_<hash> or another "
                        "OUT/work/classifier/...) instead of training; its fold models are "
                        "averaged (default: train with cross-validation)")
    m.add_argument("--weights-path", help="local timm weights file for the classifier's encoder")
    m.add_argument("--seg-weights-path",
                   help="local weights file for the segmentation network's encoder")
    m.add_argument("--random-weights", action="store_true",
                   help="the profile's own classifier recipe, every network from random weights "
                        "(the cpu profile: MobileNetV3, faster, weaker on small sets)")
    m.add_argument("--method", default="refined", choices=("refined", "paper"),
                   help="refined: label-only refinement + self-trained U-Net (default); paper: "
                        "the paper's CAM post-processing")
    m.add_argument("--force", action="store_true", help="replace an --out holding something else")
    _no_progress(m)


def _reproduce_command(sub, fmt) -> None:
    """`cam2mask reproduce`: run the notebooks."""
    r = sub.add_parser("reproduce", formatter_class=fmt,
                       help="execute the notebooks in order with papermill",
                       description="Execute notebooks/NN_*.ipynb in order with papermill in a "
                                   "profile, writing figures and tables to figures/<profile>/. "
                                   "Stops at the first failure, naming the notebook and cell.")
    r.add_argument("--profile", default="cpu", help="smoke, lecture, cpu or paper")
    r.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (e.g. 00)")
    r.add_argument("--data-dir", help="dataset folder; default: the profile's synthetic set")
    r.add_argument("--output-dir", help="where executed notebooks go (default: notebooks/ for "
                                        "the cpu profile, artifacts/<profile>/notebooks otherwise)")
    r.add_argument("--figures-dir", help="default: figures/<profile>")
    r.add_argument("--artifacts-dir", help="default: artifacts/<profile>")
    r.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                   help="extra notebook parameters")
    r.add_argument("--override", nargs="+", metavar="FIELD=VALUE", default=[],
                   help="profile fields for every notebook, dotted (e.g. "
                        "classifier.weights_path=/w/b0.pth segmentation.net.epochs=5)")
    r.add_argument("--random-weights", action="store_true",
                   help=RANDOM_WEIGHTS_HELP)
    _no_progress(r)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (bad data, a bad option, an existing output) is one line
    on stderr and exit code 2; Ctrl-C says how to resume and exits with 130; anything else is a
    bug and keeps its traceback. The stages are imported in the branch that needs them, on
    purpose: ``cam2mask --help`` then answers without loading torch."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UserError, FileExistsError, FileNotFoundError) as e:
        print(f"cam2mask {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cam2mask {args.command}: interrupted; finished work is kept, and the same command "
              f"resumes from it", file=sys.stderr)
        return 130


def _progress(args):
    """Bars on a terminal; with --no-progress (or without a terminal) one plain line per stage,
    fold and epoch, so a log file still says where a long job is."""
    return "lines" if args.no_progress else True


def _train(args) -> int:
    """``cam2mask train``; under ``torchrun --nproc_per_node=G`` the classifier's folds, then the
    segmentation networks' (network, fold) pairs, are spread over the G ranks (see
    :mod:`cam2mask_lib.distributed`) and rank 0 reports the assembled result."""
    from . import distributed
    from .pipeline import cam_stage, classifier_stage, context
    from .profiles import with_random_weights

    device = args.device
    nets = [s for s in args.stages if s != "classifier"]
    if nets and args.fold:
        raise UserError("--fold trains part of the classifier; the segmentation stages need "
                        "every fold: leave out --fold or --stages " + " ".join(nets))
    overrides = _parse_set(args.override, "--override")
    classifier = {"encoder": args.encoder, "epochs": args.epochs, "weights_path": args.weights_path}
    if args.random_weights:
        flags = with_random_weights({"classifier.weights_path": args.weights_path})
        classifier["pretrained"] = flags["classifier.pretrained"]
    if distributed.launched():
        _, _, device = distributed.init()
    progress = _progress(args)
    try:
        with distributed.rank_zero_first():  # data, folds and the image cache made once
            ctx = context(args.profile, args.data_dir, artifacts_dir=args.artifacts_dir,
                          progress=progress if distributed.rank() == 0 else False,
                          device=device, classifier=classifier, **overrides)
            ctx.images()
        n_ranks = distributed.world()
        todo = sorted(set(args.fold)) if args.fold else list(range(ctx.profile.n_folds))
        ddp = len(todo) < n_ranks  # fewer folds than ranks: the ranks train each fold together
        classifier_stage(ctx, only_folds=todo if ddp else distributed.my_folds(todo),
                         progress=progress if distributed.rank() == 0 or not ddp else False,
                         ddp=ddp)
        distributed.barrier()
        with distributed.rank_zero_first():  # every fold done: read (rank 0 writes oof.csv)
            res = classifier_stage(ctx, only_folds=todo, progress=False)
        n_units = 0
        if nets:
            from . import experiments as ex
            from .cams import BEST_VARIANT, VARIANTS

            with distributed.rank_zero_first():  # CAMs, tuned parameters, image caches: once
                cache = cam_stage(ctx, res, *VARIANTS[BEST_VARIANT],
                                  progress=progress if distributed.rank() == 0 else False)
                jobs = ex.network_jobs(ctx, res, cache, nets)
                for c in {id(j.ctx): j.ctx for j in jobs}.values():
                    c.seg_images()
            n_units = ex.train_networks(jobs, res, progress=progress)
            distributed.barrier()
        if distributed.rank() != 0:
            return 0
    finally:
        distributed.finish()
    aucs = ", ".join(f"{c}: {a:.4f}" for c, a in zip(ctx.index.class_names, res.auc))
    state = "all folds" if res.complete else "finished folds only"
    ranks = f" on {n_ranks} ranks" if n_ranks > 1 else ""
    how = " (DDP inside each fold)" if n_ranks > 1 and ddp else ""
    print(f"run folder {res.dir}{ranks}{how}\nROC-AUC ({state}): {aucs}")
    if nets:
        print(f"segmentation networks ({', '.join(nets)}): {len(jobs)} set-ups under "
              f"{ctx.artifacts / 'segmentation'}, rank 0 trained or reused {n_units} "
              f"(network, fold) pairs{ranks}")
    return 0


def _run(args) -> int:
    if args.command == "synth":
        from .synth import generate

        out = generate(args.out, n=args.n, seed=args.seed, height=args.height,
                       width=args.width, force=args.force, workers=args.workers)
        print(f"wrote {args.n} synthetic images and train.csv to {out}")
    elif args.command == "check":
        import numpy as np

        from .data import load_dataset

        idx = load_dataset(args.data, check="full")
        for i in range(len(idx)):
            idx.mask(i)
        print(idx.describe())
        print(f"images per class: {dict(zip(idx.class_names, idx.labels.sum(0).tolist()))}; "
              f"defect-free: {int((idx.labels.sum(1) == 0).sum())}; sizes: "
              f"{sorted({tuple(s) for s in np.asarray(idx.shapes).tolist()})[:5]}")
    elif args.command == "train":
        return _train(args)
    elif args.command == "masks":
        from .masks import make_masks

        summary = make_masks(args.data, args.out, profile=args.profile, force=args.force,
                             progress=_progress(args), model=args.model, method=args.method,
                             image_size=args.image_size,
                             epochs=args.epochs, encoder=args.encoder, n_folds=args.folds,
                             seg_epochs=args.seg_epochs,
                             weights_path=args.weights_path,
                             seg_weights_path=args.seg_weights_path,
                             random_weights=args.random_weights)
        print(f"masks of {summary['images']} images, classes {summary['classes']} -> "
              f"{summary['out']} ({summary['postprocessing']})")
        print(f"classifier: {'loaded from ' + summary['classifier'] if args.model else summary['classifier']}")
        if "dice" in summary:
            print(f"Dice on defective images {summary['dice']['dice_defective_images']:.4f}, "
                  f"on non-empty masks {summary['dice']['dice_nonempty_masks']:.4f}")
    elif args.command == "reproduce":
        from .profiles import with_random_weights
        from .runner import reproduce

        overrides = _parse_set(args.override, "--override")
        if args.random_weights:
            overrides = with_random_weights(overrides)
        runs = reproduce(args.profile, only=args.only, data_dir=args.data_dir,
                         output_dir=args.output_dir, figures=args.figures_dir,
                         artifacts=args.artifacts_dir, extra=_parse_set(args.set, "--set"),
                         progress=not args.no_progress,
                         overrides=overrides)
        total = sum(r.seconds for r in runs)
        print(f"reproduced {len(runs)} notebook(s) in {total:.0f} s")
    return 0
