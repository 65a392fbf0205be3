"""Park and wake: the pool's side of parked instances (parking.py holds vLLM's sleep and
wake calls, the settings key and the budget policy).

A parked instance keeps its processes and its workers (PARKED), its weights in host
memory and no KV cache, so its device is free for another model: each park leaves the
device an idle worker, started beside the parked one when the instance was attached
("extra" workers), and retired again once the device has an idle worker of its own.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

from vllm_pool.daemon import parking
from vllm_pool.daemon.errors import AttachError
from vllm_pool.engine.launch import health_ok
from vllm_pool.states import InstanceState, WorkerState, transition

if TYPE_CHECKING:
    from vllm_pool.daemon.instance import Instance
    from vllm_pool.daemon.pool import Pool

logger = logging.getLogger("vllm_pool.daemon")
_I, _W = InstanceState, WorkerState


class Room(Protocol):
    """Where a packed instance wakes (placement.WakeRoom)."""

    def held(self) -> AbstractContextManager: ...

    def fits(self) -> bool: ...


def park(pool: Pool, ref: str) -> Instance:
    t0 = time.perf_counter()
    with pool.lock:
        inst = pool.find(ref)
        if inst is None:
            raise KeyError(ref)
        if not pool.cfg.parking:
            raise AttachError("parking is off: start the pool with --enable-parking", 409)
        if inst.state != _I.SERVING:
            raise AttachError(f"instance {inst.name} is {inst.state.value}; only a serving "
                              "instance can be parked", 409)
        transition(inst, _I.PARKING)
    try:
        if pool.on_gpu(inst):
            parking.engine_sleep(inst.url)
    except parking.ParkError as e:
        with pool.lock:
            if inst.state == _I.PARKING:
                transition(inst, _I.SERVING)
        raise AttachError(f"park of {inst.name} failed, it keeps serving: {e}", 500) from None
    host = sum(max(0, parking.process_rss(pool.workers[s].pid) - pool.workers[s].idle_rss)
               for s in inst.slots)
    with pool.lock:
        if inst.state != _I.PARKING:
            raise AttachError(f"park of {inst.name} failed: {inst.error}", 500)
        transition(inst, _I.PARKED, parked_at=time.time(), host_bytes=host)
        for s in inst.slots:
            transition(pool.workers[s], _W.PARKED, [_W.SERVING])
    fresh = add_workers_beside(pool, inst.devices)
    inst.phases["park"] = time.perf_counter() - t0
    logger.info("instance %s parked in %.2fs (%.0f MiB host memory); %d workers started "
                "beside it", inst.name, inst.phases["park"], host / 2**20, fresh)
    _enforce_budget(pool)
    return inst


def wake(pool: Pool, inst: Instance, timeout: float = 900.0,
         room: Room | None = None, evict: bool = True) -> Instance:
    """Wake a parked instance for a re-attach; make room on its devices first: everything
    that serves there, or, for a packed instance (`room`), the least recently used of
    them until its share fits. A wake without `evict` evicts nothing: 409 unless its
    devices are free or its share fits (the gateway then evicts by its own rule, which
    sees requests)."""
    t0 = time.perf_counter()
    with pool.lock:
        if inst.state == _I.WAKING:
            waiting = True
        elif inst.state == _I.PARKED:
            waiting = False
            transition(inst, _I.WAKING)
        else:
            raise AttachError(f"instance {inst.name} is {inst.state.value}", 409)
    if waiting:  # another request is waking it: answer with its outcome
        inst.wait_for(lambda i: i.state != _I.WAKING, timeout)
        if inst.state == _I.PARKED:
            raise AttachError(f"no room to wake {inst.name} on {inst.devices}", 409)
        if inst.state != _I.SERVING:
            raise AttachError(f"wake of {inst.name} failed: {inst.error}", 500)
        return inst
    with room.held() if room is not None else nullcontext():
        return _wake_held(pool, inst, timeout, room, evict, t0)


def _wake_held(pool: Pool, inst: Instance, timeout: float, room: Room | None, evict: bool,
               t0: float) -> Instance:
    with pool.lock:
        occupants = sorted((i for i in pool.instances.values() if i is not inst
                            and i.state == _I.SERVING and set(i.devices) & set(inst.devices)),
                           key=lambda i: i.last_used)
    if not evict:
        # Nothing is evicted: the instance wakes beside what serves only where its share
        # fits (a packed instance), else it stays parked and the caller decides.
        if occupants and not (room is not None and room.fits()):
            with pool.lock:
                transition(inst, _I.PARKED, [_I.WAKING])
            raise AttachError(f"no room to wake {inst.name} on {inst.devices} beside "
                              f"{[i.name for i in occupants]} (evict=false)", 409)
        occupants = []
    for k, occ in enumerate(occupants):
        if room is not None and room.fits():
            logger.info("waking %s beside %d serving instances: its share fits", inst.name,
                        len(occupants) - k)
            break
        _evict(pool, occ, inst)
    t_evicted = time.perf_counter()
    try:
        if pool.on_gpu(inst):
            parking.engine_wake(inst.url, timeout)
        if not health_ok(inst.url, timeout=10):
            raise parking.ParkError("the engine does not answer /health")
    except parking.ParkError as e:
        pool.remove(inst)
        raise AttachError(f"wake of {inst.name} failed, detached it: {e}", 500) from None
    with pool.lock:
        failed = inst.state != _I.WAKING
        if not failed:
            for s in inst.slots:
                transition(pool.workers[s], _W.SERVING, [_W.PARKED])
            transition(inst, _I.SERVING, parked_at=None, host_bytes=0,
                       last_used=time.time(), woken=True)
    if failed:  # a process died while waking: clean up as a failed attach does
        reason = f"wake of {inst.name} failed: {inst.error}"
        pool.abort_attach(inst, reason)
        trim_idle_workers(pool, inst.devices)
        raise AttachError(reason, 500)
    now = time.perf_counter()
    inst.phases.update(evict=t_evicted - t0, wake=now - t_evicted, wake_total=now - t0)
    logger.info("instance %s woken in %.2fs (evicting took %.2fs)", inst.name, now - t0,
                t_evicted - t0)
    return inst


def _evict(pool: Pool, occ: Instance, waking: Instance) -> None:
    """Make room for a wake: park (or detach, per --wake-evicts) what serves there; a park
    that fails falls back to a detach."""
    how = pool.cfg.wake_evicts
    logger.info("waking %s: %s %s, which holds %s", waking.name,
                "parking" if how == "park" else "detaching", occ.name, occ.devices)
    for park_it in ([True, False] if how == "park" else [False]):
        try:
            pool.detach(occ.id, park=park_it)
            return
        except (KeyError, AttachError) as e:
            logger.warning("could not %s %s (%s)", "park" if park_it else "detach", occ.name, e)


def add_workers_beside(pool: Pool, devices: list[str]) -> int:
    """Start a worker on each device that has no idle or starting one, so a park leaves
    its device an idle worker at once; how many were started."""
    with pool.lock:
        fresh = [pool.new_worker(d, extra=True) for d in dict.fromkeys(devices)
                 if not any(w.device == d and w.state in (_W.IDLE, _W.STARTING)
                            for w in pool.workers.values())]
    for w in fresh:
        w.spawn()
    return len(fresh)


def trim_idle_workers(pool: Pool, devices: list[str]) -> None:
    """Keep one idle worker per device: the ones started beside parked workers go once
    their device has an idle worker again."""
    stop = []
    with pool.lock:
        for d in dict.fromkeys(devices):
            idle = sorted(s for s, w in pool.workers.items()
                          if w.device == d and w.state == _W.IDLE)
            for s in idle[1:]:
                stop.append(pool.workers.pop(s))
    for w in stop:
        logger.info("stopping extra worker %d on %s", w.slot, w.device)
        w.stop()


def _enforce_budget(pool: Pool) -> None:
    with pool.lock:
        parked = [parking.Parked(i.id, i.host_bytes, i.last_used)
                  for i in pool.instances.values() if i.state == _I.PARKED]
    for iid in parking.over_budget(parked, pool.cfg.park_budget_bytes):
        logger.info("park budget of %.1f GiB exceeded: detaching parked instance %s",
                    pool.cfg.park_budget_bytes / 2**30, iid)
        try:
            pool.detach(iid, park=False)
        except (KeyError, AttachError) as e:
            logger.warning("could not detach parked instance %s: %s", iid, e)
