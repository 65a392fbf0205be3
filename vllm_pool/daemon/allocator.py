"""Which workers an attach gets. Pure logic: the pool calls it under its lock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vllm_pool.states import WorkerState


class NoCapacity(Exception):
    """Not enough free workers (HTTP 409)."""


def reserve(states: Mapping[int, WorkerState], devices: Mapping[int, str], n: int,
            wanted_devices: Sequence[str] | None = None) -> list[int]:
    """Return the slots of `n` IDLE workers, in rank order.

    `wanted_devices` pins the attach to those devices (rank i on the i-th), else the
    lowest free slots are taken, which keeps TP groups on neighbouring devices.
    """
    if n < 1:
        raise ValueError("an attach needs at least one worker")
    if wanted_devices:
        if len(wanted_devices) != n:
            raise NoCapacity(f"{len(wanted_devices)} devices asked for, but TP x PP = {n}")
        if len(set(wanted_devices)) != n:
            raise NoCapacity(f"devices asked for twice: {list(wanted_devices)}")
        by_device = {d: s for s, d in devices.items()}
        slots = []
        for d in wanted_devices:
            if d not in by_device:
                raise NoCapacity(f"device {d} is not in this pool "
                                 f"(pool devices: {sorted(devices.values())})")
            s = by_device[d]
            if states[s] != WorkerState.IDLE:
                raise NoCapacity(f"device {d} is {states[s].value}, not idle")
            slots.append(s)
        return slots
    free = sorted(s for s, st in states.items() if st == WorkerState.IDLE)
    if len(free) < n:
        busy = {s: st.value for s, st in sorted(states.items()) if st != WorkerState.IDLE}
        raise NoCapacity(f"attach needs {n} free workers but {len(free)} of "
                         f"{len(states)} are free (busy: {busy})")
    return free[:n]
