"""The pool as the gateway's router sees it: in the daemon's own process, or through the
pool's control API.

The router needs a few things from the pool: the instance of a name, whether an instance
it routes to still serves, attach, wake and detach, which workers are free, and whether
the pool parks. `LocalPool` answers from the daemon's objects (the gateway of `serve
--models`). `RemotePool` answers over HTTP (`vllm-pool gateway --pool URL`), a process of its
own that owns no instance: it can be stopped and started again while the models it
attached keep serving, and the next one adopts them by name. Its view of the pool is a
snapshot, refreshed every second by the router and after each change it makes, so that
routing a request never waits on a call to the pool.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from vllm_pool.api_models import Health, InstanceInfo, PhaseEvent, StartedEvent
from vllm_pool.client import PoolClient, PoolError
from vllm_pool.daemon import allocator, placement
from vllm_pool.daemon.errors import AttachError
from vllm_pool.daemon.pool import Pool
from vllm_pool.gateway.models_file import ModelEntry
from vllm_pool.states import ATTACH_PHASES, InstanceState, WorkerState


class ViewInstance(Protocol):
    """What the router reads of an instance: the daemon's Instance, or an InstanceInfo."""
    id: str
    name: str
    state: InstanceState
    url: str
    devices: list[str]
    phases: dict[str, float]
    phase: str | None           # attaching: the phase in progress


class PoolView(Protocol):
    """What the router needs of a pool (LocalPool and RemotePool are the two)."""
    parking: bool

    @property
    def down_reason(self) -> str | None: ...
    def refresh(self) -> None: ...
    def find(self, name: str) -> ViewInstance | None: ...
    def serving(self, inst: ViewInstance) -> bool: ...
    def attach(self, entry: ModelEntry, devices: list[str] | None, timeout: float,
               name: str | None = None) -> ViewInstance: ...
    def wake(self, inst: ViewInstance, entry: ModelEntry, timeout: float,
             evict: bool = True) -> ViewInstance: ...
    def detach(self, instance_id: str, park: bool) -> None: ...
    def workers(self) -> tuple[dict[int, str], set[int]]: ...
    def packs(self) -> bool: ...


def attach_body(entry: ModelEntry, devices: list[str] | None, timeout: float,
                name: str | None = None) -> dict:
    """The attach an entry stands for, as the control API takes it (POST /instances);
    `name`: one of the entry's replica names (default: the entry's name)."""
    return {"model": entry.model, "tp": entry.tp, "name": name or entry.name,
            "devices": devices,
            "args": entry.attach_args(), "env": dict(entry.env), "timeout_s": timeout}


class LocalPool:
    """The daemon's Pool, called directly (the gateway runs in the daemon)."""

    def __init__(self, pool: Pool):
        self.pool = pool

    @property
    def parking(self) -> bool:
        return self.pool.cfg.parking

    @property
    def down_reason(self) -> str | None:
        return "the pool is stopping" if self.pool.stopping else None

    def refresh(self) -> None:
        pass  # always current

    def find(self, name: str):
        return self.pool.find(name)

    def serving(self, inst) -> bool:
        # A dict read, not pool.find: no wait on the pool's lock per request.
        return inst.state == InstanceState.SERVING and self.pool.instances.get(inst.id) is inst

    def attach(self, entry: ModelEntry, devices: list[str] | None, timeout: float,
               name: str | None = None):
        b = attach_body(entry, devices, timeout, name)
        b["timeout"] = b.pop("timeout_s")
        return self.pool.attach(**b)

    def wake(self, inst, entry: ModelEntry, timeout: float, evict: bool = True):
        return self.pool.wake(inst, timeout, evict)

    def detach(self, instance_id: str, park: bool) -> None:
        self.pool.detach(instance_id, park=park)

    def packs(self) -> bool:
        """The pool places attaches by GPU memory (daemon/packing.py), several per GPU."""
        return placement.packs(self.pool)

    def workers(self) -> tuple[dict[int, str], set[int]]:
        """Every worker's device by slot, and the slots an attach may take now."""
        ws = list(self.pool.workers.values())
        states = self.pool.alloc_states()
        devices = {w.slot: w.device for w in ws}
        return devices, allocator.free_slots({w.slot: states.get(w.slot, w.state) for w in ws},
                                             devices)


