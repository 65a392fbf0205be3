"""daemon/park_wake.py's wake on a shared GPU, without processes: fake worker handles read
a simulated device, the engine's wake is a no-op, and a detach (the wake's eviction) frees
the evicted model's share on it. What is checked is which models a wake evicts."""

from __future__ import annotations

import pytest

from tests.test_pool_states import FakeWorker
from vllm_pool import messages
from vllm_pool.daemon import park_wake
from vllm_pool.daemon import pool as pool_mod
from vllm_pool.daemon.instance import PoolConfig
from vllm_pool.states import InstanceState, WorkerState, transition

GIB = 1 << 30
TOTAL = 140 * GIB
CONTEXT = GIB // 2   # what each worker process holds asleep or idle


class GpuWorker(FakeWorker):
    """A fake worker on a simulated GPU: NVML's figures come from `gpu`."""

    gpu: dict = {}

    def spawn(self) -> None:
        super().spawn()
        self.device_uuid, self.memory_source = "GPU-fake", "nvml"

    def alive(self) -> bool:
        return True

    def memory_now(self) -> tuple[int, int, int]:
        own = self.gpu["own"].get(self.slot, CONTEXT)
        return own, TOTAL - sum(self.gpu["own"].values()), TOTAL


@pytest.fixture
def gpu_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_POOL_STRICT_STATES", "1")
    monkeypatch.setattr(pool_mod, "WorkerHandle", GpuWorker)
    monkeypatch.setattr(park_wake.parking, "engine_wake", lambda url, timeout: None)
    monkeypatch.setattr(park_wake, "health_ok", lambda url, timeout=0: True)
    GpuWorker.gpu = {"own": {}}
    p = pool_mod.Pool(PoolConfig(devices=["cuda:0"], visible_devices="0",
                                 run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"),
                                 engine_fork=False, kernel_warmup="off", parking=True))
    p.evicted = []

    def detach(ref, park=None):  # the wake's eviction: park, which frees the share
        inst = p.instances[ref]
        p.evicted.append(inst.name)
        transition(inst, InstanceState.PARKING)
        transition(inst, InstanceState.PARKED)
        for s in inst.slots:
            transition(p.workers[s], WorkerState.PARKED, [WorkerState.SERVING])
            GpuWorker.gpu["own"][s] = CONTEXT
        return inst

    p.detach = detach
    return p


def _serving(p, name: str, share: float | None, last_used: float):
    """An instance serving on a new worker of its own on cuda:0, holding its share."""
    w = p.new_worker("cuda:0")
    w.spawn()
    p._on_event(w, messages.Idle(pid=1))
    with p.lock:
        inst = p.lease(name, name, "m", 1, 1, None, [], {}, [w.slot], "")
    for kind in (messages.Attaching, messages.Serving):
        p._on_event(w, kind(pid=1, instance_id=name))
    transition(inst, InstanceState.SERVING)
    inst.gpu_memory_utilization, inst.last_used = share, last_used
    GpuWorker.gpu["own"][w.slot] = int((share or 0.9) * TOTAL)
    return inst


def _parked(p, name: str, share: float | None, last_used: float):
    inst = _serving(p, name, share, last_used)
    p.evicted.clear()
    p.detach(name, park=True)
    p.evicted.clear()
    return inst


def test_a_packed_wake_evicts_only_until_its_share_fits(gpu_pool):
    """Three 0.3 shares serve; a fourth is parked. Its wake needs one share of room, so
    only the least recently used of the three is evicted, and the others keep serving."""
    p = gpu_pool
    for k, name in enumerate(["a", "b", "c"]):
        _serving(p, name, 0.3, last_used=100 + k)
    p.instances["b"].last_used = 50  # b is the least recently used
    d = _parked(p, "d", 0.3, last_used=10)
    woken = p.wake(d)
    assert woken.state == InstanceState.SERVING
    assert p.evicted == ["b"]
    assert {n for n, i in p.instances.items() if i.state == InstanceState.SERVING} == \
        {"a", "c", "d"}


def test_a_packed_wake_with_room_evicts_nothing(gpu_pool):
    p = gpu_pool
    _serving(p, "a", 0.3, last_used=1)
    d = _parked(p, "d", 0.3, last_used=0)
    assert p.wake(d).state == InstanceState.SERVING
    assert p.evicted == []


def test_an_unpacked_wake_evicts_everything_on_its_device(gpu_pool):
    """Attached without a share (one model per device): its wake takes the device."""
    p = gpu_pool
    _serving(p, "a", None, last_used=1)
    d = _parked(p, "d", None, last_used=0)
    GpuWorker.gpu["own"][p.instances["a"].slots[0]] = GIB  # room enough, but not packed
    assert p.wake(d).state == InstanceState.SERVING
    assert p.evicted == ["a"]


def test_a_packed_wake_that_may_not_evict_is_refused_and_stays_parked(gpu_pool):
    """evict=false (the gateway's call, which evicts by its own rule): 409, nothing
    evicted, the instance parked as before, and a later wake with room succeeds."""
    p = gpu_pool
    for k, name in enumerate(["a", "b", "c"]):
        _serving(p, name, 0.3, last_used=k)
    d = _parked(p, "d", 0.3, last_used=10)
    with pytest.raises(park_wake.AttachError) as e:
        p.wake(d, evict=False)
    assert e.value.status == 409 and "no room to wake d" in str(e.value)
    assert d.state == InstanceState.PARKED and p.evicted == []
    p.detach("a", park=True)
    assert p.wake(d, evict=False).state == InstanceState.SERVING


def test_an_unpacked_wake_that_may_not_evict_is_refused_and_stays_parked(gpu_pool):
    """evict=false means nothing is evicted, packed or not."""
    p = gpu_pool
    _serving(p, "a", None, last_used=1)
    d = _parked(p, "d", None, last_used=0)
    with pytest.raises(park_wake.AttachError) as e:
        p.wake(d, evict=False)
    assert e.value.status == 409 and d.state == InstanceState.PARKED and p.evicted == []


def test_health_says_whether_the_pool_packs(gpu_pool, tmp_path):
    """/health's `packs` is the pool's own placement rule (the gateway reads it, rather than
    repeating the rule): true while every device has NVML's figures, false otherwise."""
    from fastapi.testclient import TestClient

    from vllm_pool.daemon.api import build_app

    for w in list(gpu_pool.workers.values()):
        if w.state == WorkerState.STARTING:  # the pool's own worker: idle
            w.spawn()
            gpu_pool._on_event(w, messages.Idle(pid=1))
    _serving(gpu_pool, "a", 0.3, 1.0)
    client = TestClient(build_app(gpu_pool))
    r = client.get("/health")
    assert r.status_code == 200, r.text
    assert r.json()["packs"] is True
    for w in gpu_pool.workers.values():
        w.device_uuid = None  # no NVML reading for the device: one model per device
    assert client.get("/health").json()["packs"] is False
