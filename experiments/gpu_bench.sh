#!/usr/bin/env bash
# The Fisher benchmarks on a CUDA GPU, float32 and bfloat16, SmolLM2-135M over every weight,
# 128 probes: every representation's time and peak memory (experiments/bench_device.py), and the
# exact displacement against a forward pass. Written for one run of about 10 minutes; figures go
# to experiments/results/gpu/ (the README quotes them beside the CPU ones).
#   bash experiments/gpu_bench.sh            # needs torch with CUDA and forgetkit installed
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
out=experiments/results/gpu
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
for dtype in bfloat16 float32; do
  timeout 280 python experiments/bench_device.py --model smollm2-135m --device cuda \
    --dtype "$dtype" --n 128 --batch-size 32 --out "$out/smollm2-135m_$dtype.json" \
    || echo "bench_device $dtype: exit $?"
done
