#!/usr/bin/env bash
# The CPU demo: environment, tiny model, a 2-slot pool, attach, one chat request, detach,
# stop, with the timings printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# shellcheck disable=SC1091
. scripts/venv-path.sh
. "$VENV/bin/activate"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec python scripts/demo.py "$@"
