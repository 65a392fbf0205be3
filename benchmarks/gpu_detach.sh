#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed: a short user-path run of the pool side
# only (first attach of A, then back-to-back cycles), to read the detach and attach times
# and each worker's teardown line ("teardown took ...") when device time is short.
#   usage: bash benchmarks/gpu_detach.sh   (STEPS, CYCLES, KW=off|compiled, LIMIT seconds)
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
M=/root/models; UB=/root/ub; mkdir -p $UB
[ -f $M/u1b/vllm_pool_fixture.json ] || python3 -m vllm_pool.testing.tiny_model $M/u1b --size 1b \
  --dtype bfloat16 --model-vocab 32000 --seed 0 > "$OUT/mkmodel.txt" 2>&1
CYCLES=${CYCLES:-3}
STEPS=${STEPS:-attach_a,$(seq -f "cycle_%g" -s , $CYCLES)}
timeout -s TERM "${LIMIT:-150}" python3 benchmarks/bench_user_path.py --device gpu --gpus "${GPUS:-0}" \
  --model $M/u1b --engine-args "--dtype bfloat16 --max-model-len 2048 --gpu-memory-utilization 0.45" \
  --cli module --side pool --pool-steps "$STEPS" --cycles $CYCLES --route-reps 0 \
  --kernel-warmup "${KW:-off}" --cache-root $UB --log-dir $UB/logs-detach \
  --output-json "$OUT/detach.json" --output-md "$OUT/detach.md" 2>&1 | tail -30 | tee "$OUT/detach.txt"
grep -h "teardown took\|clean after detach\|detached in\|froze" $UB/logs-detach/*.log > "$OUT/detach-lines.txt"
echo "processes left: $(pgrep -fc "$POOL_PROCS"), zombies: $(ps -eo stat | grep -c '^Z')" | tee -a "$OUT/detach.txt"
kill_leftovers
