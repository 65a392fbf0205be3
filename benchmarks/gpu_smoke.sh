#!/usr/bin/env bash
# Short GPU check (kit installed): pool via the `vllm` route, attach 1.1B, complete, detach,
# memory vs idle, attach again. Prints timings; logs to $OUT/smoke-logs.tgz.
set -u
source "$(dirname "$0")/gpu_common.sh"
[ -d /root/models/l1b ] || python3 /root/kit/mkmodel.py /root/models/l1b 1b >/dev/null 2>&1
P=18100; L=/tmp/smoke-logs; mkdir -p $L
python3 -m vllm.entrypoints.cli.main serve-pool --gpus "${GPUS:-0}" --port $P --log-dir $L > $L/daemon.out 2>&1 &
D=$!
t0=$EPOCHREALTIME
until curl -sf localhost:$P/health >/dev/null; do sleep 0.5; done
echo "pool ready $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))")s; $(curl -s localhost:$P/health)"
for i in 1 2; do
  t0=$EPOCHREALTIME
  python3 -m vllm_pool attach --pool http://127.0.0.1:$P --model /root/models/l1b --name m$i --dtype bfloat16 --max-model-len 2048 --json > $L/inst$i.json || { cat $L/inst$i.json; break; }
  port=$(python3 -c "import json; print(json.load(open('$L/inst$i.json'))['port'])")
  curl -s localhost:$port/v1/completions -H 'content-type: application/json' -d '{"model":"/root/models/l1b","prompt":"def main(","max_tokens":16,"temperature":0}' | python3 -c "import json,sys; print('text', repr(json.load(sys.stdin)['choices'][0]['text']))"
  echo "attach $i to first completion $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))")s"
  python3 -c "import json; d=json.load(open('$L/inst$i.json')); print(d['engine_host'], d['phases'])"
  python3 -m vllm_pool detach --pool http://127.0.0.1:$P m$i
  curl -s localhost:$P/workers; echo
done
kill -TERM $D; wait $D; echo "daemon exit $?"
grep -h -A14 "unclean after detach" $L/worker-*.log | cut -c1-400
nvidia-smi --query-gpu=memory.used --format=csv,noheader
tar -C /tmp -czf $OUT/smoke-logs.tgz smoke-logs
