#!/usr/bin/env bash
# On the lent GPU machine, after the kit is installed (../shared/gpu/README.md): the compat
# checks against the kit's vLLM (0.26.0, CUDA) as a pool worker on a GPU imports it, and a
# real pool worker's start-up check (compat.check_vllm) with nothing else. No model, no
# engine; about a minute. Output (pytest's and the check's) in $OUT/compat.txt.
#   usage: bash benchmarks/gpu_compat.sh
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH="/tmp/site:$PWD"
{
  python3 -m pytest tests/test_compat_static.py tests/test_compat_range.py -q -p no:cacheprovider
  rc=$?
  # What each pool worker runs first, on a CUDA platform: range, symbols, signatures.
  python3 -c "import logging; logging.basicConfig(); from vllm_pool import compat
print('check_vllm:', compat.check_vllm(), compat.vllm_problems())"
  exit $((rc || $?))
} 2>&1 | tee "$OUT/compat.txt"
exit "${PIPESTATUS[0]}"
