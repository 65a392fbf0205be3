"""vLLM general plugin: the second path of the `vllm` command's route (route.py is the first).

Where site.py reads no .pth files (`python -S`; a `pip install --target DIR` used through
PYTHONPATH, as on the GPU kit) route.py's line never runs, but vLLM still finds this entry
point (group `vllm.general_plugins`) and loads it in its CLI's main process before it parses
the command line, after its subcommand modules are imported (seconds to tens of seconds).
There, and only there, this plugin takes the pool's commands. Every other vLLM process (API
server, EngineCore, workers) also loads plugins and inherits the parent's argv, so the
check on the process is what keeps them out.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from vllm_pool.route import ROUTES, VLLM_CLI_MODULE, pool_argv


def _in_vllm_cli_main() -> bool:
    if multiprocessing.current_process().name != "MainProcess":
        return False
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    main_mod = getattr(sys.modules.get("__main__"), "__spec__", None)
    return prog == "vllm" or (main_mod is not None and main_mod.name == VLLM_CLI_MODULE)


def register() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ROUTES or not _in_vllm_cli_main():
        return
    from vllm_pool.cli import main

    sys.exit(main(pool_argv(sys.argv[1:]), prog="vllm"))
