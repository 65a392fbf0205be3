"""`vllm-pool gateway --pool URL --models FILE`: the gateway in a process of its own.

It reaches the pool only through its control API (`pool_view.RemotePool`) and owns no
process: stopping it (SIGTERM, or a crash) leaves every instance it attached serving in the
pool, and the next gateway started on the same models file adopts them by name at start,
attaching nothing twice. Restart it to change the models file without touching what runs.
One gateway per pool: two would each evict for their own requests.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

logger = logging.getLogger("vllm_pool.gateway")


def run(args: argparse.Namespace) -> int:
    from vllm_pool.logs import configure_logging

    configure_logging("PoolGateway")
    from vllm_pool import access
    from vllm_pool.daemon.errors import AttachError
    from vllm_pool.gateway.pool_view import RemotePool
    from vllm_pool.gateway.server import Gateway, bind, checked_entries

    api_key = access.api_key(args.api_key)
    # The pool's key is the environment's: --api-key is what the gateway's clients send.
    pool = RemotePool(args.pool, os.environ.get(access.API_KEY_ENV))
    try:
        pool.start(args.pool_wait)
    except AttachError as e:
        raise SystemExit(f"gateway: the pool at {args.pool} cannot be used: {e}") from None
    by_slot, _ = pool.workers()
    entries = checked_entries(args, api_key,
                              list(dict.fromkeys(by_slot[s] for s in sorted(by_slot))))
    sock = bind(args.gateway_host, args.gateway_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gateway = Gateway(pool, entries, sock, api_key, args.gateway_max_queue,
                      args.gateway_queue_timeout)
    gateway.start()
    logger.info("gateway in front of the pool at %s (parking %s)", pool.url,
                "on" if pool.parking else "off")
    while not stop.wait(0.5):
        if not gateway.thread.is_alive():
            logger.error("the gateway's server stopped")
            return 1
    gateway.stop()
    logger.info("gateway stopped; the pool's instances keep serving")
    return 0
