"""Where the engine computes in bfloat16: inference on CUDA GPUs and on CPUs with bf16 instructions; training
only when asked for.

A CPU with AVX512-BF16 or AMX (AMD Zen 4 and later, Intel Xeon since Cooper Lake) multiplies bf16 natively; on a
2-core Zen 4 the ViT-S ran 1.55-1.85x and a prediction 1.6x faster in bf16 than in fp32 (a Xeon with AMX: 3.1x and
1.65x), with 99.95 % of the labels unchanged (docs/benchmarks.md, 2026-12-07). Other CPUs (most Intel laptops, older
AMD) would emulate it, so they keep fp32. ``$DINOFUSE_CPU_BF16`` = 1 or 0 overrides the detection. Training computes
in fp32 on every device unless ``TrainConfig.mixed_precision``: in bf16 (steps 1.2-1.3x faster on a bf16 CPU), first
rounds trained from scratch came out worse than fp32's own float noise in 11 of 14 runs (the three rare classes' IoU
summed: -0.034 on average), while fp32-trained models predicting in bf16 stayed level with it (docs/benchmarks.md,
2026-12-07 late morning). Continued rounds in bf16 came out level with fp32's (14 paired runs), but their speed-up
held only on an otherwise idle CPU: 1.16x alone, 0.83x beside one busy process (2026-12-07 late night). Continuing
a model, the start model whose sure calls training keeps (``keep_loss``) runs as it predicts, at :func:`autocast`:
its calls as the user saw them, level with fp32's over 14 paired second rounds and a continuing round 7 % faster on
a bf16 CPU (2026-12-07 noon); so do the class shares' estimate after training and the held-out strokes' scoring (the
posteriors the shares correct, the labels the user will see; the estimate 2.3x faster on a bf16 CPU, its shares
equal to 3 decimals: 2026-12-07 afternoon). What needs fp32 keeps it under autocast (the filter banks, the norms'
statistics, losses and posteriors)."""

from __future__ import annotations

import os

import torch

from .defaults import CPU_BF16_ENV

__all__ = ["autocast", "bf16_on", "cpu_computes_bf16", "training_autocast"]


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), whatever ``$DINOFUSE_CPU_BF16`` says."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # private torch API: may change
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return False


def bf16_on(device: torch.device | str) -> bool:
    """Whether inference (the backbone, predictions) computes in bf16 on ``device``: CUDA yes, a CPU where it has
    bf16 instructions (or where ``$DINOFUSE_CPU_BF16`` is 1, and not where it is 0), others (MPS) no."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    setting = os.environ.get(CPU_BF16_ENV, "").strip()
    return setting == "1" if setting in ("0", "1") else cpu_computes_bf16()


def autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast on ``device`` where :func:`bf16_on`, a disabled one elsewhere."""
    device = torch.device(device)
    on = bf16_on(device)
    return torch.autocast(device.type if on else "cpu", dtype=torch.bfloat16, enabled=on)


def training_autocast(device: torch.device | str, mixed: bool = False) -> torch.autocast:
    """bf16 autocast for training on ``device`` only where ``mixed`` (``TrainConfig.mixed_precision``) and
    :func:`bf16_on`: training computes in float32 by default, on CUDA too (see the module docstring)."""
    return autocast(device) if mixed else torch.autocast("cpu", enabled=False)
