"""daemon/server.py: the --gpus option."""

from __future__ import annotations

import pytest

from vllm_pool.daemon.server import parse_gpus


def test_parse_gpus():
    assert parse_gpus("0-3") == ["0", "1", "2", "3"]
    assert parse_gpus("0,2,5") == ["0", "2", "5"]
    for bad in ("3-1", "a", "0,0"):
        with pytest.raises(SystemExit):
            parse_gpus(bad)
