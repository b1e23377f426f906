"""Check that the bf16-autocast backbone on an accelerator gives the fp32 CPU backbone's patch features.

    python benchmarks/check_cuda_backbone.py [--backbone random:vits16] [--device cuda] [--threshold 0.99]

Same weights (``random:*`` specs are seeded from the name; the weight fingerprints are compared too), same
EM-like slices, at a patch-multiple size and at one that needs padding. Passes when every patch's feature
vector has cosine similarity above the threshold with the CPU one; exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def em_like(slices: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 30, (slices, -(-size // 8), -(-size // 8))).repeat(8, 1).repeat(8, 2)[:, :size, :size]
    return np.clip(base + rng.normal(0, 10, (slices, size, size)), 0, 255).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="random:vits16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--sizes", default="512,504", help="slice sizes; 504 is not a multiple of 16 (padding)")
    parser.add_argument("--threshold", type=float, default=0.99)
    args = parser.parse_args()

    from napari_dinofuse.backbone import load_backbone, to_unit_range

    warnings.simplefilter("ignore")
    reference = load_backbone(args.backbone, device="cpu")
    tested = load_backbone(args.backbone, device=args.device)
    print(f"reference: {reference.describe()} (fp32)")
    print(f"tested   : {tested.describe()} ({'bf16 autocast' if tested.device.type == 'cuda' else 'fp32'})")
    if reference.fingerprint() != tested.fingerprint():
        print("FAIL: the two backbones have different weights")
        return 1
    ok = True
    for size in (int(s) for s in args.sizes.split(",")):
        images = to_unit_range(em_like(args.slices, size), 0, 255)
        ref = reference.patch_features(images)
        start = time.perf_counter()
        out = tested.patch_features(images)
        if tested.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out = out.cpu()
        if out.shape != ref.shape or out.dtype != torch.float32 or not torch.isfinite(out).all():
            print(f"FAIL {size}^2: shape {tuple(out.shape)} dtype {out.dtype} vs {tuple(ref.shape)} float32, "
                  f"finite {bool(torch.isfinite(out).all())}")
            ok = False
            continue
        cos = F.cosine_similarity(out, ref, dim=1).flatten()  # one value per patch
        mean = ref.mean(dim=(0, 2, 3), keepdim=True)  # without the component all patches share
        centred = F.cosine_similarity(out - mean, ref - mean, dim=1).flatten()
        rel = ((out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).flatten()
        passed = bool(cos.min() > args.threshold)
        ok &= passed
        print(f"{'ok  ' if passed else 'FAIL'} {args.slices} x {size}^2 -> {tuple(out.shape)}: per-patch cosine "
              f"min {cos.min():.5f}, 1st percentile {cos.quantile(0.01):.5f}, mean {cos.mean():.5f} "
              f"(threshold {args.threshold}); centred cosine min {centred.min():.5f}; relative L2 error mean {rel.mean():.4f}, max {rel.max():.4f}; "
              f"{seconds * 1000:.0f} ms incl. first-call warm-up")
    print("backbone check:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
