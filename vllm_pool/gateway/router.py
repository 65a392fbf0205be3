"""Model name -> serving replicas on the gateway's pools, attaching on demand.

Everything here runs on the gateway's event loop; only the pools' calls (refresh, attach,
wake, detach) run in threads. So the bookkeeping below needs no lock: between two awaits
nothing else touches it.

Rules:
- single flight: one bring-up task per model at a time; every request waiting for a model
  without an instance awaits the same task, so N concurrent requests for a cold model cause
  one attach; a replica more is brought up the same way, one at a time;
- a request goes to the model's serving replica with the fewest in flight
  (`replicas.pick`); when waiting plus in-flight requests exceed `target_in_flight` per
  replica, one more replica is brought up (up to `replicas.max`), on free workers or in
  place of idle evictable instances, but never on the last free devices of a model that
  has requests waiting and no instance (`replicas.may_take`);
- where a new instance goes, over several pools: `pools.placement_order` (wake where
  parked; free workers that ran the model or its architecture; free workers; evict);
- waiting requests are bounded (`max_queue`, over all models) and time out
  (`queue_timeout`);
- when the devices are full, the least recently used *idle* replica (no request in flight,
  none waiting for its model) is evicted; one with requests in flight never is. Several
  models contending for a device are served group by group, with a bound (`queue.py`);
  where the pool packs models by GPU memory (several per GPU), the pool places the attach
  and the gateway evicts only when the pool answered 409 for lack of room, then retries;
- a replica idle for its entry's `ttl` is removed by the reaper, never below `replicas.min`;
- the pools are the source of truth: an instance named like an entry (or one of its
  replica names, `<name>.r2` ...) is that entry's, so a gateway that finds instances already
  running adopts them instead of attaching twice; a pool that stops answering is routed
  around, and what it runs is adopted again when it answers.

Why about 750 lines: the policies are pure modules already (replicas.py, queue.py,
pools.py); what stays here is their one shared bookkeeping (models, replicas, the waiting
and blocked requests) and the event-loop tasks that change it (request admission,
bring-up, wake, eviction, the reaper, adoption). Split by task, each part would read and
write the others' records between awaits, which is what the single loop keeps safe.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vllm_pool.daemon.errors import AttachError
from vllm_pool.gateway import queue, replicas
from vllm_pool.gateway.metrics import GatewayMetrics
from vllm_pool.gateway.models_file import ModelEntry
from vllm_pool.gateway.pools import Candidate, PoolMember, PoolSet, Tier, placement_order, tier_of
from vllm_pool.gateway.replicas import Replica, ReplicaState
from vllm_pool.states import InstanceState

logger = logging.getLogger("vllm_pool.gateway")

_IN_FLUX = (InstanceState.ATTACHING, InstanceState.WAKING, InstanceState.PARKING,
            InstanceState.DETACHING)


class ModelState(str, enum.Enum):
    COLD = "cold"            # no instance
    ATTACHING = "attaching"  # a first instance is being brought up (room, then attach)
    SERVING = "serving"      # has a serving replica
    EVICTING = "evicting"    # its last instances are being detached (LRU or TTL)


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
    replicas: list[Replica] = field(default_factory=list)
    waiting: int = 0
    waits: list[float] = field(default_factory=list)  # arrival of each waiting request
    last_used: float = field(default_factory=time.monotonic)
    bring_up: asyncio.Task | None = None
    attaching: bool = False                     # a first instance is being brought up
    pending: tuple[str, str] | None = None      # (pool, instance name) attaching or waking
    evicting: set = field(default_factory=set)  # detach tasks in progress
    scale_retry_at: float = 0.0
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    @property
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.serving]

    @property
    def instance(self) -> Any:
        """The first serving replica's instance (None without one)."""
        live = self.live
        return live[0].instance if live else None

    @property
    def oldest_wait(self) -> float | None:
        return min(self.waits, default=None)


