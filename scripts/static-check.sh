#!/usr/bin/env bash
# The "static" CI leg: the compat tests (tests/test_compat_static.py, test_compat_range.py)
# against a vLLM no machine here can run an engine with (0.33.0 beside torch 2.14.1; see
# setup-static-env.sh), and against the unpacked 0.26.0 source. No engine starts: every
# module the pool touches imports, every symbol it needs is there, every signature is the
# one written for that version (compat.SIGNATURES). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-static-env.sh
STATIC_VLLM=${VLLM_POOL_STATIC_VLLM:-0.33.0}
VENV=${VLLM_POOL_STATIC_VENV:-.venv-vllm-$STATIC_VLLM-static}
# vllm-pool from this checkout, not installed in that venv.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest tests/test_compat_static.py tests/test_compat_range.py -v \
  -p no:cacheprovider "$@"
