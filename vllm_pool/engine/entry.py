"""Entry point of an attached engine: vLLM's own OpenAI API server, unchanged.

The daemon starts `python -m vllm_pool.engine.entry --parent-fd N -- <vllm serve args>`.
The only addition is a guard: EOF on the inherited fd means the daemon died, and the
engine's whole process group (API server and EngineCore) is terminated, so an engine
never outlives its pool. Everything after `--` goes to vLLM's api_server as is.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading


def _guard(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    os.killpg(os.getpgrp(), signal.SIGTERM)


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) >= 3 and argv[0] == "--parent-fd" and argv[2] == "--":
        threading.Thread(target=_guard, args=(int(argv[1]),), daemon=True,
                         name="PoolParentGuard").start()
        argv = argv[3:]
    from vllm_pool import compat

    module = compat.api_server_module()
    sys.argv = [module] + argv
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
