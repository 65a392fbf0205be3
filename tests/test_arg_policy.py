"""daemon/arg_policy.py: the arguments and environment the pool owns are refused."""

from __future__ import annotations

import pytest

from vllm_pool.daemon.arg_policy import check_args as _check_args
from vllm_pool.daemon.errors import AttachError


def test_pool_owned_arguments_rejected():
    with pytest.raises(AttachError, match="--distributed-executor-backend"):
        _check_args(["--distributed-executor-backend=mp"], {})
    with pytest.raises(AttachError, match="VLLM_POOL_LEASE"):
        _check_args([], {"VLLM_POOL_LEASE": "x"})
    _check_args(["--dtype", "float32"], {"VLLM_LOGGING_LEVEL": "DEBUG"})
