#!/usr/bin/env bash
# Short GPU re-measurement of feature extraction (~90 s of device time; gpu_check.sh is the full ~7 min check):
#   1. bench_features, random:vitl16, 256 slices of 512^2: bare forward vs extraction pipeline, writer thread
#      share, cache hit (stat checks) and cache hit with every unit re-checksummed; no RSS children.
#   2. check_cuda_backbone, random:vitl16: bf16-weight features vs fp32 CPU (cosine > 0.99), then forward speed
#      with bf16 weights vs fp32 weights under bf16 autocast (same weights), and the top CUDA kernels.
# Run from the repo root:  bash benchmarks/gpu_quick.sh      (GPU_QUICK_SMOKE=1: tiny sizes on the CPU)
# Log: $OUT/gpu_quick.log ($OUT: the device tool's output folder; /tmp/gpu_quick elsewhere).

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_quick}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ "${GPU_QUICK_SMOKE:-0}" = 1 ]; then
    DEV=cpu; BB=random:tiny; FEAT=(--slices 8 --size 64); CHECK=(--slices 1 --sizes 64 --speed 1)
else
    DEV=cuda; BB=random:vitl16; FEAT=(--slices 256 --size 512); CHECK=(--slices 2 --sizes 512 --speed 4 --profile)
fi

main() {
    echo "gpu_quick: $(date -u +%FT%TZ), device $DEV, repo $(git rev-parse --short HEAD 2>/dev/null)"
    if [ -d .whl ] && [ "${GPU_QUICK_SMOKE:-0}" != 1 ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "WARNING: wheel install failed"
        export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    echo "=== bench_features $BB (t=${SECONDS}s)"
    timeout -k 5 70 $PY benchmarks/bench_features.py --backbone "$BB" --device "$DEV" "${FEAT[@]}" --no-rss
    echo "=== bench_features: rc=$? at t=${SECONDS}s"
    echo "=== check_cuda_backbone $BB (t=${SECONDS}s)"
    timeout -k 5 55 $PY benchmarks/check_cuda_backbone.py --backbone "$BB" --device "$DEV" "${CHECK[@]}"
    echo "=== check_cuda_backbone: rc=$? at t=${SECONDS}s"
}

main 2>&1 | grep -v "^USDT:" | tee "$OUT/gpu_quick.log"
