"""The daemon's background threads: one helper, so each is named, a daemon thread, and
logs what kills it instead of dying silently."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("vllm_pool.daemon")


def start_thread(name: str, fn: Callable, *args) -> threading.Thread:
    def run() -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a background step must not fail unseen
            logger.exception("background thread %s failed", name)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t