@dataclass
class Lease:
    """One request's hold on a replica (give it back with `Router.release`)."""

    model: Model
    replica: Replica

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def instance(self) -> Any:
        return self.replica.instance


@dataclass
class _Plan:
    kind: str                     # attach | wake | evict | cleanup | wait
    member: PoolMember | None = None
    devices: list[str] | None = None
    name: str | None = None
    inst: Any = None
    victim: tuple[Model, Replica] | None = None


class Router:
    def __init__(self, pools, entries: list[ModelEntry], metrics: GatewayMetrics,
                 max_queue: int = 1024, queue_timeout: float = 600.0,
                 attach_timeout: float = 900.0, reap_interval: float = 1.0,
                 policy: queue.GroupPolicy | None = None):
        if not isinstance(pools, PoolSet):  # one pool view: the single-pool gateway
            pools = PoolSet({getattr(pools, "url", "local"): pools})
        self.pools = pools
        self.metrics = metrics
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.attach_timeout = attach_timeout
        self.reap_interval = reap_interval
        self.policy = policy or queue.GroupPolicy()
        self.models: dict[str, Model] = {e.name: Model(e) for e in entries}
        self._by_name = {n: self.models[e.name] for e in entries for n in e.names}
        self.blocked: dict[str, float] = {}  # models waiting for room -> since
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        for m in self.models.values():
            self._sync_state(m)

    @property
    def pool(self) -> PoolSet:
        """What /health reads (`down_reason`)."""
        return self.pools

    # ---- life ------------------------------------------------------------------------
    async def start(self) -> None:
        self._changed = asyncio.Event()  # bound to the running loop
        self._after_refresh()
        self._spawn(self._reaper())
        for m in self.models.values():
            if (m.entry.preload or m.entry.replicas.min) and not m.live:
                m.bring_up = self._spawn(self._bring_up(
                    m, "preload" if m.entry.preload else "min"))

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

    async def acquire(self, name: str) -> Lease:
        """A serving replica of the named model with one more request in flight on it
        (give it back with `release`). Attaches the model if it has no instance."""
        m = self.resolve(name)
        lease = self._try_enter(m)
        if lease is not None:
            return lease
        if sum(x.waiting for x in self.models.values()) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting for their "
                            "models; retry later")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        arrival = time.monotonic()
        m.waits.append(arrival)
        m.waiting += 1
        self.metrics.queue_depth.labels(m.name).set(m.waiting)
        try:
            while True:
                lease = self._try_enter(m)
                if lease is not None:
                    return lease
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    if not m.live:
                        if m.bring_up is None or m.bring_up.done():
                            m.bring_up = self._spawn(self._bring_up(m, "cold"))
                        # shield: one waiter timing out must not cancel the others' attach.
                        await asyncio.wait_for(asyncio.shield(m.bring_up), remaining)
                    else:  # its replicas had their turn (queue.py): wait for the next one
                        await self._wait_change(min(remaining, 1.0))
                except asyncio.TimeoutError:
                    raise QueueTimeout(f"model `{m.name}` was not ready after "
                                       f"{self.queue_timeout:.0f}s "
                                       f"({m.state.value}); retry later") from None
        finally:
            m.waits.remove(arrival)
            m.waiting -= 1
            self.metrics.queue_depth.labels(m.name).set(m.waiting)

    def _try_enter(self, m: Model) -> Lease | None:
        self._prune(m)
        now = time.monotonic()
        open_ = [r for r in m.live
                 if queue.admits(r.since, self._contended_since(m, r), now, self.policy)]
        r = replicas.pick(open_)
        if r is None:
            return None
        r.in_flight += 1
        r.last_used = m.last_used = now
        self.metrics.in_flight.labels(m.name).set(m.in_flight)
        self._maybe_scale(m)
        return Lease(m, r)

    def release(self, lease: Lease) -> None:
        m, r = lease.model, lease.replica
        r.in_flight -= 1
        r.last_used = m.last_used = time.monotonic()
        self.metrics.in_flight.labels(m.name).set(m.in_flight)
        if r.in_flight == 0:
            self._notify()

    def unreachable(self, lease: Lease) -> None:
        """The replica's engine refused a connection: route around it now. Its pool's next
        snapshot says whether it serves (adopted again) or not (its pool is down, or it is
        gone)."""
        m, r = lease.model, lease.replica
        if r in m.replicas and r.serving:
            logger.warning("replica %s of %s on %s refused a connection; routed around",
                           r.instance.name, m.name, r.pool)
            m.replicas.remove(r)
            self._signal_lost(r)
            self.metrics.scale_downs.labels(m.name, "unreachable").inc()
            self._sync_state(m)

    async def lost(self, lease: Lease) -> bool:
        """Whether the lease's replica is lost (asks its pool now: an engine that answered
        with an aborted request may have been stopped with its pool)."""
        member = self.pools.get(lease.replica.pool)
        if member is not None:
            await asyncio.to_thread(member.view.refresh)
        self._prune(lease.model)
        return lease.replica not in lease.model.replicas

    def _maybe_scale(self, m: Model) -> None:
        e = m.entry
        if e.replicas.max <= 1 or time.monotonic() < m.scale_retry_at:
            return
        starting = m.bring_up is not None and not m.bring_up.done()
        if replicas.wants_more(m.waiting, m.in_flight, len(m.live), starting,
                               e.target_in_flight, e.replicas.max):
            m.bring_up = self._spawn(self._bring_up(m, "load"))

    # ---- the pools' view: prune, adopt -----------------------------------------------
    def _usable(self, r: Replica) -> str | None:
        """Why the replica cannot take requests (None: it can)."""
        member = self.pools.get(r.pool)
        if member is None:
            return "pool_removed"
        if not member.up:
            return "pool_down"
        if not member.view.serving(r.instance):
            return "gone"
        return None

    def _prune(self, m: Model) -> None:
        """Forget replicas whose engine died, that were detached behind the gateway's
        back, or whose pool does not answer (their in-flight requests get 502)."""
        for r in list(m.replicas):
            if not r.serving:
                continue
            why = self._usable(r)
            if why is None:
                continue
            logger.warning("replica %s of %s on %s is out (%s); routed around", r.instance.name,
                           m.name, r.pool, why)
            m.replicas.remove(r)
            self._signal_lost(r)
            self.metrics.scale_downs.labels(m.name, why).inc()
            self._sync_state(m)

    def lost_signal(self, lease: Lease) -> asyncio.Future:
        """Done when the lease's replica is lost (its pool down, its engine gone): the
        requests in flight on it are then answered 502 rather than left hanging."""
        r = lease.replica
        if r.lost is None:
            r.lost = asyncio.get_running_loop().create_future()
            if r not in lease.model.replicas:
                r.lost.set_result(None)
        return r.lost

    def _signal_lost(self, r: Replica) -> None:
        if r.lost is not None and not r.lost.done():
            r.lost.set_result(None)

    def _adopt(self, m: Model) -> None:
        """Take as replicas the serving instances named like the entry on every pool that
        answers (a gateway that restarted, a pool that answers again), up to `max`."""
        known = {r.key for r in m.replicas}
        for member in self.pools.up():
            for n in m.entry.replica_names():
                if len(m.live) >= m.entry.replicas.max:
                    return
                inst = member.view.find(n)
                if inst is None or inst.state != InstanceState.SERVING \
                        or (member.key, inst.id) in known:
                    continue
                logger.info("model %s: using the running instance %s on %s", m.name,
                            inst.id, member.key)
                m.replicas.append(Replica(member.key, inst))
                member.note_ran(m.entry.model)
                known.add((member.key, inst.id))
                self._sync_state(m)

    def _after_refresh(self) -> None:
        for m in self.models.values():
            self._prune(m)
            self._adopt(m)
            self._sync_state(m)
        for member in self.pools.members.values():
            self.metrics.pool_up.labels(member.key).set(1 if member.up else 0)

    async def _refresh(self) -> None:
        await asyncio.to_thread(self.pools.refresh)
        self._after_refresh()

    # ---- bring-up: where, then one attach ----------------------------------------------
    async def _bring_up(self, m: Model, reason: str) -> None:
        """Bring up one instance of the model. `reason`: cold (requests wait and it has
        none; waits for room while they do), load (one replica more; gives up when there
        is no room), preload or min (no request needed; waits for room)."""
        if m.evicting:
            await asyncio.shield(asyncio.gather(*m.evicting, return_exceptions=True))
        try:
            while True:
                await self._refresh()
                if m.live and reason in ("cold", "preload"):
                    return  # adopted
                if reason == "min" and len(m.live) >= m.entry.replicas.min:
                    return
                if not m.live and m.waiting:
                    reason = "cold"  # its replicas went away meanwhile
                if reason == "load" and not replicas.wants_more(
                        m.waiting, m.in_flight, len(m.live), False,
                        m.entry.target_in_flight, m.entry.replicas.max):
                    return
                if reason == "cold" and m.waiting == 0:
                    return  # everyone waiting gave up
                if not m.live:
                    m.attaching = True
                    self._sync_state(m)
                plan = self._place(m, urgent=reason == "cold")
                if plan.kind == "wait":
                    if reason == "load":
                        m.scale_retry_at = time.monotonic() + 1.0
                        return
                    if reason == "cold":
                        self.blocked[m.name] = m.oldest_wait or time.monotonic()
                    await self._wait_change(0.5)
                    continue
                if plan.kind == "cleanup":
                    await asyncio.to_thread(self._detach_quietly, plan.member.view, plan.inst)
                    continue
                if plan.kind == "evict":
                    if reason == "cold":
                        self.blocked[m.name] = m.oldest_wait or time.monotonic()
                    await self._evict(*plan.victim, "lru")
                    continue
                if plan.kind == "wake":
                    if await self._wake(m, plan.member, plan.inst, reason):
                        return
                    if reason == "cold":  # it waits for room like any other
                        self.blocked[m.name] = m.oldest_wait or time.monotonic()
                    continue
                if await self._attach(m, plan, reason):
                    return
        finally:
            self.blocked.pop(m.name, None)
            m.attaching = False
            m.pending = None
            self._sync_state(m)
            self._notify()

    async def _attach(self, m: Model, plan: _Plan, reason: str) -> bool:
        """One attach on the plan's pool; False to look again (room taken, pool down)."""
        member = plan.member
        m.pending = (member.key, plan.name)
        try:
            inst = await asyncio.to_thread(member.view.attach, m.entry, plan.devices,
                                           self.attach_timeout, plan.name)
        except AttachError as e:
            if e.status == 409 and member.view.packs() and ("no room" in str(e)
                                                            or "free workers" in str(e)):
                # Eviction frees memory: one model at a time, until it fits.
                victims = self._victims(m, member, urgent=reason == "cold")
                if victims:
                    await self._evict(*victims[0], "lru")
                elif reason == "load":
                    m.scale_retry_at = time.monotonic() + 1.0
                    return True
                else:
                    await self._wait_change(1.0)
                return False
            if e.status == 409:
                # Room (or the name) taken meanwhile: look again.
                await self._wait_change(0.25)
                return False
            await self._refresh()
            if e.status == 503 and not member.up:
                logger.warning("pool %s went down during an attach of %s; placing it "
                               "elsewhere", member.key, m.name)
                return False
            self.metrics.attaches.labels(m.name, "failed").inc()
            m.last_error = str(e)
            if reason != "cold":
                logger.warning("attach of a replica of %s on %s failed: %s", m.name,
                               member.key, e)
                m.scale_retry_at = time.monotonic() + 5.0
                return True
            raise AttachFailed(f"attach of model `{m.name}` failed: {e}") from None
        finally:
            m.pending = None
        self.metrics.attaches.labels(m.name, "ok").inc()
        for phase, secs in inst.phases.items():
            self.metrics.attach_phase.labels(phase).observe(secs)
        self._add_replica(m, member, inst, reason)
        logger.info("model %s: replica %s attached on %s (%s) in %.2fs", m.name, inst.name,
                    member.key, reason, inst.phases.get("total", 0.0))
        return True

    def _add_replica(self, m: Model, member: PoolMember, inst, reason: str) -> None:
        member.note_ran(m.entry.model)
        m.last_error = None
        m.last_used = time.monotonic()
        if (member.key, inst.id) not in {r.key for r in m.replicas}:
            m.replicas.append(Replica(member.key, inst))
        self.metrics.scale_ups.labels(m.name, reason).inc()
        self._sync_state(m)

    def _place(self, m: Model, urgent: bool) -> _Plan:
        """Where the model's next instance goes (pools.py's order), or what to do first."""
        e = m.entry
        starving = sum(o.entry.tp for o in self.models.values()
                       if o is not m and o.waiting and not o.live)
        free_total = sum(len(self._devices_free(mem)) for mem in self.pools.up())
        others_blocked = any(n != m.name for n in self.blocked)
        cands: list[Candidate] = []
        by_key: dict[str, _Plan] = {}
        for member in self.pools.up():
            view = member.view
            present = {n: i for n in e.replica_names() if (i := view.find(n)) is not None}
            known = {r.key for r in m.replicas}
            untracked = [i for i in present.values() if (member.key, i.id) not in known]
            if any(i.state in _IN_FLUX for i in untracked):
                return _Plan("wait")  # an attach or wake of it runs already (another gateway)
            failed = [i for i in untracked if i.state == InstanceState.FAILED]
            if failed:
                return _Plan("cleanup", member, inst=failed[0])
            parked = [i for i in untracked if i.state == InstanceState.PARKED]
            free_name = next((n for n in e.replica_names() if n not in present), None)
            if not parked and free_name is None:
                continue  # every replica name is in use on this pool
            packs = view.packs()
            devices = (list(e.devices or []) or None) if packs else self._devices_for(member, e)
            has_room = packs or devices is not None
            if has_room and not urgent and m.live and not parked and not packs \
                    and not replicas.may_take(free_total - e.tp, starving):
                has_room = False  # the last free devices are a starving model's
            victims = [] if has_room or parked else self._victims(m, member, urgent)
            if victims and not urgent and (starving or others_blocked):
                victims = []  # a replica more never evicts while others wait for room
            ran_model, ran_arch = member.has_run(e.model)
            tier = tier_of(bool(parked), has_room, ran_model, ran_arch, bool(victims))
            if tier is None:
                continue
            here = sum(1 for r in m.live if r.pool == member.key)
            cands.append(Candidate(member.key, member.index, tier, here))
            if tier == Tier.WAKE:
                by_key[member.key] = _Plan("wake", member, inst=parked[0])
            elif tier == Tier.EVICT:
                by_key[member.key] = _Plan("evict", member, victim=victims[0])
            else:
                by_key[member.key] = _Plan("attach", member, devices, free_name)
        order = placement_order(cands)
        return by_key[order[0].pool] if order else _Plan("wait")

    def _devices_free(self, member: PoolMember) -> list[str]:
        devices, ok = member.view.workers()
        return list(dict.fromkeys(devices[s] for s in sorted(ok)))

    def _devices_for(self, member: PoolMember, e: ModelEntry) -> list[str] | None:
        """Free devices of the pool for the entry, or None while there is no room. An
        unpinned entry takes devices no entry is pinned to first, so it does not sit on a
        pinned model's device and starve it while it serves."""
        devices, ok = member.view.workers()
        if e.devices:
            free_devs = {devices[s] for s in ok}
            return list(e.devices) if all(d in free_devs for d in e.devices) else None
        pinned = {d for m in self.models.values() for d in (m.entry.devices or ())}
        free: list[str] = []
        for s in sorted(ok, key=lambda s: (devices[s] in pinned, s)):
            if devices[s] not in free:  # one rank per device
                free.append(devices[s])
        return free[:e.tp] if len(free) >= e.tp else None

    # ---- who gives way: the grouped queue ----------------------------------------------
    def _helps(self, m: Model, r: Replica) -> bool:
        """Evicting `r` frees devices `m` can use (any, or one `m` is pinned to)."""
        return self._helps_on(m, r.instance.devices)

    @staticmethod
    def _helps_on(m: Model, devices) -> bool:
        return not m.entry.devices or bool(set(devices) & set(m.entry.devices))

    def _contended_since(self, owner: Model, r: Replica) -> float | None:
        """Since when another model has waited for the device(s) of `r` (None: no one)."""
        since = [t for n, t in self.blocked.items()
                 if n != owner.name and self._helps(self.models[n], r)]
        return min(since, default=None)

    def _next_on(self, m: Model, devices, holder: Model | None = None) -> bool:
        """No model that waited longer for room on `devices` is still waiting (the
        `holder` of them aside): `m` may take them. (A holder whose turn is over is evicted
        for the model that waited longest; its own waiting requests must not take the
        device back before that model came.)"""
        ahead = {n: t for n, t in self.blocked.items() if n not in (m.name, holder and
                 holder.name) and self._helps_on(self.models[n], devices)}
        ahead[m.name] = self.blocked.get(m.name, m.oldest_wait or time.monotonic())
        return queue.first_in_line(ahead) == m.name

    def _victims(self, m: Model, member: PoolMember, urgent: bool) -> list[tuple[Model, Replica]]:
        """Replicas on the pool that may be evicted for `m`, least recently used first: no
        request in flight, lingered or out of turn (queue.py), never below an entry's
        `min`, and (for requests that wait) no model waiting longer is helped by it."""
        now = time.monotonic()
        out: list[tuple[Model, Replica]] = []
        for v in self.models.values():
            if v is m:
                continue
            live = v.live
            if len(live) <= v.entry.replicas.min:
                continue
            for r in live:
                if r.pool != member.key or not self._helps(m, r):
                    continue
                if not queue.may_evict(r.in_flight, v.waiting, r.last_used, r.since,
                                       self._contended_since(v, r), now, self.policy):
                    continue
                if urgent and not self._next_on(m, r.instance.devices, holder=v):
                    continue
                out.append((v, r))
        return sorted(out, key=lambda vr: vr[1].last_used)

    # ---- wake and evict ------------------------------------------------------------------
    async def _wake(self, m: Model, member: PoolMember, inst, reason: str) -> bool:
        """Wake the model's parked instance on its own pool; returns False to look again
        later. Room is made by the gateway's own rule (never a replica with requests in
        flight or waiting): an instance packed with a share asks the pool to wake it
        without evicting and, on 409 for room, evicts the least recently used replica on
        its devices, one at a time; otherwise every replica on its devices goes first."""
        packed = member.view.packs() and inst.gpu_memory_utilization is not None
        if reason == "cold" and not self._next_on(m, list(inst.devices)):
            await self._wait_change(1.0)  # a model that waited longer goes first
            return False
        if not packed:
            occupants = [(v, r) for v in self.models.values() if v is not m for r in v.live
                         if r.pool == member.key
                         and set(r.instance.devices) & set(inst.devices)]
            now = time.monotonic()
            # The grouped queue's rule, as for any eviction: the occupant drains and has
            # lingered, or its turn is over (queue.may_evict).
            if not all(queue.may_evict(r.in_flight, v.waiting, r.last_used, r.since,
                                       self._contended_since(v, r), now, self.policy)
                       for v, r in occupants):
                await self._wait_change(1.0)
                return False
            for v, r in occupants:
                await self._evict(v, r, "wake")
        m.pending = (member.key, inst.name)
        try:
            inst = await asyncio.to_thread(member.view.wake, inst, m.entry, self.attach_timeout,
                                           not packed)
        except AttachError as e:
            if e.status == 409 and packed and "no room to wake" in str(e):
                victims = [(v, r) for v, r in self._victims(m, member, reason == "cold")
                           if set(r.instance.devices) & set(inst.devices)]
                if victims:
                    await self._evict(*victims[0], "wake")
                else:
                    await self._wait_change(1.0)
                return False
            if e.status == 409:  # parked or woken elsewhere meanwhile
                await self._wait_change(0.25)
                return False
            self.metrics.attaches.labels(m.name, "failed").inc()
            m.last_error = str(e)
            raise AttachFailed(f"wake of model `{m.name}` failed: {e}") from None
        finally:
            m.pending = None
        self.metrics.attaches.labels(m.name, "woken").inc()
        for phase in ("evict", "wake", "wake_total"):
            if phase in inst.phases:
                self.metrics.attach_phase.labels(phase).observe(inst.phases[phase])
        self._add_replica(m, member, inst, reason)
        logger.info("model %s woken on %s in %.2fs", m.name, member.key,
                    inst.phases.get("wake_total", 0.0))
        return True

    def evict(self, view, instance, park: bool) -> None:
        """Free an instance's devices: park it (the next request wakes it), or detach it."""
        self._detach_quietly(view, instance, park=park)

    def _detach_quietly(self, view, instance, park: bool = False) -> None:
        try:
            view.detach(instance.id, park=park)
        except KeyError:
            pass  # already gone
        except AttachError as e:
            logger.warning("detach of %s: %s", instance.name, e)

    async def _evict(self, m: Model, r: Replica, reason: str) -> None:
        member = self.pools.get(r.pool)
        if not r.serving or member is None or r.in_flight:
            return  # a request came in since it was picked (the reaper's task runs later)
        r.state = ReplicaState.EVICTING
        # The model's last instance parks where the pool parks; a replica more is detached.
        park = member.view.parking and not any(x.serving for x in m.replicas)
        self._sync_state(m)
        logger.info("evicting %s of %s on %s (%s, idle %.1fs)", r.instance.name, m.name,
                    r.pool, reason, time.monotonic() - r.last_used)
        task = self._spawn(asyncio.to_thread(self.evict, member.view, r.instance, park))
        m.evicting.add(task)
        try:
            await asyncio.shield(task)
        finally:
            m.evicting.discard(task)
            if r in m.replicas:
                m.replicas.remove(r)
            self.metrics.evictions.labels(m.name, reason).inc()
            self.metrics.scale_downs.labels(m.name, reason).inc()
            self._sync_state(m)
            self._notify()

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await self._refresh()
            now = time.monotonic()
            for m in list(self.models.values()):
                if m.waiting:
                    continue
                for r in replicas.to_remove(m.replicas, m.entry.replicas.min,
                                            m.entry.idle_ttl, now):
                    self._spawn(self._evict(m, r, "ttl"))
                if len(m.live) < m.entry.replicas.min and \
                        (m.bring_up is None or m.bring_up.done()):
                    m.bring_up = self._spawn(self._bring_up(m, "min"))

    # ---- helpers ---------------------------------------------------------------------------
    def attach_phase(self, m: Model) -> str | None:
        """An attaching model's phase, as its pool shows the instance; "wake" while its
        parked instance wakes."""
        if m.state != ModelState.ATTACHING or m.pending is None:
            return None
        member = self.pools.get(m.pending[0])
        inst = member.view.find(m.pending[1]) if member else None
        if inst is None:
            return None
        if inst.state == InstanceState.WAKING:
            return "wake"
        return inst.phase if inst.state == InstanceState.ATTACHING else None

    def _sync_state(self, m: Model) -> None:
        if m.live:
            state = ModelState.SERVING
        elif m.attaching:
            state = ModelState.ATTACHING
        elif m.replicas:
            state = ModelState.EVICTING
        else:
            state = ModelState.COLD
        m.state = state
        for s in ModelState:
            self.metrics.model_state.labels(m.name, s.value).set(1 if s == state else 0)
        self.metrics.replicas.labels(m.name).set(len(m.live))

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
