#!/usr/bin/env bash
# Short GPU check of parking (kit installed): pool with --enable-parking, attach a model,
# park it, device memory while parked, re-attach (wake) to first completion, greedy output
# before and after, detach. Prints timings; logs to $OUT/park-logs.tgz.
#   usage: MODEL=/root/models/tiny bash benchmarks/gpu_park_check.sh
set -u
source /root/kit/env.sh
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | grep -v WARNING
MODEL=${MODEL:-/root/models/tiny}
[ -d "$MODEL" ] || python3 /root/kit/mkmodel.py "$MODEL" "${SIZE:-tiny}" >/dev/null 2>&1
P=18200; L=/tmp/park-logs; mkdir -p $L
python3 -m vllm_pool serve --gpus "${GPUS:-0}" --port $P --log-dir $L --enable-parking > $L/daemon.out 2>&1 &
D=$!
now() { python3 -c "import time; print(time.time())"; }
el() { python3 -c "print(round($(now) - $1, 2))"; }
t0=$(now); until curl -sf localhost:$P/health >/dev/null; do sleep 0.5; done; echo "pool ready $(el $t0)s"
ARGS="--enforce-eager --max-model-len 512 --gpu-memory-utilization 0.5"
ask() { curl -s localhost:$1/v1/completions -H 'content-type: application/json' -d "{\"model\":\"$MODEL\",\"prompt\":\"def main(\",\"max_tokens\":16,\"temperature\":0}" | python3 -c "import json,sys; print(repr(json.load(sys.stdin)['choices'][0]['text']))"; }
gpumem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader | head -1; }
t0=$(now); python3 -m vllm_pool attach --pool http://127.0.0.1:$P --model $MODEL --name a $ARGS --json > $L/a1.json || { tail -c 2000 $L/a1.json; }
port=$(python3 -c "import json; print(json.load(open('$L/a1.json'))['port'])")
echo "before park: $(ask $port)  attach to 1st completion $(el $t0)s  gpu $(gpumem)"
t0=$(now); python3 -m vllm_pool detach --pool http://127.0.0.1:$P --park a; echo "park $(el $t0)s; gpu while parked $(gpumem)"
sleep 2; echo "gpu while parked (+2s) $(gpumem)"; curl -s localhost:$P/workers; echo
t0=$(now); python3 -m vllm_pool attach --pool http://127.0.0.1:$P --model $MODEL $ARGS --json > $L/a2.json || tail -c 2000 $L/a2.json
echo "after wake:  $(ask $port)  re-attach to 1st completion $(el $t0)s  gpu $(gpumem)"
python3 -c "import json; d=json.load(open('$L/a2.json')); print('woken', d['woken'], d['phases'])"
t0=$(now); python3 -m vllm_pool detach --pool http://127.0.0.1:$P --no-park a; echo "detach $(el $t0)s"
curl -s localhost:$P/workers; echo
kill -TERM $D; wait $D; echo "daemon exit $?"
grep -h -i "error\|unclean" $L/*.log | grep -v "^ -" | cut -c1-300 | head -20
tar -C /tmp -czf $OUT/park-logs.tgz park-logs
