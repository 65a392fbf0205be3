"""Which `vllm serve` arguments and environment an attach may set: the pool owns some."""

from __future__ import annotations

from vllm_pool.daemon.errors import AttachError

# The pool sets these itself; a user's value would break the engine or the lease.
OWNED_ARGS = {"--distributed-executor-backend": "the pool always uses its own executor",
              "--port": "use the attach `port` field", "--host": "engines bind to the pool's host",
              "--model": "use the attach `model` field",
              "--tensor-parallel-size": "use `tp`", "-tp": "use `tp`",
              "--pipeline-parallel-size": "use `pp`", "-pp": "use `pp`",
              "--device-ids": "use `devices`", "--data-parallel-size": "not supported by the pool",
              "-dp": "not supported by the pool"}


def check_args(args: list[str], env: dict[str, str]) -> None:
    """Reject arguments the pool owns with a clear reason (422) instead of a broken engine."""
    for a in args:
        key = a.split("=", 1)[0]
        if key in OWNED_ARGS:
            raise AttachError(f"argument {key} is not allowed here: {OWNED_ARGS[key]}", 422)
    for k in env:
        if k.startswith("VLLM_POOL_") or k in ("CUDA_VISIBLE_DEVICES", "VLLM_RPC_BASE_PATH") \
                or not k.replace("_", "").isalnum():
            raise AttachError(f"environment variable {k} cannot be set per attach", 422)
