#!/usr/bin/env bash
# One-shot GPU check of the engine (H200 device machine): backbone bf16-vs-fp32 agreement, feature extraction,
# fine-tuning, inference and the quality benchmark (fusion modes vs a random forest), each under its own timeout inside one overall budget, so a
# failing or slow step never stops the others. Run from the repo root:
#
#     bash benchmarks/gpu_check.sh
#
# Everything is also written to $OUT/gpu_check.log ($OUT: the device tool's output folder; /tmp/gpu_check
# elsewhere). Wheels in .whl/ (packages the device image lacks: zarr and its needs) are installed to /tmp/site.
#
# Environment: GPU_CHECK_BUDGET  seconds for all steps together (default 420);
#              GPU_CHECK_SMOKE=1  tiny sizes on the CPU, to check here that every step starts;
#              PYTHON             interpreter (default python3).

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
LOG="$OUT/gpu_check.log"

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    DEV=cpu; BB_S=random:tiny; BB_L=random:tiny
    FEAT=(--slices 8 --size 64 --memory-slices 2)
    TUNE=(--iterations 3 --base-channels 4)
    ABL=(--iterations 3 --base-channels 4 --seeds 1)
    CHECK=(--slices 1 --sizes 64,56)
    SKIP_INFERENCE=1  # its volume size is fixed (64x256x256): minutes on a CPU
else
    DEV=cuda; BB_S=random:vits16; BB_L=random:vitl16
    FEAT=(--slices 512 --size 512)
    TUNE=(--base-channels 32)
    ABL=(--iterations 1000 --base-channels 32 --seeds 3)
    CHECK=()
    SKIP_INFERENCE=0
fi

SUMMARY=()

# step NAME SECONDS COMMAND...: run under min(SECONDS, what is left of the budget); record rc and time.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "=== $name: SKIPPED, ${left}s of the budget left"
        SUMMARY+=("$name: skipped (budget)")
        return
    fi
    echo
    echo "=== $name (timeout ${limit}s, t=${SECONDS}s): $*"
    local start=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" || rc=$?
    local verdict="ok"
    [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    echo "=== $name: $verdict in $((SECONDS - start))s"
    SUMMARY+=("$name: $verdict in $((SECONDS - start))s")
}

main() {
    echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET}s, device $DEV, repo $(git rev-parse --short HEAD 2>/dev/null)"
    if [ -d .whl ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "WARNING: wheel install failed"
    fi
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    export TMPDIR=${TMPDIR:-/tmp}

    nvidia-smi || echo "(no nvidia-smi)"
    $PY - <<'EOF'
import sys, numpy, torch, transformers, zarr
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, numpy {numpy.__version__}, zarr {zarr.__version__} from {zarr.__file__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"bf16 {torch.cuda.is_bf16_supported()}, cuDNN {torch.backends.cudnn.version()}")
else:
    print("torch sees no CUDA GPU")
EOF

    # d. bf16 CUDA vs fp32 CPU patch features (per-patch cosine > 0.99); ViT-S first, ViT-L (the default's size) later.
    step "backbone check $BB_S" 90 $PY benchmarks/check_cuda_backbone.py --backbone "$BB_S" --device "$DEV" ${CHECK[@]+"${CHECK[@]}"}
    # a. extraction throughput vs bare forward, cache hit, peak RSS (two fresh child processes), disk per voxel.
    step "bench_features $BB_L" 240 $PY benchmarks/bench_features.py --backbone "$BB_L" --device "$DEV" "${FEAT[@]}"
    # b. fine-tuning (it/s, start -> updated 128^3 prediction) and inference (UNet alone, end to end, RSS by tile).
    step "bench_model finetune" 150 $PY benchmarks/bench_model.py finetune --backbone "$BB_L" --device "$DEV" "${TUNE[@]}"
    if [ "$SKIP_INFERENCE" = 0 ]; then
        step "bench_model inference" 210 $PY benchmarks/bench_model.py inference --backbone "$BB_L" --device "$DEV" \
            "${TUNE[@]}"
    fi
    # c. quality benchmark, in what is left of the budget but 60 s (kept for the last check). The asked-for size
    # (3 seeds x 1000 iterations) when the fine-tune's it/s says it fits, else the largest smaller one that does;
    # per-seed lines print as they finish, so a run cut short still compares the modes on its finished seeds.
    local keep=60 left
    [ "${GPU_CHECK_SMOKE:-0}" = 1 ] && keep=0
    left=$((BUDGET - SECONDS - keep))
    if [ "${GPU_CHECK_SMOKE:-0}" != 1 ]; then
        read -r seeds iters < <($PY - "$LOG" "$left" <<'EOF3'
import re, sys
found = re.findall(r"fine-tune \(base \d+, tile \([^)]*\)\): ([\d.]+) it/s", open(sys.argv[1]).read())
its, left = (float(found[-1]) if found else 15.0), float(sys.argv[2])
# per seed: backbone load + sample + features ~25 s; per mode: training (early stopping only shortens it) + ~5 s
fits = [(s, i) for s, i in ((3, 1000), (2, 1000), (3, 500), (2, 500), (2, 300), (1, 300))
        if s * (25 + 3 * (i / its + 5)) <= left]
print(*(fits[0] if fits else (1, 300)))
EOF3
        )
        [ "$seeds $iters" != "3 1000" ] && echo "(quality benchmark reduced to $seeds seeds x $iters iterations to fit ${left}s)"
        ABL=(--iterations "$iters" --seeds $(seq 0 $((seeds - 1))))
    fi
    # The fusion modes against the random-forest anchor (needs scikit-learn: the benchmark extra).
    step "bench_quality" "$left" $PY benchmarks/bench_quality.py --backbone "$BB_L" --device "$DEV" "${ABL[@]}"
    # d (ViT-L, the default backbone's size): last, in what is left.
    step "backbone check $BB_L" 90 $PY benchmarks/check_cuda_backbone.py --backbone "$BB_L" --device "$DEV" \
        --slices 2 --sizes 512 ${CHECK[@]+"${CHECK[@]}"}

    echo
    echo "=== summary (${SECONDS}s of ${BUDGET}s)"
    printf '%s\n' "${SUMMARY[@]}"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
}

main 2>&1 | tee "$LOG"
