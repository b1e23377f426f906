"""Check that the backbone on an accelerator gives the transformers fp32 CPU backbone's features, and time it.

    python benchmarks/check_cuda_backbone.py [--backbone random:vits16] [--device cuda] [--threshold 0.99]
                                             [--speed BATCHES] [--batches 16,32,64] [--compile] [--profile]

Variants, all from one copy of the weights (``random:*`` specs are seeded from the name): the fused forward
with bf16 weights (the default on CUDA), transformers' own forward with bf16 weights, and with ``--compile``
the fused forward through ``torch.compile``. Same EM-like slices, at a patch-multiple size and at one that
needs padding. Passes when every patch's feature vector of every variant has cosine similarity above the
threshold with the fp32 CPU reference (transformers' forward); exits 1 otherwise.

``--speed N``: also times N batches of 512^2 slices already on the device (forward only, synchronised) for
each variant and batch size, in slices/s and TFLOP/s. ``--profile``: the CUDA kernels that take the most time
in one forward of the fused eager variant.
"""

from __future__ import annotations

import argparse
import copy
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
    parser.add_argument("--speed", type=int, default=0, metavar="BATCHES")
    parser.add_argument("--batches", default="16,32,64", help="batch sizes timed by --speed")
    parser.add_argument("--compile", action="store_true", help="also the fused forward through torch.compile")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    from napari_dinofuse.features.backbone import (
        Backbone,
        BackboneSpec,
        _pretrained_model,
        _random_model,
        to_unit_range,
    )

    warnings.simplefilter("ignore")
    spec = BackboneSpec.parse(args.backbone)
    start = time.perf_counter()
    weights = _random_model(spec.value) if spec.kind == "random" else _pretrained_model(spec)
    print(f"weights loaded in {time.perf_counter() - start:.1f} s", flush=True)
    device = torch.device(args.device)

    def make(forward, precision="auto", compile=False):
        return Backbone(copy.deepcopy(weights), spec, "lvd1689m", device, precision, forward, compile)

    reference = Backbone(copy.deepcopy(weights), spec, "lvd1689m", torch.device("cpu"), "fp32", "transformers")
    variants = {"fused": make("fused"), "transformers": make("transformers")}
    if args.compile:
        variants["fused+compile"] = make("fused", compile=True)
    print(f"reference: {reference.describe()}")
    ok = True
    for size in (int(s) for s in args.sizes.split(",")):
        images = to_unit_range(em_like(args.slices, size), 0, 255)
        ref = reference.patch_features(images)
        for name, tested in variants.items():
            start = time.perf_counter()
            out = tested.patch_features(images)
            if tested.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out = out.cpu()
            if out.shape != ref.shape or out.dtype != torch.float32 or not torch.isfinite(out).all():
                print(f"FAIL {name} {size}^2: shape {tuple(out.shape)} dtype {out.dtype} vs {tuple(ref.shape)} "
                      f"float32, finite {bool(torch.isfinite(out).all())}")
                ok = False
                continue
            cos = F.cosine_similarity(out, ref, dim=1).flatten()  # one value per patch
            rel = ((out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).flatten()
            passed = bool(cos.min() > args.threshold)
            ok &= passed
            print(f"{'ok  ' if passed else 'FAIL'} {tested.describe()}\n     {args.slices} x {size}^2 -> "
                  f"{tuple(out.shape)}: per-patch cosine min {cos.min():.5f}, mean {cos.mean():.5f} (threshold "
                  f"{args.threshold}); relative L2 error mean {rel.mean():.4f}, max {rel.max():.4f}; "
                  f"{seconds * 1000:.0f} ms incl. first call (compiling, for a compiled variant)", flush=True)
    print("backbone check:", "PASSED" if ok else "FAILED", flush=True)
    if args.speed:
        speed(variants, args.speed, [int(b) for b in args.batches.split(",")])
    if args.profile:
        profile(variants["fused"])
    return 0 if ok else 1


def forward_flops(config, tokens: int) -> float:
    """Multiply-adds x 2 of one ViT forward over ``tokens`` tokens (linear layers + attention products)."""
    d, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return 2.0 * layers * tokens * (4 * d * d + 2 * d * inner) + 4.0 * layers * tokens * tokens * d


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(variants: dict, batches: int, sizes: list[int], size: int = 512) -> None:
    any_backbone = next(iter(variants.values()))
    device, cfg = any_backbone.device, any_backbone.config
    flops = forward_flops(cfg, 1 + cfg.num_register_tokens + (size // 16) ** 2)
    for batch in sizes:
        images = torch.rand(batch, size, size, device=device)
        for name, backbone in variants.items():
            try:
                start = time.perf_counter()
                backbone.patch_features(images)  # warm-up (kernel selection, allocator; compiling a new shape)
                _sync(device)
                warm = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(batches):
                    backbone.patch_features(images)
                _sync(device)
            except torch.OutOfMemoryError:
                print(f"speed {name:14s} batch {batch}: out of memory")
                torch.cuda.empty_cache()
                continue
            rate = batches * batch / (time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            print(f"speed {name:14s} batch {batch:3d}: {rate:7.1f} slices/s of {size}^2 = {rate * flops / 1e12:5.0f} "
                  f"TFLOP/s ({flops / 1e12:.2f} TFLOP per slice); warm-up {warm:.1f} s; peak GPU memory so far "
                  f"{peak:.1f} GiB", flush=True)


def profile(backbone, batch: int = 16, size: int = 512) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = backbone.device
    cuda = device.type == "cuda"
    images = torch.rand(batch, size, size, device=device)
    backbone.patch_features(images)
    _sync(device)
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        backbone.patch_features(images)
        _sync(device)
    print(prof.key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=14,
                                    max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
