#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed (../shared/gpu/README.md): CUDA graph
# capture sizes (bench_capture.py) on the 1.1B model, vLLM's default list against fewer
# sizes, and whether vLLM's startup plan (the memory-profiling cache) applied on each attach.
#   usage: [TAG=name] bash benchmarks/gpu_capture.sh [extra bench_capture.py arguments]
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
[ -d /root/models/l1b ] || python3 /root/kit/mkmodel.py /root/models/l1b 1b
TAG=${TAG:-capture}
L=/tmp/$TAG-logs; rm -rf $L
# (ARGS are split like a shell line: the JSON keeps its quotes inside single ones.)
POW2="--compilation-config '{\"cudagraph_capture_sizes\":[1,2,4,8,16,32,64,128,256,512]}'"
timeout -s TERM "${BENCH_TIMEOUT:-540}" python3 benchmarks/bench_capture.py --device gpu \
  --model /root/models/l1b --engine-args "--dtype bfloat16 --max-model-len 2048" \
  --variant "default=" --variant "pow2=$POW2" --log-dir $L --output-json "$OUT/$TAG.json" \
  "$@" 2>&1 | tee "$OUT/$TAG.txt"
rc=${PIPESTATUS[0]}
# One line per attach: did vLLM's startup plan apply, and on which engine.
grep -h -i "startup plan" $L/engine-*.log $L/worker-*.log 2>/dev/null | cut -c1-300 > "$OUT/$TAG-startup-plan.txt"
tar -C /tmp -czf "$OUT/$TAG-logs.tgz" $TAG-logs 2>/dev/null
kill_leftovers
exit $rc
