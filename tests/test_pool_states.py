"""The pool's state machine without processes: a fake worker handle takes the place of
each worker process, the test plays the worker's events, and every change of state goes
through states.transition (strict here: an illegal one raises)."""

from __future__ import annotations

import pytest

from vllm_pool import messages
from vllm_pool.daemon import pool as pool_mod
from vllm_pool.daemon.instance import PoolConfig
from vllm_pool.daemon.workers import WorkerHandle
from vllm_pool.states import (TRANSITIONS, HostState, IllegalTransition, InstanceState,
                              WorkerState, force, transition)

W = WorkerState


class FakeWorker(WorkerHandle):
    """A worker handle with no process: spawns are counted, commands recorded."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent: list[messages.Command] = []
        self.spawns = 0

    def spawn(self) -> None:
        self.spawns += 1
        self.pid = 1000 + self.spawns
        self.phase = "starting"
        if self.state != W.STARTING:
            transition(self, W.STARTING, instance_id=None, error=None)

    def send(self, cmd) -> bool:
        self.sent.append(cmd)
        return True

    def stop(self, timeout: float = 0) -> None:
        transition(self, W.STOPPED)


@pytest.fixture
def make_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_POOL_STRICT_STATES", "1")
    monkeypatch.setattr(pool_mod, "WorkerHandle", FakeWorker)
    warmups = []
    monkeypatch.setattr(pool_mod.kernel_warmup, "run", lambda pool, w: warmups.append(w.slot))

    def make(devices=("cpu:0",), warmup="off"):
        p = pool_mod.Pool(PoolConfig(devices=list(devices), visible_devices=None,
                                     run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"),
                                     engine_fork=False, kernel_warmup=warmup))
        for w in p.workers.values():
            w.spawn()
        p.warmups = warmups
        return p

    return make


def ev(kind, **kw):
    return kind(pid=1, **kw)


def test_a_new_worker_is_idle_or_warming_after_its_start(make_pool):
    p = make_pool(["cpu:0"])
    w = p.workers[0]
    assert w.state == W.STARTING
    p._on_event(w, ev(messages.Idle, baseline_bytes=7, start_s=1.5))
    assert (w.state, w.baseline_bytes, w.start_s) == (W.IDLE, 7, 1.5)
    q = make_pool(["cpu:0"], warmup="eager")
    q._on_event(q.workers[0], ev(messages.Idle))
    assert q.workers[0].state == W.WARMING and q.warmups == [0]


def test_lease_and_a_worker_through_one_attach(make_pool):
    p = make_pool(["cpu:0"])
    w = p.workers[0]
    p._on_event(w, ev(messages.Idle))
    with p.lock:
        inst = p.lease("i1", "a", "m", 1, 1, None, [], {}, [0], "")
    assert (w.state, w.instance_id) == (W.RESERVED, "i1")
    assert isinstance(w.sent[-1], messages.Lease) and w.sent[-1].instance_id == "i1"
    p._on_event(w, ev(messages.Attaching, instance_id="i1", shm_names=["s1"]))
    assert w.state == W.ATTACHING and inst.shm_names == {"s1"}
    p._on_event(w, ev(messages.Serving, instance_id="i1", phases={"weight_load": 0.5},
                      dist_ident="d1"))
    assert w.state == W.SERVING and w.phases == {"weight_load": 0.5}
    assert inst.dist_idents == {"d1"}
    p._on_event(w, ev(messages.Detaching, instance_id="i1"))
    assert w.state == W.DETACHING
    p._on_event(w, ev(messages.Idle))
    assert (w.state, w.instance_id) == (W.IDLE, None)


def test_a_warm_up_attach_keeps_the_worker_warming(make_pool):
    p = make_pool(["cpu:0"], warmup="eager")
    w = p.workers[0]
    p._on_event(w, ev(messages.Idle))
    with p.lock:
        p.lease("k1", "kw", "m", 1, 1, None, [], {}, [0], "", kernel_warmup=True)
    for kind in (messages.Attaching, messages.Serving, messages.Detaching):
        p._on_event(w, ev(kind, instance_id="k1"))
        assert w.state == W.WARMING, kind
    p._on_event(w, ev(messages.Idle))
    assert (w.state, w.instance_id) == (W.WARMING, None)  # the runner makes it IDLE


def test_a_worker_that_dies_before_ready_is_not_respawned(make_pool):
    p = make_pool(["cpu:0", "cpu:1"])
    a, b = p.workers[0], p.workers[1]
    p._on_event(a, ev(messages.Failed, error="start-up failed: no device"))
    assert a.state == W.BROKEN and a.error == "start-up failed: no device"
    p._on_worker_exit(a, 1)
    assert a.state == W.BROKEN and a.spawns == 1
    p._on_worker_exit(b, -9)  # killed while starting
    assert b.state == W.BROKEN and b.spawns == 1


def test_a_serving_worker_that_dies_fails_its_instance_and_is_respawned(make_pool,
                                                                       monkeypatch):
    p = make_pool(["cpu:0"])
    w = p.workers[0]
    cleaned = []
    monkeypatch.setattr(p, "_cleanup_failed", cleaned.append)
    monkeypatch.setattr(pool_mod, "start_thread", lambda name, fn, *a: fn(*a))
    p._on_event(w, ev(messages.Idle))
    with p.lock:
        inst = p.lease("i1", "a", "m", 1, 1, None, [], {}, [0], "")
    transition(inst, InstanceState.SERVING)
    p._on_event(w, ev(messages.Attaching, instance_id="i1"))
    p._on_event(w, ev(messages.Serving, instance_id="i1"))
    p._on_worker_exit(w, -9)
    assert inst.state == InstanceState.FAILED and "died with exit code -9" in inst.error
    assert cleaned == [inst]
    assert w.state == W.STARTING and w.spawns == 2 and w.instance_id is None


def test_a_stopped_worker_exiting_is_not_a_crash(make_pool):
    p = make_pool(["cpu:0"])
    w = p.workers[0]
    p._on_event(w, ev(messages.Idle))
    w.stop()
    p._on_worker_exit(w, 0)
    assert w.state == W.STOPPED and w.spawns == 1


def test_illegal_transitions_raise_and_force_is_the_escape_hatch(make_pool):
    p = make_pool(["cpu:0"])
    w = p.workers[0]
    with pytest.raises(IllegalTransition, match="starting -> serving"):
        transition(w, W.SERVING)
    with pytest.raises(IllegalTransition, match="expected idle"):
        transition(w, W.FAILED, [W.IDLE])
    assert w.state == W.STARTING
    force(w, W.SERVING, "a test")
    assert w.state == W.SERVING


def test_every_table_is_closed_and_terminal_states_stay():
    for enum_cls, table in TRANSITIONS.items():
        assert set(table) == set(enum_cls), enum_cls
        for src, dsts in table.items():
            assert all(isinstance(d, enum_cls) for d in dsts), (src, dsts)
    assert not TRANSITIONS[InstanceState][InstanceState.DETACHED]
    assert not TRANSITIONS[WorkerState][WorkerState.STOPPED]
    assert not TRANSITIONS[HostState][HostState.EXITED]
