"""The packing policy (daemon/packing.py) from recorded readings: no GPU, no daemon."""

from __future__ import annotations

import pytest

from vllm_pool.daemon import packing
from vllm_pool.daemon.packing import MIB, NoRoom, Room

# An H200 as NVML reported it (docs/results, ninth session): 143771 MiB total; idle, one
# worker's context (750 MiB) on it.
H200_TOTAL = 143771 * MIB
IDLE = Room("cuda:0", H200_TOTAL, (143771 - 750) * MIB)


def test_needed_is_vllms_ceil_of_utilization_times_total():
    assert packing.needed_mib(0.3, H200_TOTAL) == 43132  # ceil(43131.3)
    assert packing.needed_mib(1.0, H200_TOTAL) == 143771


@pytest.mark.parametrize("args,want", [
    ([], 0.92), (["--gpu-memory-utilization", "0.3"], 0.3),
    (["--max-model-len", "2048", "--gpu-memory-utilization=0.5"], 0.5),
    (["--gpu-memory-utilization", "1"], 1.0)])
def test_utilization_from_args(args, want):
    assert packing.utilization_of(args, 0.92) == want


@pytest.mark.parametrize("bad", ["0", "-0.1", "1.01", "nan", "x", ""])
def test_utilization_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError):
        packing.utilization_of(["--gpu-memory-utilization", bad], 0.92)


def test_three_shares_of_0_3_fit_one_h200_and_a_fourth_does_not():
    room = IDLE
    for _ in range(3):
        assert packing.choose([room], 0.3, 1, 1024) == ["cuda:0"]
        # What the model then holds, plus the next worker's context.
        room = Room("cuda:0", H200_TOTAL, room.free_bytes - (43132 + 750) * MIB)
    with pytest.raises(NoRoom) as e:
        packing.choose([room], 0.3, 1, 1024)
    assert str(e.value) == (f"no room: needs 43132 MiB (--gpu-memory-utilization 0.3), "
                            f"cuda:0 has {room.free_bytes // MIB} MiB free, margin 1024")


def test_the_margin_decides_at_the_edge():
    need = packing.needed_mib(0.3, H200_TOTAL)
    edge = Room("cuda:0", H200_TOTAL, (need + 1024) * MIB)
    assert packing.choose([edge], 0.3, 1, 1024) == ["cuda:0"]
    with pytest.raises(NoRoom):
        packing.choose([edge], 0.3, 1, 1025)


def test_best_fit_takes_the_fullest_device_that_fits_ties_lowest_index():
    rooms = [Room("cuda:0", H200_TOTAL, 140000 * MIB), Room("cuda:1", H200_TOTAL, 60000 * MIB),
             Room("cuda:2", H200_TOTAL, 60000 * MIB), Room("cuda:3", H200_TOTAL, 10000 * MIB)]
    assert packing.choose(rooms, 0.3, 1, 1024) == ["cuda:1"]
    # Too big for 1 and 2: the empty one.
    assert packing.choose(rooms, 0.5, 1, 1024) == ["cuda:0"]
    # TP=2: the two best fits, in index order.
    assert packing.choose(rooms, 0.3, 2, 1024) == ["cuda:1", "cuda:2"]
    assert packing.choose(list(reversed(rooms)), 0.3, 3, 1024) == ["cuda:0", "cuda:1", "cuda:2"]
    with pytest.raises(NoRoom, match=r"\(3 of 4 devices fit\)"):
        packing.choose(rooms, 0.3, 4, 1024)


def test_pinned_devices_must_each_fit():
    rooms = [Room("cuda:0", H200_TOTAL, 140000 * MIB), Room("cuda:1", H200_TOTAL, 10000 * MIB)]
    assert packing.choose(rooms, 0.3, 1, 1024, ["cuda:0"]) == ["cuda:0"]
    with pytest.raises(NoRoom, match="cuda:1 has 10000 MiB free"):
        packing.choose(rooms, 0.3, 2, 1024, ["cuda:1", "cuda:0"])
    with pytest.raises(NoRoom, match="no memory reading"):
        packing.choose(rooms, 0.3, 1, 1024, ["cuda:7"])
