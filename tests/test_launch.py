"""engine/launch.py: the engine's command line, and the reason read from a failed engine's log."""

from __future__ import annotations

from vllm_pool.engine.launch import engine_argv, failure_reason


def test_engine_argv_ends_with_pool_executor():
    argv = engine_argv("m", "127.0.0.1", 9000, 2, 1, ["--dtype", "half"], [0, 1])
    assert argv[-2:] == ["--distributed-executor-backend", "vllm_pool.executor.PoolExecutor"]
    assert "--device-ids" in argv and argv[argv.index("--device-ids") + 1] == "0,1"


def test_failure_reason_prefers_root_cause():
    log = ("INFO starting\nValueError: model path /x does not exist\n"
           "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert failure_reason(log) == "ValueError: model path /x does not exist"
    assert failure_reason("usage: ...\napi_server.py: error: unrecognized arguments: --x\n") \
        == "api_server.py: error: unrecognized arguments: --x"
    assert "no error" in failure_reason("INFO: GET /health 200 OK\n")