class RemotePool:
    """A pool daemon reached through its control API (`vllm-pool gateway --pool URL`)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.client = PoolClient(url, api_key, timeout)
        self.url = self.client.url
        self.reachable = False
        self.parking = False
        self._lock = threading.Lock()
        self._instances: dict[str, InstanceInfo] = {}
        self._devices: dict[int, str] = {}
        self._states: dict[int, WorkerState] = {}
        self._packs = False
        self.last_error: str | None = None

    @property
    def down_reason(self) -> str | None:
        # A stopping pool answers 503, so the last refresh failed too.
        return None if self.reachable else f"the pool does not answer: {self.last_error}"

    def _call(self, fn, *args, **kw):
        """A client call; the pool's refusal or absence as the AttachError the router takes."""
        try:
            return fn(*args, **kw)
        except PoolError as e:
            raise AttachError(str(e), e.status or 503) from None

    def start(self, wait: float) -> None:
        """The pool's settings and a first snapshot, once it is ready (its /health answers
        200 within `wait` seconds: it may be starting too); AttachError otherwise, and the
        gateway does not start."""
        deadline = time.monotonic() + wait
        while True:
            try:
                h = self._call(self.client.health)
                self.parking, self._packs = h.parking, h.packs
                break
            except AttachError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        self.refresh()
        if not self.reachable:
            raise AttachError(f"cannot read the pool's state at {self.url}: "
                              f"{self.last_error}", 503)

    def refresh(self) -> None:
        try:
            insts = self._call(self.client.instances)
            workers = self._call(self.client.workers)
            health = self._settings()
        except AttachError as e:
            self.reachable, self.last_error = False, str(e)
            return
        with self._lock:
            self._instances = {i.id: _not_back(self._instances.get(i.id), i) for i in insts}
            self._devices = {w.slot: w.device for w in workers}
            # As the pool's allocator sees them: a warming worker is not free yet.
            self._states = {w.slot: WorkerState.STARTING if w.state == WorkerState.WARMING
                            else w.state for w in workers}
            if health is not None:  # the pool's own rule, not a copy of it here
                self.parking, self._packs = health.parking, health.packs
        self.reachable, self.last_error = True, None

    def _settings(self) -> Health | None:
        """/health; None while it answers 503 (starting, stopping or respawning a worker):
        the settings stay as last read."""
        try:
            return self.client.health()
        except PoolError as e:
            if e.status == 503:
                return None
            raise AttachError(str(e), e.status or 503) from None

    def _put(self, inst: InstanceInfo) -> InstanceInfo:
        with self._lock:
            self._instances[inst.id] = inst
        return inst

    def packs(self) -> bool:
        return self._packs

    def find(self, name: str) -> InstanceInfo | None:
        with self._lock:
            return next((i for i in self._instances.values() if i.name == name), None)

    def serving(self, inst: InstanceInfo) -> bool:
        cur = self._instances.get(inst.id)
        return cur is not None and cur.state == InstanceState.SERVING

    def attach(self, entry: ModelEntry, devices: list[str] | None, timeout: float,
               name: str | None = None):
        started: list[InstanceInfo] = []

        def on_event(ev) -> None:
            # Streamed, so that the snapshot shows the attach's phase as it goes.
            if isinstance(ev, StartedEvent):
                started.append(self._put(ev.instance))
            elif isinstance(ev, PhaseEvent) and started:
                with self._lock:
                    cur = self._instances.get(started[0].id)
                    if cur is not None and cur.state == InstanceState.ATTACHING:
                        self._instances[cur.id] = cur.model_copy(update={"phase": ev.next})

        inst = self._put(self._call(self.client.attach, attach_body(entry, devices, timeout, name),
                                    timeout=timeout + 60, on_event=on_event))
        self.refresh()  # the workers it took
        return inst

    def wake(self, inst: InstanceInfo, entry: ModelEntry, timeout: float, evict: bool = True):
        woken = self._put(self._call(self.client.wake, inst.id, timeout, evict))
        self.refresh()
        return woken

    def detach(self, instance_id: str, park: bool) -> None:
        try:
            self._call(self.client.detach, instance_id, park)
        except AttachError as e:
            if e.status == 404:
                raise KeyError(instance_id) from None
            raise
        finally:
            self.refresh()

    def workers(self) -> tuple[dict[int, str], set[int]]:
        with self._lock:
            devices, states = dict(self._devices), dict(self._states)
        return devices, allocator.free_slots(states, devices)


def _phase_rank(phase: str | None) -> int:
    return ATTACH_PHASES.index(phase) if phase in ATTACH_PHASES else -1


def _not_back(old: InstanceInfo | None, new: InstanceInfo) -> InstanceInfo:
    """A snapshot read just before the attach stream's last event must not show an
    attaching instance's phase going back."""
    if old is not None and old.state == new.state == InstanceState.ATTACHING \
            and _phase_rank(old.phase) > _phase_rank(new.phase):
        return new.model_copy(update={"phase": old.phase})
    return new
