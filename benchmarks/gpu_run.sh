#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed (../shared/gpu/README.md): install
# vllm-pool, make the 1.1B models, run the attach benchmark through the `vllm` command
# route, and leave the JSON and logs in $OUT.
#   usage: [TAG=name] bash benchmarks/gpu_run.sh [extra bench_attach.py arguments]
# TAG names the outputs ($OUT/TAG.json, .txt, -logs.tgz), so one call can run several.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import vllm_pool, importlib.metadata as m; print([e.name for e in m.entry_points(group='vllm.general_plugins')])"
[ -d /root/models/l1b ] || python3 /root/kit/mkmodel.py /root/models/l1b 1b
[ -d /root/models/l1b-b ] || python3 -m vllm_pool.testing.tiny_model /root/models/l1b-b --size 1b --seed 1 --dtype bfloat16
ARGS="--dtype bfloat16 --max-model-len 2048"
TAG=${TAG:-bench}
rm -rf /tmp/bench-logs
if [ "${PREWARM:-0}" = 1 ]; then
  # A fresh machine has an empty compile cache: one plain server fills it first, so that
  # every contender in the warm mode really finds it warm.
  t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=${GPUS:-0} python3 -m vllm.entrypoints.openai.api_server --model /root/models/l1b \
    --port 18999 $ARGS > /tmp/prewarm.log 2>&1 & pw=$!
  until curl -sf localhost:18999/health >/dev/null || ! kill -0 $pw 2>/dev/null; do sleep 1; done
  kill -TERM $pw; wait $pw; echo "prewarm (empty compile cache) $(( $(date +%s) - t0 ))s"
fi
# SIGTERM before the device tool's own limit, so the benchmark stops its pool itself.
timeout -s TERM "${BENCH_TIMEOUT:-520}" python3 benchmarks/bench_attach.py --device gpu --gpus "${GPUS:-0}" --model /root/models/l1b \
  --model-b /root/models/l1b-b --pool-cli vllm --engine-args "$ARGS" \
  --log-dir /tmp/bench-logs --output-json "$OUT/$TAG.json" "$@" 2>&1 | tee "$OUT/$TAG.txt"
rc=${PIPESTATUS[0]}
grep -h -A12 "unclean after detach" /tmp/bench-logs/worker-*.log > "$OUT/$TAG-unclean.txt" 2>/dev/null
tar -C /tmp -czf "$OUT/$TAG-logs.tgz" bench-logs 2>/dev/null
exit $rc
