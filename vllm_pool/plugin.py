"""vLLM general plugin: routes `vllm serve-pool|attach|detach|pool ls` to vllm-pool.

vLLM's CLI has a fixed list of subcommands and no hook to add one, but it loads general
plugins (entry-point group `vllm.general_plugins`) in its own main process before it
parses the command line. There, and only there, this plugin takes the pool's commands.
Every other vLLM process (API server, EngineCore, workers) also loads plugins and
inherits the parent's argv, so the check on the process is what keeps them out.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

ROUTES = {"serve-pool": ["serve"], "attach": ["attach"], "detach": ["detach"],
          "pool": []}  # `vllm pool ls` -> `vllm-pool ls`


def _in_vllm_cli_main() -> bool:
    if multiprocessing.current_process().name != "MainProcess":
        return False
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    main_mod = getattr(sys.modules.get("__main__"), "__spec__", None)
    return prog == "vllm" or (main_mod is not None
                              and main_mod.name == "vllm.entrypoints.cli.main")


def register() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ROUTES or not _in_vllm_cli_main():
        return
    from vllm_pool.cli import main

    argv = ROUTES[sys.argv[1]] + sys.argv[2:]
    sys.exit(main(argv, prog="vllm"))
