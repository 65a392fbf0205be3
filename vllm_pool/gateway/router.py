"""Model name -> serving instance, attaching on demand.

Everything here runs on the gateway's event loop; only `Pool.attach` / `Pool.detach` run
in threads (they block for seconds). So the bookkeeping below needs no lock: between two
awaits nothing else touches it.

Rules:
- single flight: one bring-up task per model; every request waiting for that model awaits
  the same task, so N concurrent requests for a cold model cause one attach;
- waiting requests are bounded (`max_queue`, over all models) and time out
  (`queue_timeout`);
- when the devices are full, the least recently used *idle* instance (no request in flight,
  none waiting) is evicted; an instance with requests in flight never is; where the pool
  packs models by GPU memory (several per GPU), the pool places the attach and the gateway
  evicts only when the pool answered 409 for lack of room ("no room: ..."), then retries;
- an instance idle for its entry's `ttl` is evicted by the reaper;
- the pool is the source of truth: an instance named like an entry is that entry's, so a
  gateway that finds instances already running adopts them instead of attaching twice
  (also a gateway started again in a process of its own: `pool_view.RemotePool`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vllm_pool.daemon.errors import AttachError
from vllm_pool.gateway.metrics import GatewayMetrics
from vllm_pool.gateway.models_file import ModelEntry
from vllm_pool.states import InstanceState

logger = logging.getLogger("vllm_pool.gateway")


class ModelState(str, enum.Enum):
    COLD = "cold"            # no instance
    ATTACHING = "attaching"  # a bring-up is running (waiting for room, or attaching)
    SERVING = "serving"      # has a serving instance
    EVICTING = "evicting"    # its instance is being detached (LRU or TTL)


class GatewayError(Exception):
    """Answered to the client as an OpenAI-style error."""

    status = 500
    type = "InternalServerError"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UnknownModel(GatewayError):
    status, type = 404, "NotFoundError"


class QueueFull(GatewayError):
    status, type = 429, "RateLimitError"


class QueueTimeout(GatewayError):
    status, type = 503, "ServiceUnavailableError"


class AttachFailed(GatewayError):
    status, type = 503, "ServiceUnavailableError"


@dataclass
class Model:
    """Runtime state of one models-file entry."""

    entry: ModelEntry
    state: ModelState = ModelState.COLD
    instance: Any = None  # the pool's Instance, or a pool_view.RemoteInstance
    in_flight: int = 0
    waiting: int = 0
    last_used: float = field(default_factory=time.monotonic)
    bring_up: asyncio.Task | None = None
    evicting: asyncio.Task | None = None
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.entry.name


class Router:
    def __init__(self, pool, entries: list[ModelEntry], metrics: GatewayMetrics,
                 max_queue: int = 1024, queue_timeout: float = 600.0,
                 attach_timeout: float = 900.0, reap_interval: float = 1.0):
        self.pool = pool
        self.metrics = metrics
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.attach_timeout = attach_timeout
        self.reap_interval = reap_interval
        self.models: dict[str, Model] = {e.name: Model(e) for e in entries}
        self._by_name = {n: self.models[e.name] for e in entries for n in e.names}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        for m in self.models.values():
            self._set_state(m, ModelState.COLD)

    # ---- life ------------------------------------------------------------------------
    async def start(self) -> None:
        self._changed = asyncio.Event()  # bound to the running loop
        for m in self.models.values():
            self._adopt_if_running(m)
        self._spawn(self._reaper())
        for m in self.models.values():
            if m.entry.preload and m.state == ModelState.COLD:
                m.bring_up = self._spawn(self._bring_up(m, keep=True))

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for m in self.models.values():
            if m.bring_up is not None:
                m.bring_up.cancel()

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        t.add_done_callback(_log_failure)
        return t

    # ---- requests ----------------------------------------------------------------------
    def resolve(self, name: str) -> Model:
        m = self._by_name.get(name)
        if m is None:
            raise UnknownModel(f"The model `{name}` does not exist.")
        return m

    async def acquire(self, name: str) -> Model:
        """The model's entry with a serving instance and one more request in flight on it
        (give it back with `release`). Attaches the model if it has no instance."""
        m = self.resolve(name)
        if self._ready(m):
            return self._enter(m)
        if sum(x.waiting for x in self.models.values()) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting for their "
                            "models; retry later")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        m.waiting += 1
        self.metrics.queue_depth.labels(m.name).set(m.waiting)
        try:
            while True:
                if self._ready(m):
                    return self._enter(m)
                if m.bring_up is None or m.bring_up.done():
                    m.bring_up = self._spawn(self._bring_up(m))
                task = m.bring_up
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    # shield: one waiter timing out must not cancel the others' attach.
                    await asyncio.wait_for(asyncio.shield(task), remaining)
                except asyncio.TimeoutError:
                    raise QueueTimeout(f"model `{m.name}` was not ready after "
                                       f"{self.queue_timeout:.0f}s "
                                       f"({m.state.value}); retry later") from None
        finally:
            m.waiting -= 1
            self.metrics.queue_depth.labels(m.name).set(m.waiting)

    def _enter(self, m: Model) -> Model:
        m.in_flight += 1
        m.last_used = time.monotonic()
        self.metrics.in_flight.labels(m.name).set(m.in_flight)
        return m

    def release(self, m: Model) -> None:
        m.in_flight -= 1
        m.last_used = time.monotonic()
        self.metrics.in_flight.labels(m.name).set(m.in_flight)
        if m.in_flight == 0:
            self._notify()

    def _ready(self, m: Model) -> bool:
        if m.state != ModelState.SERVING:
            return False
        inst = m.instance
        if inst is not None and self.pool.serving(inst):
            return True
        # Its engine died or someone detached it through the control API.
        logger.warning("instance of %s is gone (%s); attaching again on demand", m.name,
                       inst.state.value if inst else "none")
        self._set_state(m, ModelState.COLD)
        m.instance = None
        return False

    # ---- bring-up: room, then one attach --------------------------------------------
    async def _bring_up(self, m: Model, keep: bool = False) -> None:
        """Attach the model once, making room by eviction; waits for room while requests
        wait for the model (`keep`: preload, no request needed)."""
        if m.evicting is not None:
            await asyncio.shield(m.evicting)
        self._set_state(m, ModelState.ATTACHING)
        try:
            while True:
                await asyncio.to_thread(self.pool.refresh)  # a remote pool's snapshot
                if self._adopt_if_running(m):
                    return
                existing = self.pool.find(m.name)
                if existing is not None and existing.state == InstanceState.PARKED:
                    if await self._wake(m, existing):
                        return
                    continue
                if existing is not None:
                    if existing.state == InstanceState.FAILED:
                        await asyncio.to_thread(self._detach_quietly, existing)
                    else:  # attaching, parking, waking or detaching elsewhere
                        await self._wait_change(0.5)
                    continue
                if m.waiting == 0 and not keep:
                    return  # everyone waiting gave up
                packs = self.pool.packs()
                devices = (list(m.entry.devices or []) or None) if packs \
                    else self._devices_for(m.entry)
                if devices is None and not packs:
                    await self._evict_one_or_wait(m)
                    continue
                try:
                    inst = await asyncio.to_thread(self.pool.attach, m.entry, devices,
                                                   self.attach_timeout)
                except AttachError as e:
                    if e.status == 409 and packs and ("no room" in str(e)
                                                      or "free workers" in str(e)):
                        # Eviction frees memory: one model at a time, until it fits.
                        await self._evict_one_or_wait(m)
                        continue
                    if e.status == 409:
                        # Room taken meanwhile (or the name): look again.
                        await self._wait_change(0.25)
                        continue
                    self.metrics.attaches.labels(m.name, "failed").inc()
                    m.last_error = str(e)
                    raise AttachFailed(f"attach of model `{m.name}` failed: {e}") from None
                self.metrics.attaches.labels(m.name, "ok").inc()
                for phase, secs in inst.phases.items():
                    self.metrics.attach_phase.labels(phase).observe(secs)
                m.instance, m.last_error = inst, None
                m.last_used = time.monotonic()
                self._set_state(m, ModelState.SERVING)
                logger.info("model %s attached on demand in %.2fs", m.name,
                            inst.phases.get("total", 0.0))
                return
        finally:
            if m.state == ModelState.ATTACHING:
                self._set_state(m, ModelState.COLD)
            self._notify()

    async def _wake(self, m: Model, inst) -> bool:
        """Wake the model's parked instance. Serving models on its devices are evicted
        first by the gateway's own rule (never one with requests in flight or waiting);
        returns False to look again later."""
        occupants = [v for v in self.models.values() if v is not m and v.instance is not None
                     and v.state == ModelState.SERVING
                     and set(v.instance.devices) & set(inst.devices)]
        if any(v.in_flight or v.waiting for v in occupants):
            await self._wait_change(1.0)
            return False
        for v in occupants:
            await self._evict_model(v, "wake")
        try:
            inst = await asyncio.to_thread(self.pool.wake, inst, m.entry, self.attach_timeout)
        except AttachError as e:
            if e.status == 409:  # parked or woken elsewhere meanwhile
                await self._wait_change(0.25)
                return False
            self.metrics.attaches.labels(m.name, "failed").inc()
            m.last_error = str(e)
            raise AttachFailed(f"wake of model `{m.name}` failed: {e}") from None
        self.metrics.attaches.labels(m.name, "woken").inc()
        for phase in ("evict", "wake", "wake_total"):
            if phase in inst.phases:
                self.metrics.attach_phase.labels(phase).observe(inst.phases[phase])
        m.instance, m.last_error = inst, None
        m.last_used = time.monotonic()
        self._set_state(m, ModelState.SERVING)
        logger.info("model %s woken on demand in %.2fs", m.name,
                    inst.phases.get("wake_total", 0.0))
        return True

    def _adopt_if_running(self, m: Model) -> bool:
        inst = self.pool.find(m.name)
        if inst is None or inst.state != InstanceState.SERVING:
            return False
        if m.instance is None or m.instance.id != inst.id:
            logger.info("model %s: using the running instance %s", m.name, inst.id)
        m.instance = inst
        self._set_state(m, ModelState.SERVING)
        return True

    def _devices_for(self, e: ModelEntry) -> list[str] | None:
        """Free devices for the entry, or None while there is no room. An unpinned entry
        takes devices no entry is pinned to first, so it does not sit on a pinned
        model's device and starve it while it serves."""
        devices, ok = self.pool.workers()
        if e.devices:
            free_devs = {devices[s] for s in ok}
            return list(e.devices) if all(d in free_devs for d in e.devices) else None
        pinned = {d for m in self.models.values() for d in (m.entry.devices or ())}
        free: list[str] = []
        for s in sorted(ok, key=lambda s: (devices[s] in pinned, s)):
            if devices[s] not in free:  # one rank per device
                free.append(devices[s])
        return free[:e.tp] if len(free) >= e.tp else None

    def _pick_victim(self, m: Model) -> Model | None:
        """The least recently used serving model with nothing in flight or waiting, whose
        devices help `m` (any device, or one `m` is pinned to)."""
        def helps(v: Model) -> bool:
            if not m.entry.devices:
                return True
            return bool(set(v.instance.devices) & set(m.entry.devices))

        idle = [v for v in self.models.values() if v is not m and v.state == ModelState.SERVING
                and v.in_flight == 0 and v.waiting == 0 and v.instance is not None
                and helps(v)]
        return min(idle, key=lambda v: v.last_used, default=None)

    # ---- eviction ------------------------------------------------------------------------
    def evict(self, instance) -> None:
        """Free an instance's devices: park it when the pool parks (the next request wakes
        it), else detach it."""
        self._detach_quietly(instance, park=self.pool.parking)

    def _detach_quietly(self, instance, park: bool = False) -> None:
        try:
            self.pool.detach(instance.id, park=park)
        except KeyError:
            pass  # already gone
        except AttachError as e:
            logger.warning("detach of %s: %s", instance.name, e)

    async def _evict_one_or_wait(self, m: Model) -> None:
        """Evict the least recently used idle model for `m`, or wait for a change."""
        victim = self._pick_victim(m)
        if victim is not None:
            await self._evict_model(victim, "lru")
        else:
            await self._wait_change(1.0)

    async def _evict_model(self, m: Model, reason: str) -> None:
        inst = m.instance
        if inst is None or m.state != ModelState.SERVING:
            return
        self._set_state(m, ModelState.EVICTING)
        logger.info("evicting %s (%s, idle %.1fs)", m.name, reason,
                    time.monotonic() - m.last_used)
        m.evicting = self._spawn(asyncio.to_thread(self.evict, inst))
        try:
            await asyncio.shield(m.evicting)
        finally:
            m.evicting = None
            m.instance = None
            if m.state == ModelState.EVICTING:
                self._set_state(m, ModelState.COLD)
            self.metrics.evictions.labels(m.name, reason).inc()
            self._notify()

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await asyncio.to_thread(self.pool.refresh)  # a remote pool's snapshot
            now = time.monotonic()
            for m in list(self.models.values()):
                ttl = m.entry.idle_ttl
                if m.state == ModelState.SERVING and not self._ready(m):
                    continue  # noticed a dead instance; next request re-attaches
                if ttl and m.state == ModelState.SERVING and m.in_flight == 0 \
                        and m.waiting == 0 and now - m.last_used >= ttl:
                    self._spawn(self._evict_model(m, "ttl"))

    # ---- helpers ---------------------------------------------------------------------------
    def _set_state(self, m: Model, state: ModelState) -> None:
        m.state = state
        for s in ModelState:
            self.metrics.model_state.labels(m.name, s.value).set(1 if s == state else 0)

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def _wait_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def _log_failure(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is not None \
            and not isinstance(t.exception(), GatewayError):
        logger.error("gateway task failed: %r", t.exception(), exc_info=t.exception())
