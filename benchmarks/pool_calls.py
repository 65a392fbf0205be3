"""The benchmarks' shared calls to the pool's control API, through its one client
(vllm_pool/client.py). Apart from common.py, which scripts that may run without vllm_pool
importable (bench_route.py) import too."""

from __future__ import annotations

import subprocess

from common import wait_ready

from vllm_pool.client import PoolClient, PoolError


def wait_pool(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """The pool's /health answers (not 503: it is ready)."""
    probe = PoolClient(url, timeout=2)

    def ok() -> bool:
        try:
            probe.health()
            return True
        except PoolError:
            return False

    wait_ready(ok, url, proc, timeout)


def detach_all(pool: PoolClient, refs, timeout: float) -> None:
    """Unmeasured clean-up: detach each (never park); one the pool refuses (gone, busy) is
    left as it is, as before; an unreachable pool still raises."""
    for ref in refs:
        try:
            pool.detach(ref, park=False, timeout=timeout)
        except PoolError as e:
            if e.status is None:
                raise
