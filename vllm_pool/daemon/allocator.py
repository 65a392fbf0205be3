"""Which workers an attach gets. Pure logic: the pool calls it under its lock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vllm_pool.states import WorkerState


class NoCapacity(Exception):
    """Not enough free workers (HTTP 409)."""


# Worker states that hold (or are about to hold) their device's memory for a model.
_ACTIVE = frozenset({WorkerState.RESERVED, WorkerState.ATTACHING, WorkerState.SERVING,
                     WorkerState.DETACHING})


# Worker states that become IDLE by themselves (process start, the kernel warm-up).
_SOON_IDLE = frozenset({WorkerState.STARTING, WorkerState.WARMING})


def _busy_devices(states: Mapping[int, WorkerState], devices: Mapping[int, str]) -> set[str]:
    return {devices[s] for s, st in states.items() if st in _ACTIVE}


def free_slots(states: Mapping[int, WorkerState], devices: Mapping[int, str],
               packed: bool = False) -> set[int]:
    """Idle workers an attach may take: one active model per device, so an idle worker
    beside a serving one (kept ready for when that one is parked) is not free while the
    device's memory is in use; `packed`: the pool has checked the device's memory
    (packing.py), so any idle worker is."""
    busy_devices = set() if packed else _busy_devices(states, devices)
    return {s for s, st in states.items()
            if st == WorkerState.IDLE and devices[s] not in busy_devices}


def reserve(states: Mapping[int, WorkerState], devices: Mapping[int, str], n: int,
            wanted_devices: Sequence[str] | None = None, packed: bool = False) -> list[int]:
    """Return the slots of `n` IDLE workers, in rank order.

    `wanted_devices` pins the attach to those devices (rank i on the i-th), else the
    lowest free slots are taken, which keeps TP groups on neighbouring devices.
    """
    if n < 1:
        raise ValueError("an attach needs at least one worker")
    free_now = free_slots(states, devices, packed)
    if wanted_devices:
        busy_devices = set() if packed else _busy_devices(states, devices)
        if len(wanted_devices) != n:
            raise NoCapacity(f"{len(wanted_devices)} devices asked for, but TP x PP = {n}")
        if len(set(wanted_devices)) != n:
            raise NoCapacity(f"devices asked for twice: {list(wanted_devices)}")
        slots = []
        for d in wanted_devices:
            on_d = sorted(s for s, dev in devices.items() if dev == d)
            if not on_d:
                raise NoCapacity(f"device {d} is not in this pool "
                                 f"(pool devices: {sorted(set(devices.values()))})")
            idle = [s for s in on_d if s in free_now]
            if not idle:
                raise NoCapacity(f"device {d} has no idle worker "
                                 f"({', '.join(states[s].value for s in on_d)})"
                                 + (" and runs another model" if d in busy_devices else ""))
            slots.append(idle[0])
        return slots
    # A device may run several worker processes (an active one and parked ones), but the
    # ranks of one instance go to distinct devices: the lowest idle slot of each device.
    free: list[int] = []
    for s in sorted(free_now):
        if devices[s] not in {devices[f] for f in free}:
            free.append(s)
    if len(free) < n:
        busy = {s: st.value for s, st in sorted(states.items()) if st != WorkerState.IDLE}
        raise NoCapacity(f"attach needs {n} free workers but {len(free)} of "
                         f"{len(set(devices.values()))} devices have one "
                         f"(busy: {busy})")
    return free[:n]


def fits_once_started(states: Mapping[int, WorkerState], devices: Mapping[int, str], n: int,
                      wanted_devices: Sequence[str] | None = None,
                      packed: bool = False) -> bool:
    """Whether the attach would fit once the workers now starting or warming are idle (a
    worker started beside a parked one, or a respawned one): worth waiting for, not a 409."""
    if not any(st in _SOON_IDLE for st in states.values()):
        return False
    soon = {s: WorkerState.IDLE if st in _SOON_IDLE else st for s, st in states.items()}
    try:
        reserve(soon, devices, n, wanted_devices, packed)
    except (NoCapacity, ValueError):
        return False
    return True
