"""An engine host: vLLM's own OpenAI API server, in a process that was warm before the attach.

Two ways in. Usually the daemon keeps one fork server (`--forkserver-fd N`,
`forkserver.py`): it imports everything the API server and EngineCore need once, and forks
one host per attach in milliseconds. An attach that sets environment read at import time
gets a fresh interpreter instead (`--cmd-fd N [--ready-fd M]`), which imports, says `ready`
on --ready-fd and goes on as a forked host does. A host waits for one JSON line on its
order pipe: `{"argv": [...], "env": {...}}`. It then takes that
environment and runs vLLM's api_server module as `__main__` with those arguments. EngineCore
is forked from it (VLLM_WORKER_MULTIPROC_METHOD=fork), so it starts with vLLM already
imported too; this process makes no CUDA context, so forking is what vLLM itself allows.

The command pipe stays open for the engine's life: EOF means the daemon died, and the
engine's whole process group (API server and EngineCore) is terminated, so no engine
outlives its pool.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import time

# What an attach would otherwise import on its critical path, in the API server and in
# EngineCore. Missing modules (other vLLM versions) are skipped: this is only a warm-up.
PREWARM = (
    "vllm.entrypoints.openai.api_server",
    "vllm.entrypoints.openai.cli_args",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.engine.async_llm",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.core.sched.scheduler",
    "vllm.model_executor.models.registry",
    "vllm_pool.executor",
)


def _guard(cmd) -> None:
    try:
        while cmd.read(1):
            pass
    except (OSError, ValueError):
        pass
    os.killpg(os.getpgrp(), signal.SIGTERM)


def prewarm() -> float:
    t0 = time.perf_counter()
    for mod in PREWARM:
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - best effort
            pass
    return time.perf_counter() - t0


def trace_stacks(every: str | None) -> None:
    """Debug aid (VLLM_POOL_TRACE_STACKS=<seconds>): dump every thread's stack to the log
    that often, here and in the forked EngineCore, to see where start-up time goes.
    Debug only: in a pool worker, a dump taken during a Dynamo compile crashed it."""
    if not every:
        return
    import faulthandler

    faulthandler.dump_traceback_later(float(every), repeat=True)
    os.register_at_fork(
        after_in_child=lambda: faulthandler.dump_traceback_later(float(every), repeat=True))


def run_host(cmd) -> None:
    """Wait for the attach's order on `cmd`, then become vLLM's API server with it."""
    import setproctitle

    line = cmd.readline()
    if not line:
        return  # the pool went away before this host was used
    order = json.loads(line)
    setproctitle.setproctitle("vllm-pool-engine")
    threading.Thread(target=_guard, args=(cmd,), daemon=True, name="PoolParentGuard").start()
    os.environ.clear()
    os.environ.update(order["env"])
    from vllm_pool import compat

    trace_stacks(os.environ.get("VLLM_POOL_TRACE_STACKS"))
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "fork":
        compat.allow_forked_engine_core()
    compat.fork_registry_inspection()
    module = compat.api_server_module()
    sys.argv = [module] + list(order["argv"])
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _warm() -> None:
    print(f"vllm-pool engine host warm in {prewarm():.1f}s", flush=True)
    # Out of the GC's reach, in this host and in every process forked from it: vLLM's
    # freeze_gc_heap() at the end of EngineCore start-up collects the whole heap, 2 s on
    # the CPU machine over the host's unfrozen imports.
    gc.collect()
    gc.freeze()


def main() -> None:
    p = argparse.ArgumentParser(prog="vllm-pool-engine")
    p.add_argument("--cmd-fd", type=int, default=None, help="a single host: its order pipe")
    p.add_argument("--ready-fd", type=int, default=None)
    p.add_argument("--forkserver-fd", type=int, default=None,
                   help="the fork server: its control socket (forkserver.py)")
    a = p.parse_args()
    import setproctitle

    if a.forkserver_fd is not None:
        from vllm_pool.engine import forkserver

        setproctitle.setproctitle("vllm-pool-engine-forkserver")
        _warm()
        forkserver.serve(a.forkserver_fd, run_host)
        return
    setproctitle.setproctitle("vllm-pool-engine-spare")
    _warm()
    if a.ready_fd is not None:
        os.write(a.ready_fd, b"ready\n")
        os.close(a.ready_fd)
    run_host(os.fdopen(a.cmd_fd, "rb"))


if __name__ == "__main__":
    main()
