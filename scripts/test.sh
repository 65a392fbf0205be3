#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# shellcheck disable=SC1091
. "${VLLM_POOL_VENV:-.venv}/bin/activate"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec python -m pytest tests -v -p no:cacheprovider "$@"
