"""daemon/allocator.py: which idle workers an attach gets, and when waiting is worth it."""

from __future__ import annotations

import pytest

from vllm_pool.daemon import allocator
from vllm_pool.states import WorkerState

I, S = WorkerState.IDLE, WorkerState.SERVING
DEVS = {0: "cuda:0", 1: "cuda:1", 2: "cuda:2", 3: "cuda:3"}


def test_allocator_takes_lowest_free_slots():
    assert allocator.reserve({0: S, 1: I, 2: I, 3: I}, DEVS, 2) == [1, 2]


def test_allocator_refuses_with_reason():
    with pytest.raises(allocator.NoCapacity, match="needs 3 free workers but 2"):
        allocator.reserve({0: S, 1: I, 2: S, 3: I}, DEVS, 3)


def test_allocator_pinned_devices():
    st = {0: I, 1: I, 2: S, 3: I}
    assert allocator.reserve(st, DEVS, 2, ["cuda:3", "cuda:0"]) == [3, 0]
    with pytest.raises(allocator.NoCapacity, match="serving"):
        allocator.reserve(st, DEVS, 1, ["cuda:2"])
    with pytest.raises(allocator.NoCapacity, match="not in this pool"):
        allocator.reserve(st, DEVS, 1, ["cuda:9"])
    with pytest.raises(allocator.NoCapacity, match="twice"):
        allocator.reserve(st, DEVS, 2, ["cuda:0", "cuda:0"])


def test_allocator_one_rank_per_device_when_a_device_has_several_workers():
    # cuda:0 runs a parked worker (slot 0) and a fresh idle one (slot 4).
    devs = {**DEVS, 4: "cuda:0", 5: "cuda:1"}
    st = {0: WorkerState.PARKED, 1: I, 2: S, 3: I, 4: I, 5: I}
    assert allocator.reserve(st, devs, 3) == [1, 3, 4]
    with pytest.raises(allocator.NoCapacity, match="needs 4 free workers but 3"):
        allocator.reserve(st, devs, 4)
    assert allocator.reserve(st, devs, 1, ["cuda:0"]) == [4]
    with pytest.raises(allocator.NoCapacity, match="no idle worker"):
        allocator.reserve(st, devs, 1, ["cuda:2"])


def test_allocator_waits_only_for_workers_that_would_fit():
    S = WorkerState
    devs = {0: "cuda:0", 1: "cuda:0", 2: "cuda:1"}
    # device 0: its worker is parked, a new one starts beside it: worth waiting for
    assert allocator.fits_once_started({0: S.PARKED, 1: S.STARTING, 2: S.SERVING}, devs, 1)
    # TP=2 needs two devices; only one would have an idle worker
    assert not allocator.fits_once_started({0: S.PARKED, 1: S.STARTING, 2: S.SERVING}, devs, 2)
    # nothing starting: the allocator's 409 stands
    assert not allocator.fits_once_started({0: S.PARKED, 1: S.SERVING, 2: S.SERVING}, devs, 1)
    # pinned to a device whose workers are all busy
    assert not allocator.fits_once_started({0: S.PARKED, 1: S.STARTING, 2: S.SERVING}, devs, 1,
                                           ["cuda:1"])


def test_allocator_one_active_model_per_device():
    """The idle worker kept beside a serving one (parking) is not handed out while that
    device's memory is in use; it is once the serving one is parked."""
    S = WorkerState
    devs = {0: "cuda:0", 1: "cuda:1", 2: "cuda:0"}
    st = {0: S.SERVING, 1: S.IDLE, 2: S.IDLE}
    assert allocator.reserve(st, devs, 1) == [1]
    with pytest.raises(allocator.NoCapacity):
        allocator.reserve(st, devs, 2)
    with pytest.raises(allocator.NoCapacity, match="runs another model"):
        allocator.reserve(st, devs, 1, ["cuda:0"])
    assert allocator.reserve({**st, 0: S.PARKED}, devs, 2) == [1, 2]


def test_warming_worker_is_not_free_but_worth_waiting_for():
    """A worker in its kernel warm-up is not free, but an attach waits for it."""
    devs = {0: "cuda:0"}
    for soon in (WorkerState.STARTING, WorkerState.WARMING):
        with pytest.raises(allocator.NoCapacity):
            allocator.reserve({0: soon}, devs, 1)
        assert allocator.fits_once_started({0: soon}, devs, 1)
