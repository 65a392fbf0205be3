"""Logging in vLLM's format, so pool lines read like the engine's own.

vLLM prints `(ProcName pid=N) LEVEL MM-DD HH:MM:SS [file.py:line] message`; we do the same
for the daemon and the pool workers.
"""

from __future__ import annotations

import logging
import os
import sys


def configure_logging(process_name: str, level: str | None = None) -> None:
    level = level or os.environ.get("VLLM_LOGGING_LEVEL", "INFO")
    fmt = (f"({process_name} pid={os.getpid()}) %(levelname)s %(asctime)s "
           f"[%(filename)s:%(lineno)d] %(message)s")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%m-%d %H:%M:%S"))
    root = logging.getLogger("vllm_pool")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
