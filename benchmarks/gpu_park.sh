#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed (../shared/gpu/README.md): the parked-
# models benchmark (bench_park.py) on the 1.1B model, then on the 7B one (mkmodel "8b";
# eager, so that its two cold attaches need no compile), JSON and logs in $OUT.
#   usage: bash benchmarks/gpu_park.sh [1b] [8b]
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
ARGS="--dtype bfloat16 --max-model-len 2048 --gpu-memory-utilization 0.45"
for size in "${@:-1b}"; do
  m=/root/models/l$size
  [ -d $m ] || python3 /root/kit/mkmodel.py $m $size | tee -a "$OUT/mkmodel.txt"
  # B: the same weights under another path (another model to the pool), no second copy.
  [ -d $m-b ] || { mkdir -p $m-b && ln -s $m/* $m-b/; }
  extra=""; [ $size = 8b ] && extra="--enforce-eager"
  # Where a fresh worker's first attach spends its warm-up (vLLM's warmup_kernels: about 14 s
  # once per process on the H100): py-spy dumps of the attaching worker, once a second.
  [ -x "${PYSPY:-}" ] && [ $size = 1b ] && (for i in $(seq 240); do
    pid=$(curl -s localhost:${POOL_PORT:-18300}/workers 2>/dev/null | python3 -c "import json,sys
try: print(next(w['pid'] for w in json.load(sys.stdin) if w['state']=='attaching'))
except Exception: pass" 2>/dev/null)
    [ -n "$pid" ] && { date +%T.%N; $PYSPY dump --pid $pid; } >> "$OUT/pyspy-first-attach.txt" 2>&1
    sleep 1; done) &
  timeout -s TERM "${PARK_TIMEOUT:-300}" python3 benchmarks/bench_park.py --device gpu \
    --model $m --model-b $m-b --reps 3 --serve-before-park ${SERVE_S:-20} --pool-port ${POOL_PORT:=18300} --engine-args "$ARGS $extra" \
    --log-dir /tmp/park-logs-$size --output-json "$OUT/park-$size.json" 2>&1 | tee "$OUT/park-$size.txt"
  tar -C /tmp -czf "$OUT/park-logs-$size.tgz" park-logs-$size 2>/dev/null
  kill_leftovers
done
