"""The pool's side of packing (packing.py is the pure policy): read each GPU's memory,
choose, and hold the chosen GPUs' locks for the attach."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from vllm_pool.daemon import packing, park_wake
from vllm_pool.daemon.errors import AttachError

if TYPE_CHECKING:
    from vllm_pool.daemon.instance import Instance
    from vllm_pool.daemon.pool import Pool


def rooms(pool: Pool) -> list[packing.Room]:
    """Each GPU's memory now (NVML, through one of its workers); [] unless every pool
    device has a reading: then the pool packs by memory, else one model per device
    (CPU, or a GPU without NVML's figures)."""
    found: dict[str, packing.Room] = {}
    for w in list(pool.workers.values()):
        if w.device.startswith("cuda") and w.device not in found and w.device_uuid:
            _, free, total = w.memory_now()
            if total:
                found[w.device] = packing.Room(w.device, total, free)
    return list(found.values()) if set(found) == set(pool.cfg.devices) else []


def packs(pool: Pool) -> bool:
    """The pool places attaches by GPU memory now (rooms), several per GPU."""
    return bool(rooms(pool))


def _acquire(pool: Pool, devices: list[str]) -> None:
    for d in sorted(devices):  # one order for every holder: no deadlock between them
        pool.device_locks[d].acquire()


def _release(pool: Pool, devices: list[str]) -> None:
    for d in sorted(devices, reverse=True):
        pool.device_locks[d].release()


def place(pool: Pool, util: float, n: int, wanted: list[str] | None) -> list[str]:
    """Choose the GPUs (packing.choose, rank order) and hold their locks (the caller
    releases them after the attach); the choice is checked again with the locks held:
    another attach may have started there meanwhile. 409 when nothing fits; [] when the
    pool does not pack (no reading for some device: one model per device)."""
    margin = pool.cfg.pack_margin_mib
    now = rooms(pool)
    if not now:
        return []
    try:
        chosen = packing.choose(now, util, n, margin, wanted)
    except packing.NoRoom as e:
        raise AttachError(str(e), 409) from None
    _acquire(pool, chosen)
    try:
        packing.choose(rooms(pool), util, n, margin, chosen)
        # A packed attach gets a worker process of its own beside those already there.
        park_wake.add_workers_beside(pool, chosen)
    except packing.NoRoom as e:
        _release(pool, chosen)
        raise AttachError(str(e), 409) from None
    except BaseException:
        _release(pool, chosen)
        raise
    return chosen


class WakeRoom:
    """A packed instance's wake (park_wake.wake): its GPUs' locks, held through the
    evictions and the wake so that no attach takes the room meanwhile, and whether its
    share fits now beside what serves there, so that only what must go is evicted."""

    def __init__(self, pool: Pool, inst: Instance):
        self.pool, self.inst = pool, inst

    @contextmanager
    def held(self) -> Iterator[None]:
        devices = list(set(self.inst.devices))
        _acquire(self.pool, devices)
        try:
            yield
        finally:
            _release(self.pool, devices)

    def fits(self) -> bool:
        util = self.inst.gpu_memory_utilization
        by_dev = {r.device: r for r in rooms(self.pool)}
        if util is None or not by_dev:
            return False
        workers = [self.pool.workers[s] for s in self.inst.slots if s in self.pool.workers]
        return all(packing.wake_fits(by_dev[d], util,
                                     sum(w.memory_now()[0] for w in workers if w.device == d),
                                     self.pool.cfg.pack_margin_mib)
                   for d in set(self.inst.devices))
