"""Check that the backbone on an accelerator (bf16 weights by default) gives the fp32 CPU backbone's features.

    python benchmarks/check_cuda_backbone.py [--backbone random:vits16] [--device cuda] [--threshold 0.99]
                                             [--precision auto|bf16|autocast|fp32] [--speed BATCHES] [--profile]

Same weights (``random:*`` specs are seeded from the name; the weight fingerprints are compared too), same
EM-like slices, at a patch-multiple size and at one that needs padding. Passes when every patch's feature
vector has cosine similarity above the threshold with the CPU one; exits 1 otherwise.

``--speed N``: also times N batches of 16 slices of 512^2 already on the device (forward only, synchronised)
with bf16 weights and with fp32 weights under bf16 autocast (same weights), in slices/s and TFLOP/s.
``--profile``: the CUDA kernels that take the most time in one such forward (default precision).
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
    parser.add_argument("--precision", default="auto", help="of the tested backbone: auto, bf16, autocast, fp32")
    parser.add_argument("--speed", type=int, default=0, metavar="BATCHES")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    from napari_dinofuse.backbone import load_backbone, to_unit_range

    warnings.simplefilter("ignore")
    reference = load_backbone(args.backbone, device="cpu")
    tested = load_backbone(args.backbone, device=args.device, precision=args.precision)
    print(f"reference: {reference.describe()}")
    print(f"tested   : {tested.describe()}", flush=True)
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
              f"{seconds * 1000:.0f} ms incl. first-call warm-up", flush=True)
    print("backbone check:", "PASSED" if ok else "FAILED", flush=True)
    if args.speed or args.profile:
        speed(reference, tested, args.speed, args.profile)
    return 0 if ok else 1


def forward_flops(config, tokens: int) -> float:
    """Multiply-adds x 2 of one ViT forward over ``tokens`` tokens (linear layers + attention products)."""
    d, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return 2.0 * layers * tokens * (4 * d * d + 2 * d * inner) + 4.0 * layers * tokens * tokens * d


def speed(reference, tested, batches: int, profile: bool, batch: int = 16, size: int = 512) -> None:
    import copy

    from napari_dinofuse.backbone import Backbone

    device = tested.device
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    images = torch.rand(batch, size, size, device=device)
    cfg = tested.model.config
    flops = forward_flops(cfg, 1 + cfg.num_register_tokens + (size // 16) ** 2)
    variants = [(tested.precision, tested)]
    for precision in ("bf16", "autocast"):
        if precision != tested.precision and batches:  # same weights: a copy of the CPU reference's fp32 model
            variants.append((precision, Backbone(copy.deepcopy(reference.model), reference.spec,
                                                 reference.normalization, device, precision)))
    for precision, backbone in variants if batches else ():
        backbone.patch_features(images)  # warm-up (kernel selection, allocator)
        sync()
        start = time.perf_counter()
        for _ in range(batches):
            backbone.patch_features(images)
        sync()
        rate = batches * batch / (time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        print(f"speed {precision:8s}: {rate:7.1f} slices/s of {size}^2 at batch {batch} = {rate * flops / 1e12:5.0f} "
              f"TFLOP/s ({flops / 1e12:.2f} TFLOP per slice); peak GPU memory so far {peak:.1f} GiB", flush=True)
        if backbone is not tested and cuda:
            del backbone
            torch.cuda.empty_cache()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        tested.patch_features(images)
        sync()
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            tested.patch_features(images)
            sync()
        print(prof.key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=14,
                                        max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
