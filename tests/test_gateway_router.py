"""gateway/router.py's scale-out logic over in-memory pools (no engine: the end-to-end run is
test_scale.py). A `FakePool` keeps the PoolView contract the router relies on: names unique
per pool, a 409 when no worker is free, instances that serve until detached, a pool that
can stop answering. What is tested is the router's own policy: replicas, placement over
pools, pools going down and coming back, the grouped queue."""

from __future__ import annotations

import asyncio
import itertools
import time
import types

import pytest

from vllm_pool.daemon.errors import AttachError
from vllm_pool.gateway.metrics import GatewayMetrics
from vllm_pool.gateway.models_file import parse
from vllm_pool.gateway.pools import PoolSet
from vllm_pool.gateway.queue import GroupPolicy
from vllm_pool.gateway.router import Router
from vllm_pool.states import InstanceState

_ids = itertools.count(1)


class FakePool:
    parking = False

    def __init__(self, key: str, devices: list[str], attach_s: float = 0.02):
        self.url = key
        self.devices = devices
        self.attach_s = attach_s
        self.instances: dict[str, types.SimpleNamespace] = {}
        self.down = False
        self.attaches: list[str] = []  # names, in order

    @property
    def down_reason(self):
        return "down" if self.down else None

    def refresh(self):
        pass

    def find(self, name):
        return next((i for i in self.instances.values() if i.name == name), None)

    def serving(self, inst):
        cur = self.instances.get(inst.id)
        return cur is not None and cur.state == InstanceState.SERVING

    def _used(self):
        return {d for i in self.instances.values() if i.state != InstanceState.PARKED
                for d in i.devices}

    def attach(self, entry, devices, timeout, name=None):
        time.sleep(self.attach_s)
        if self.down:
            raise AttachError("the pool does not answer", 503)
        name = name or entry.name
        if self.find(name):
            raise AttachError(f"name {name} taken", 409)
        free = [d for d in self.devices if d not in self._used()]
        devices = devices or free[:entry.tp]
        if len(devices) < entry.tp or set(devices) - set(free):
            raise AttachError("not enough free workers", 409)
        inst = types.SimpleNamespace(id=f"i{next(_ids)}", name=name, state=InstanceState.SERVING,
                                     url="http://x", devices=list(devices), phases={},
                                     phase=None, model=entry.model)
        self.instances[inst.id] = inst
        self.attaches.append(name)
        return inst

    def wake(self, inst, entry, timeout, evict=True):
        inst.state = InstanceState.SERVING
        return inst

    def detach(self, instance_id, park):
        inst = self.instances.get(instance_id)
        if inst is None:
            raise KeyError(instance_id)
        if park:
            inst.state = InstanceState.PARKED
        else:
            del self.instances[instance_id]

    def workers(self):
        by_slot = dict(enumerate(self.devices))
        used = self._used()
        return by_slot, {s for s, d in by_slot.items() if d not in used}

    def packs(self):
        return False


class PackingFakePool(FakePool):
    """A pool that packs by memory: `shares` models of 0.3 serve at once on its one GPU;
    a wake with evict=False is refused with the pool's 409 when its share does not fit."""

    parking = True

    def __init__(self, key: str, shares: int):
        super().__init__(key, ["cuda:0"])
        self.shares = shares
        self.wakes: list[bool] = []  # evict, per call

    def _full(self) -> bool:
        return sum(i.state == InstanceState.SERVING for i in self.instances.values()) \
            >= self.shares

    def attach(self, entry, devices, timeout, name=None):
        if self._full():
            raise AttachError("no room: needs 43132 MiB", 409)
        inst = types.SimpleNamespace(id=f"i{next(_ids)}", name=name or entry.name,
                                     state=InstanceState.SERVING, url="http://x",
                                     devices=["cuda:0"], phases={}, phase=None,
                                     model=entry.model, gpu_memory_utilization=0.3)
        self.instances[inst.id] = inst
        self.attaches.append(inst.name)
        return inst

    def wake(self, inst, entry, timeout, evict=True):
        self.wakes.append(evict)
        if not evict and self._full():
            raise AttachError(f"no room to wake {inst.name} on ['cuda:0']", 409)
        return super().wake(inst, entry, timeout)

    def packs(self):
        return True


def _router(pools: list[FakePool], models_yaml: str, **kw) -> Router:
    ps = PoolSet({p.url: p for p in pools})
    return Router(ps, parse(models_yaml), GatewayMetrics(), reap_interval=0.02, **kw)


def _metric(r: Router, name: str, **labels) -> float:
    v = r.metrics.registry.get_sample_value(name, labels)
    return v or 0.0


