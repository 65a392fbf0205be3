#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed: two models on one GPU
# (tests/test_gpu_sharing.py: the park/wake/detach sequence with no respawn, kill -9 of one
# of two workers on the shared GPU, kernel warm-up beside a model that holds the device).
# The timings JSON (gpu-sharing.json), the test output and the pool's logs go to $OUT.
#   usage: bash benchmarks/gpu_sharing.sh
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
L=/tmp/gpu-sharing-logs; rm -rf $L; mkdir -p $L
VLLM_POOL_TEST_GPUS=${GPUS:-0} VLLM_POOL_TEST_LOGS=$L timeout 1500 \
  python3 -m pytest tests/test_gpu_sharing.py -s -p no:cacheprovider -o log_cli=false 2>&1 \
  | tee "$OUT/gpu-sharing.txt" | tail -60
echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu-sharing.txt"
cp $L/gpu-sharing.json "$OUT/" 2>/dev/null
echo "processes left: $(pgrep -fc "$POOL_PROCS")" | tee -a "$OUT/gpu-sharing.txt"
echo "gpu used after: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)" | tee -a "$OUT/gpu-sharing.txt"
tar -C /tmp -czf "$OUT/gpu-sharing-logs.tgz" gpu-sharing-logs 2>/dev/null
