"""The ``dinofuse`` command: a thin driver over the engine.

Heavy modules (torch, transformers) are imported inside the subcommands, so ``dinofuse --help`` is instant.
Expected failures (bad input, unavailable weights) print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .errors import DinofuseError

# Subcommands that later releases fill in; listed so `--help` shows the whole tool.
PLANNED = {
    "extract": "extract DINOv3 features of a raw (and context) volume into the on-disk cache",
    "cache": "list or clear cached feature volumes",
    "train": "fine-tune the context-fused 3D UNet on sparse painted labels",
    "predict": "segment a volume with a trained model (labels, probabilities, attention maps)",
    "demo": "the offline end-to-end demo on the bundled synthetic EM sample",
}


def _check_backbone(args) -> int:
    import torch

    from .backbone import load_backbone

    backbone = load_backbone(args.backbone, device=args.device)
    print(backbone.describe())
    size = args.size
    start = time.perf_counter()
    features = backbone.patch_features(torch.rand(1, size, size))
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"one {size}x{size} slice -> features {tuple(features.shape[1:])} in {elapsed:.2f} s")
    return 0


def _planned(name: str):
    def run(_args) -> int:
        print(f"dinofuse {name}: not available in version {__version__} yet", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinofuse",
        description="Volume-EM segmentation with DINOv3 features and a context-fused 3D UNet (headless).",
    )
    parser.add_argument("--version", action="version", version=f"napari-dinofuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser("check-backbone", help="load a backbone and run it on one slice (checks weights access)",
                           description="Load a DINOv3 backbone and time one forward pass.")
    check.add_argument("--backbone", default=None,
                       help="hub id, local folder, or random:<arch> (default: $DINOFUSE_BACKBONE or "
                            "facebook/dinov3-vitl16-pretrain-sat493m)")
    check.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    check.add_argument("--size", type=int, default=512, help="side of the test slice in pixels")
    check.set_defaults(func=_check_backbone)

    for name, text in PLANNED.items():
        sub.add_parser(name, help=f"{text} (not yet available)", description=text).set_defaults(func=_planned(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DinofuseError as exc:
        print(f"dinofuse {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
