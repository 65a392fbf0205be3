#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed: the soak (benchmarks/soak.py) against a
# one-GPU pool, for at most SOAK_MINUTES, then the pool stopped and checked for leftovers
# (processes, /dev/shm, device memory). JSON and logs in $OUT.
#   usage: SOAK_MINUTES=7 bash benchmarks/gpu_soak.sh
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
ls /dev/shm > /tmp/shm-before.txt
P=18400; L=/tmp/soak-logs; mkdir -p $L
python3 -m vllm_pool serve --gpus "${GPUS:-0}" --port $P --log-dir $L --state-file none > $L/daemon.out 2>&1 &
D=$!
until curl -sf localhost:$P/health >/dev/null; do sleep 1; done
echo "gpu used, idle pool: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
python3 benchmarks/soak.py --pool http://127.0.0.1:$P --cycles 500 --max-minutes "${SOAK_MINUTES:-7}" \
  --log-dir $L --output-json "$OUT/soak.json" 2>&1 | tail -25 | tee "$OUT/soak.txt"
echo "gpu used, idle pool after the soak: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)" | tee -a "$OUT/soak.txt"
kill -TERM $D; wait $D; echo "daemon exit $?" | tee -a "$OUT/soak.txt"
sleep 2
{ echo "processes left: $(pgrep -fc "$POOL_PROCS")"
  echo "new /dev/shm entries: $(ls /dev/shm | comm -13 /tmp/shm-before.txt - | wc -l)"
  echo "gpu used after the pool stopped: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"; } | tee -a "$OUT/soak.txt"
tar -C /tmp -czf "$OUT/soak-logs.tgz" soak-logs 2>/dev/null
