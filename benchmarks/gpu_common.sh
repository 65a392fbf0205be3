# Sourced by the gpu_*.sh scripts, on the lent GPU machine after the kit is installed
# (../shared/gpu/README.md): the kit's environment, $OUT, vllm-pool installed from this
# checkout, and no process left by an earlier command (it would skew every figure).
source /root/kit/env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | grep -v WARNING
# /tmp/site as a site directory, as an ordinary `pip install` gives: its .pth files (the
# `vllm` route's among them) are read at start-up; PYTHONPATH alone reads none.
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
mkdir -p "$SITE" && echo "import site; site.addsitedir('/tmp/site')" > "$SITE/zz-kit-site.pth"
export PYTHONUNBUFFERED=1
POOL_PROCS="[v]llm_pool|[v]llm-pool|[a]pi_server|[E]ngineCore|[V]LLM::"
kill_leftovers() { pkill -9 -f "$POOL_PROCS" 2>/dev/null; sleep 1; }
kill_leftovers
