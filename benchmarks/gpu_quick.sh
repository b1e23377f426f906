#!/usr/bin/env bash
# Short GPU measurement of issue 13's figures (~7 min of device time; gpu_check.sh is the older, longer check):
#   1. check_cuda_backbone, random:vitl16: fused / transformers / fused+torch.compile forwards vs the fp32 CPU
#      reference (per-patch cosine), their speed at batch 16/32/64, compile time, top CUDA kernels.
#   2. bench_features, 512 slices of 512^2: bare on-device forward vs extraction pipeline, writer threads,
#      cache hit.
#   3. bench_model inference (UNet alone vs end to end from the cache) and finetune (paint -> prediction; a warm
#      step, its tiles' time, host waits, a torch profile of five steps, a warm continuing step; float32, then bf16
#      as finetune_mixed);
#      both again with the UNet channels-last.
#   4. bench_features again with --compile, if the budget allows.
#   first_step, reads (only when named in GPU_QUICK_STEPS): Fine-tune -> first training step on a 64x1024x1024
#      volume with stand-in cached features (a Fine-tune's fixed costs, CUDA's warm-up included); a training tile's
#      inputs and a prediction block's features read from stand-ins of 32x2048x2048 (slices as wide as real ones).
#   preview (only when named): Fine-tune -> prediction of the sample with and without the training previews (their
#      share of a GPU round; the same weights?).
# Run from the repo root:  bash benchmarks/gpu_quick.sh      (GPU_QUICK_SMOKE=1: tiny sizes on the CPU)
# Log: $OUT/gpu_quick.log ($OUT: the device tool's output folder; /tmp/gpu_quick elsewhere).
# Wheels in .whl/ (zarr and its needs: the device image lacks them) are installed to /tmp/site.
# GPU_QUICK_STEPS: which steps to run (default: all of check_cuda_backbone bench_features inference finetune
# finetune_mixed inference_channels_last finetune_channels_last bench_features_compiled).

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_quick}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_QUICK_BUDGET:-450}
if [ "${GPU_QUICK_SMOKE:-0}" = 1 ]; then
    DEV=cpu; BB=random:tiny; FEAT=(--slices 8 --size 64 --batch-size 4)
    CHECK=(--slices 1 --sizes 64 --speed 1 --batches 2); MODEL=(--backbone random:tiny --base-channels 4)
    TUNE=(--iterations 3); VOLUME=(); FIRST=(--volume 16,128,128); READS=(--volume 8,256,256)
else
    DEV=cuda; BB=random:vitl16; FEAT=(--slices 512 --size 512)
    CHECK=(--slices 2 --sizes 512,504 --speed 8 --batches 16,32,64 --compile --profile)
    MODEL=(--backbone random:vitl16 --base-channels 32); TUNE=(); VOLUME=(--volume 96,512,512 --tile ${GPU_QUICK_TILE:-64,256,256})
    FIRST=(--volume 64,1024,1024); READS=()
fi

# step NAME SECONDS COMMAND...: run under min(SECONDS, what is left of the budget)
ALL_STEPS="check_cuda_backbone bench_features inference finetune finetune_mixed"
ALL_STEPS="$ALL_STEPS inference_channels_last finetune_channels_last"
STEPS=${GPU_QUICK_STEPS:-$ALL_STEPS bench_features_compiled}
step() {
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    local left=$((BUDGET - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then echo "=== $name: SKIPPED (${left}s of the budget left)"; return; fi
    echo "=== $name (timeout ${limit}s, t=${SECONDS}s)"
    timeout -k 5 "$limit" "$@"
    echo "=== $name: rc=$? at t=${SECONDS}s"
}

main() {
    echo "gpu_quick: $(date -u +%FT%TZ), device $DEV, repo $(git rev-parse --short HEAD 2>/dev/null)"
    if [ -d .whl ] && [ "${GPU_QUICK_SMOKE:-0}" != 1 ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "WARNING: wheel install failed"
        export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    fi
    export PYTHONUNBUFFERED=1
    step check_cuda_backbone 200 $PY benchmarks/check_cuda_backbone.py --backbone "$BB" --device "$DEV" "${CHECK[@]}"
    step bench_features 100 $PY benchmarks/bench_features.py --backbone "$BB" --device "$DEV" "${FEAT[@]}" --no-rss
    step inference 90 $PY benchmarks/bench_model.py inference "${MODEL[@]}" --device "$DEV" --no-rss "${VOLUME[@]}"
    step finetune 90 $PY benchmarks/bench_model.py finetune "${MODEL[@]}" --device "$DEV" "${TUNE[@]}" --ops --profile
    # Training computes in float32 (TrainConfig.mixed_precision off; bf16 training measured worse on a CPU,
    # docs/benchmarks.md 2026-12-07 late morning): the same steps in bf16, to see what float32 costs on a GPU
    # (continued rounds came out level in bf16: 2026-12-07 late night).
    step finetune_mixed 90 $PY benchmarks/bench_model.py finetune "${MODEL[@]}" --device "$DEV" "${TUNE[@]}" \
        --precision bf16
    # The UNet channels-last on CUDA too (the CPU's default since 2026-12-05): adopt it there if these beat the above.
    step inference_channels_last 90 $PY benchmarks/bench_model.py inference "${MODEL[@]}" --device "$DEV" --no-rss \
        "${VOLUME[@]}" --channels-last
    step finetune_channels_last 90 $PY benchmarks/bench_model.py finetune "${MODEL[@]}" --device "$DEV" "${TUNE[@]}" \
        --channels-last
    step first_step 90 $PY benchmarks/bench_model.py first_step "${MODEL[@]}" --device "$DEV" "${FIRST[@]}"
    step reads 60 $PY benchmarks/bench_model.py reads "${MODEL[@]}" --device "$DEV" "${READS[@]}"
    step preview 90 $PY benchmarks/bench_model.py preview "${MODEL[@]}" --device "$DEV" "${TUNE[@]}"
    step bench_features_compiled 120 $PY benchmarks/bench_features.py --backbone "$BB" --device "$DEV" "${FEAT[@]}" \
        --no-rss --compile
}

main 2>&1 | grep -v "^USDT:" | tee "$OUT/gpu_quick.log"