async def _until(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_burst_brings_replicas_up_on_other_pools_one_at_a_time_and_ttl_removes_them():
    a, b, c = (FakePool(k, ["cpu:0"]) for k in ("http://a", "http://b", "http://c"))

    async def main():
        r = _router([a, b, c], "models:\n  - name: m\n    model: /m\n    ttl: 0.3\n"
                               "    replicas: {max: 2}\n    target_in_flight: 1\n")
        await r.start()
        try:
            leases = await asyncio.gather(*(r.acquire("m") for _ in range(4)))
            m = r.models["m"]
            await _until(lambda: len(m.live) == 2)
            await asyncio.sleep(0.1)  # more load: still at most max
            assert len(m.live) == 2 and len(a.attaches + b.attaches + c.attaches) == 2
            assert {x.pool for x in m.live} == {"http://a", "http://b"}  # pool order, spread
            assert _metric(r, "vllm_pool_gateway_scale_ups_total", model="m", reason="cold") == 1
            assert _metric(r, "vllm_pool_gateway_scale_ups_total", model="m", reason="load") == 1
            # Fewest in flight: the new replica takes the next requests.
            more = [await r.acquire("m") for _ in range(3)]
            assert [x.replica.pool for x in more] == ["http://b"] * 3
            for x in leases + more:
                r.release(x)
            await _until(lambda: not m.live)
            assert _metric(r, "vllm_pool_gateway_scale_downs_total", model="m",
                           reason="ttl") == 2
            assert not a.instances and not b.instances
        finally:
            await r.stop()

    asyncio.run(main())


def test_min_replicas_kept_and_restarted_gateway_adopts_without_attaching():
    a, b = FakePool("http://a", ["cpu:0"]), FakePool("http://b", ["cpu:0"])
    yaml = ("models:\n  - name: m\n    model: /m\n    ttl: 0.1\n"
            "    replicas: {min: 2, max: 2}\n")

    async def main():
        r = _router([a, b], yaml)
        await r.start()
        await _until(lambda: len(r.models["m"].live) == 2)
        await asyncio.sleep(0.3)  # beyond ttl: min stays
        assert len(r.models["m"].live) == 2
        await r.stop()
        # A new gateway on the same pools adopts both, attaching nothing.
        r2 = _router([a, b], yaml)
        await r2.start()
        try:
            assert len(r2.models["m"].live) == 2
            await asyncio.sleep(0.1)
            assert a.attaches == ["m"] and b.attaches == ["m"]
        finally:
            await r2.stop()

    asyncio.run(main())


def test_pool_down_is_routed_around_and_readopted_when_back():
    a, b = FakePool("http://a", ["cpu:0"]), FakePool("http://b", ["cpu:0"])

    async def main():
        r = _router([a, b], "models:\n  - name: m\n    model: /m\n"
                            "    replicas: {min: 2, max: 2}\n")
        await r.start()
        try:
            m = r.models["m"]
            await _until(lambda: len(m.live) == 2)
            b.down = True
            await _until(lambda: len(m.live) == 1)
            assert _metric(r, "vllm_pool_gateway_scale_downs_total", model="m",
                           reason="pool_down") == 1
            x = await r.acquire("m")
            assert x.replica.pool == "http://a"
            r.release(x)
            b.down = False  # it answers again, its instance still serving: adopted
            await _until(lambda: len(m.live) == 2)
            assert b.attaches == ["m"] and a.attaches == ["m"]
        finally:
            await r.stop()

    asyncio.run(main())


def test_lost_pool_replaced_elsewhere_for_waiting_requests():
    a, b = FakePool("http://a", ["cpu:0"]), FakePool("http://b", ["cpu:0"])

    async def main():
        r = _router([a, b], "models:\n  - name: m\n    model: /m\n")
        await r.start()
        try:
            x = await r.acquire("m")
            assert x.replica.pool == "http://a"
            r.release(x)
            a.down = True
            y = await r.acquire("m")  # a is down: attached on b
            assert y.replica.pool == "http://b" and b.attaches == ["m"]
            r.release(y)
        finally:
            await r.stop()

    asyncio.run(main())


def test_parked_model_woken_on_its_pool_not_attached_elsewhere():
    a, b = FakePool("http://a", ["cpu:0"]), FakePool("http://b", ["cpu:0"])
    a.parking = True

    async def main():
        r = _router([a, b], "models:\n  - name: m\n    model: /m\n    ttl: 0.1\n")
        await r.start()
        try:
            x = await r.acquire("m")
            r.release(x)
            await _until(lambda: a.find("m").state == InstanceState.PARKED)
            y = await r.acquire("m")
            assert y.replica.pool == "http://a" and b.attaches == [] and a.attaches == ["m"]
            assert _metric(r, "vllm_pool_gateway_attaches_total", model="m",
                           outcome="woken") == 1
            r.release(y)
        finally:
            await r.stop()

    asyncio.run(main())


def test_replica_never_takes_last_free_devices_from_a_starving_model():
    a, b = FakePool("http://a", ["cpu:0"]), FakePool("http://b", ["cpu:0"])

    async def main():
        r = _router([a, b], "models:\n  - name: m\n    model: /m\n    replicas: {max: 2}\n"
                            "  - name: s\n    model: /s\n")
        await r.start()
        try:
            x = await r.acquire("m")
            m, s = r.models["m"], r.models["s"]
            s.waiting = 1  # a request of s waits and s has no instance
            assert r._place(m, urgent=False).kind == "wait"
            s.waiting = 0
            plan = r._place(m, urgent=False)
            assert (plan.kind, plan.member.key) == ("attach", "http://b")
            r.release(x)
        finally:
            await r.stop()

    asyncio.run(main())


@pytest.mark.parametrize("grouped", [False, True])
def test_grouped_queue_cuts_swaps_without_starving(grouped):
    """Two closed-loop clients, A and B, on one slot: without grouping every request swaps;
    grouped, each model keeps the slot for its turn, and both still get served."""
    pool = FakePool("http://a", ["cpu:0"], attach_s=0.01)
    policy = GroupPolicy(max_turn_s=0.4, linger_s=0.1) if grouped else \
        GroupPolicy(max_turn_s=1e9, linger_s=0.0)

    async def main():
        r = _router([pool], "models:\n  - name: a\n    model: /a\n"
                            "  - name: b\n    model: /b\n", policy=policy)
        await r.start()
        served = {"a": 0, "b": 0}
        stop = time.monotonic() + 2.0

        async def client(name):
            while time.monotonic() < stop:
                x = await r.acquire(name)
                await asyncio.sleep(0.01)
                r.release(x)
                served[name] += 1
                await asyncio.sleep(0.005)

        try:
            await asyncio.gather(client("a"), client("b"))
        finally:
            await r.stop()
        return served, len(pool.attaches)

    served, swaps = asyncio.run(main())
    assert served["a"] > 0 and served["b"] > 0  # no starvation
    per_request = swaps / (served["a"] + served["b"])
    if grouped:
        assert per_request < 0.25, (served, swaps)
    else:
        assert per_request > 0.5, (served, swaps)


def test_lost_signal_when_pool_goes_down_and_refused_replica_routed_around():
    a, b = FakePool("http://a", ["cpu:0"]), FakePool("http://b", ["cpu:0"])

    async def main():
        r = _router([a, b], "models:\n  - name: m\n    model: /m\n"
                            "    replicas: {min: 2, max: 2}\n")
        await r.start()
        try:
            m = r.models["m"]
            await _until(lambda: len(m.live) == 2)
            x = await r.acquire("m")
            lost = r.lost_signal(x)
            assert not lost.done()
            (a if x.replica.pool == "http://a" else b).down = True
            await asyncio.wait_for(lost, 5)  # the request in flight there is cut (502)
            r.release(x)
            y = await r.acquire("m")
            r.unreachable(y)  # refused: out at once, before any refresh
            assert y.replica not in m.replicas and r.lost_signal(y).done()
            r.release(y)
        finally:
            await r.stop()

    asyncio.run(main())


def test_packed_wake_evicts_only_the_lru_replica_it_needs():
    """On a packing pool with room for two shares, a and b serve and c is parked. c's wake
    asks the pool not to evict; on its 409 the gateway evicts the least recently used
    idle model (a) and wakes c beside b, which keeps serving."""
    p = PackingFakePool("http://p", shares=2)
    yaml = "".join(f"  - name: {n}\n    model: /{n}\n" for n in "abc")

    async def main():
        r = _router([p], "models:\n" + yaml, policy=GroupPolicy(linger_s=0.0))
        await r.start()
        try:
            for n in "cab":  # c first, then parked by hand: a model parked before
                x = await r.acquire(n)
                r.release(x)
                if n == "c":
                    r.evict(p, x.replica.instance, park=True)
                    await _until(lambda: not r.models["c"].live)
            y = await r.acquire("c")
            states = {i.name: i.state for i in p.instances.values()}
            assert states == {"a": InstanceState.PARKED, "b": InstanceState.SERVING,
                              "c": InstanceState.SERVING}, states
            assert p.wakes == [False, False] and p.attaches == ["c", "a", "b"]
            r.release(y)
        finally:
            await r.stop()

    asyncio.run(main())
