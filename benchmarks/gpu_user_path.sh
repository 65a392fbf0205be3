#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed (../shared/gpu/README.md): the user-path
# benchmark (bench_user_path.py), the figure of record, through the `vllm` command route
# (`python3 -m vllm.entrypoints.cli.main`: the kit installs no `vllm` script), JSON, tables
# and logs in $OUT.
#   usage: PART=pool|plain1|plain2|report|all bash benchmarks/gpu_user_path.sh [extra args]
# One device command runs at most 10 minutes: the pool side (about 6-8 min with fresh caches)
# and plain vLLM's eleven servers (45-80 s each) do not fit in one, so they run as parts on
# one warm machine, back to back (they share /root/ub between calls), then `report` merges
# them: PART=pool, PART=plain1, PART=plain2, PART=report. `all` runs everything at once.
# Where the pool part runs short of time, `--route-reps 1` saves about 40 s (each `vllm pool
# ls` imports vLLM's CLI until the early route lands). CYCLES=5 for issue 17's item 2.
# Models (built once, bf16, vocabulary padded to 32000 like the kernel warm-up's):
#   A  /root/models/u1b      1.1B Llama (vllm_pool.testing.tiny_model --size 1b, seed 0)
#   A' /root/models/u1b-ft   A's config and tokenizer, other weights (seed 2): a fine-tune
#   B  /root/models/u1b-l12  12 layers instead of 16: another config, compiled on its own
# (/root/kit/mkmodel.py always uses seed 0, so it cannot make A'.)
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
PART=${PART:-pool}
UB=/root/ub
mkdir -p $UB
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
M=/root/models
mk() { [ -f "$1/vllm_pool_fixture.json" ] || python3 -m vllm_pool.testing.tiny_model "$1" --size 1b \
  --dtype bfloat16 --model-vocab 32000 "${@:2}" | tee -a "$OUT/mkmodel.txt"; }
mk $M/u1b --seed 0; mk $M/u1b-ft --seed 2; mk $M/u1b-l12 --seed 1 --layers 12
CYCLES=${CYCLES:-3}
ARGS=${ARGS:-"--dtype bfloat16 --max-model-len 2048 --gpu-memory-utilization 0.45"}
COMMON=(--device gpu --gpus "${GPUS:-0}" --model $M/u1b --model-finetune $M/u1b-ft
        --model-b $M/u1b-l12 --engine-args "$ARGS" --cli "${CLI:-auto}" --cache-root $UB
        --cycles $CYCLES)
PLAIN1=attach_a,reattach_a,attach_finetune,swap_b,attach_a_to_park,wake_a
PLAIN2=$(seq -f "cycle_%g" -s , $CYCLES),same_port_first,same_port_again
bench() {  # name, then bench_user_path.py arguments; SIGTERM before the device tool's limit
  local tag=$1; shift
  timeout -s TERM "${BENCH_TIMEOUT:-540}" python3 benchmarks/bench_user_path.py "${COMMON[@]}" \
    --log-dir $UB/logs-$tag --output-json $UB/$tag.json --output-md "$OUT/user-$tag.md" "$@" \
    2>&1 | tee "$OUT/user-$tag.txt"
  local rc=${PIPESTATUS[0]}
  cp $UB/$tag.json "$OUT/user-$tag.json" 2>/dev/null
  tar -C $UB -czf "$OUT/user-$tag-logs.tgz" logs-$tag 2>/dev/null
  kill_leftovers
  return $rc
}
case $PART in
  pool)   rm -rf $UB/cache-pool; bench pool --side pool "$@" ;;
  plain1) rm -rf $UB/cache-plain; bench plain1 --side plain --plain-steps $PLAIN1 "$@" ;;
  plain2) bench plain2 --side plain --plain-steps $PLAIN2 "$@" ;;
  all)    rm -rf $UB/cache-pool $UB/cache-plain; BENCH_TIMEOUT=${BENCH_TIMEOUT:-3000} bench all "$@" ;;
  report) python3 benchmarks/bench_user_path.py --combine $UB/pool.json $UB/plain1.json \
            $UB/plain2.json --output-json "$OUT/user-path.json" --output-md "$OUT/user-path.md" \
            | tee "$OUT/user-path.txt" ;;
  *) echo "PART must be pool, plain1, plain2, report or all" >&2; exit 2 ;;
esac
