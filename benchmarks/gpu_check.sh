#!/usr/bin/env bash
# Issue 12's accelerator check in one call on a lent GPU machine (the `device` tool's `run`):
#   bash benchmarks/gpu_check.sh                 # results in $OUT (the device tool's), else benchmarks/results/gpu_<date>
# 1. benchmarks/gpu_speed.py: bf16 train-step MFU of SmolLM2-135M and its fused 3-expert top-2 MoE at 64k tokens per
#    step (retried with 4 microbatches if one batch does not fit), greedy decode tokens/s at batch 1 / 8 / 64;
# 2. benchmarks/merge_speed.py: TIES and TSV-M of 3 SmolLM2-shaped variants (seeded random weights: no checkpoint
#    travels; no peer venvs there, so h3jax alone) with the merges on the GPU.
# GPU_SPEED_ARGS / MERGE_METHODS / PY override the defaults (CPU dry run: GPU_SPEED_ARGS=--tiny MERGE_METHODS=ties).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
out=${OUT:-benchmarks/results/gpu_$(date -u +%Y%m%d)}
mkdir -p "$out"
date -u > "$out/started"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia_smi.csv" 2>&1 || true
"$PY" -c "import jax; print(jax.devices())" 2>&1 | tee "$out/devices.txt"
# shellcheck disable=SC2086
"$PY" benchmarks/gpu_speed.py ${GPU_SPEED_ARGS:-} --out "$out/gpu_speed.json" 2>&1 | tee "$out/gpu_speed.log" \
  || "$PY" benchmarks/gpu_speed.py ${GPU_SPEED_ARGS:-} --accum 4 --out "$out/gpu_speed.json" 2>&1 | tee -a "$out/gpu_speed.log"
if ! "$PY" -c "import ml_collections, yaml" 2>/dev/null; then
  echo "merges skipped: ml_collections / yaml missing on this machine" | tee "$out/merge_skipped.txt"
  exit 0
fi
meta=$(mktemp -d)
"$PY" -c "import json, sys; sys.path.insert(0, 'benchmarks'); from gpu_speed import SMOLLM2_135M
json.dump(dict(SMOLLM2_135M, torch_dtype='float32'), open(sys.argv[1] + '/config.json', 'w'))" "$meta"
JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} "$PY" benchmarks/merge_speed.py --synthetic_from "$meta" \
  --work "${MERGE_WORK:-/tmp/h3jax_merge_bench}" --methods "${MERGE_METHODS:-ties,tsv_m}" --repeats 2 \
  --h3jax_python "$(command -v "$PY")" --out "$out/merge_speed.json" 2>&1 | tee "$out/merge_speed.log"
