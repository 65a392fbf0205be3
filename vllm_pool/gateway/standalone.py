"""`vllm-pool gateway --pool URL [--pool URL2 ...] --models FILE`: the gateway in a process
of its own, in front of one pool or several (typically one per node; also `--pools-file`,
`--pools-dns`: gateway/discovery.py).

It reaches the pools only through their control APIs (`pool_view.RemotePool`) and owns no
process: stopping it (SIGTERM, or a crash) leaves every instance it attached serving in its
pool, and the next gateway started on the same models file adopts them by name at start,
attaching nothing twice. Restart it to change the models file without touching what runs.
One gateway per set of pools: two would each evict for their own requests.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

logger = logging.getLogger("vllm_pool.gateway")

# With several pools, start once these have passed and one pool answers: a node that is
# down must not hold the gateway up for all of --pool-wait (it is adopted when it answers).
_QUORUM_GRACE_S = 10.0


def _pools(args: argparse.Namespace, pool_key: str | None):
    """The PoolSet of the flags, once every pool answered, or one did and the grace passed;
    SystemExit with the reasons if none answers within --pool-wait."""
    from vllm_pool.client import default_pool
    from vllm_pool.gateway.discovery import Discovery
    from vllm_pool.gateway.pool_view import RemotePool
    from vllm_pool.gateway.pools import PoolSet

    disc = Discovery(args.pool, args.pools_file, args.pools_dns)
    if not disc.static and not disc.dynamic:
        disc.static = [default_pool()]

    def make(url: str) -> RemotePool:
        # A snapshot call that hangs must not hold the router's view for long.
        return RemotePool(url, pool_key, timeout=10.0)

    pools = PoolSet({}, discover=disc.urls, make_view=make)
    start = time.monotonic()
    while True:
        pools.refresh()
        members = list(pools.members.values())
        up = [m for m in members if m.up]
        waited = time.monotonic() - start
        if members and len(up) == len(members):
            return pools
        if up and waited >= min(_QUORUM_GRACE_S, args.pool_wait):
            return pools
        if waited >= args.pool_wait:
            if up:
                return pools
            where = ", ".join(m.key for m in members) or "(none found)"
            raise SystemExit(f"gateway: the pool at {where} cannot be used: "
                             f"{pools.down_reason}")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from vllm_pool.logs import configure_logging

    configure_logging("PoolGateway")
    from vllm_pool import access
    from vllm_pool.gateway.server import Gateway, bind, checked_entries, group_policy

    api_key = access.api_key(args.api_key)
    # The pools' key is the environment's: --api-key is what the gateway's clients send.
    pools = _pools(args, os.environ.get(access.API_KEY_ENV))
    devices: list[str] = []
    for m in pools.up():
        by_slot, _ = m.view.workers()
        devices += [by_slot[s] for s in sorted(by_slot)]
    entries = checked_entries(args, api_key, list(dict.fromkeys(devices)))
    sock = bind(args.gateway_host, args.gateway_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gateway = Gateway(pools, entries, sock, api_key, args.gateway_max_queue,
                      args.gateway_queue_timeout, group_policy(args))
    gateway.start()
    for m in pools.members.values():
        logger.info("gateway in front of the pool at %s (%s, parking %s)", m.key,
                    "up" if m.up else "down", "on" if m.view.parking else "off")
    while not stop.wait(0.5):
        if not gateway.thread.is_alive():
            logger.error("the gateway's server stopped")
            return 1
    gateway.stop()
    pools.close()
    logger.info("gateway stopped; the pools' instances keep serving")
    return 0
