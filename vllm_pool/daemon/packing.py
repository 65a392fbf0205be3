"""Where a GPU attach goes when several models share a device: best fit by memory.

Pure logic over readings (the pool takes them from NVML, the tests from recorded ones).
vLLM's own start-up check (vllm/v1/worker/utils.py `request_memory`) refuses to start
when the device's free memory is below ceil(utilization x total); the pool checks the
same figure first, with a margin for what the check does not see (a new worker's CUDA
context, the engine's own allocations before the check), so a refused attach is a 409
with figures instead of an engine that dies at start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1 << 20


class NoRoom(Exception):
    """No device (or not enough devices) has room for the attach (HTTP 409)."""


@dataclass(frozen=True)
class Room:
    """One GPU as read now: its pool name ("cuda:0") and NVML's total and free bytes."""
    device: str
    total_bytes: int
    free_bytes: int


def utilization_of(args: Sequence[str], default: float) -> float:
    """The attach's `--gpu-memory-utilization` (vLLM's syntax: `--flag v` or `--flag=v`),
    else `default`. ValueError when it is not a number in (0, 1]."""
    raw = None
    for i, a in enumerate(args):
        if a == "--gpu-memory-utilization":
            raw = args[i + 1] if i + 1 < len(args) else ""
        elif a.startswith("--gpu-memory-utilization="):
            raw = a.split("=", 1)[1]
    if raw is None:
        return default
    try:
        u = float(raw)
    except ValueError:
        raise ValueError(f"--gpu-memory-utilization {raw!r} is not a number") from None
    if not 0.0 < u <= 1.0:  # also rejects nan
        raise ValueError(f"--gpu-memory-utilization {raw} is outside (0, 1]")
    return u


def needed_mib(utilization: float, total_bytes: int) -> int:
    """What vLLM will ask for: ceil(utilization x total), in MiB."""
    return math.ceil(utilization * total_bytes / MIB)


def left_mib(room: Room, utilization: float, margin_mib: int) -> int:
    """MiB left on the device after the attach and the margin (negative: it does not fit)."""
    return room.free_bytes // MIB - margin_mib - needed_mib(utilization, room.total_bytes)


def _index(device: str) -> tuple[int, str]:
    tail = device.rsplit(":", 1)[-1]
    return (int(tail), device) if tail.isdigit() else (1 << 30, device)


def choose(rooms: Sequence[Room], utilization: float, n: int, margin_mib: int,
           wanted: Sequence[str] | None = None) -> list[str]:
    """The devices for an attach of `n` ranks, in rank order.

    Pinned (`wanted`): those devices, each must fit. Otherwise best fit: among the devices
    where it fits, the ones with the least room left after placing it (ties: the lowest
    index), so big free devices stay free for big models; a TP group takes the n best
    and ranks them by index. Raises NoRoom with the figures.
    """
    by_dev = {r.device: r for r in rooms}
    if wanted:
        missing = [d for d in wanted if d not in by_dev]
        if missing:
            raise NoRoom(f"no memory reading for {missing}")
        short = [by_dev[d] for d in wanted if left_mib(by_dev[d], utilization, margin_mib) < 0]
        if short:
            raise NoRoom(_why(short, utilization, margin_mib))
        return list(wanted)
    fits = [r for r in rooms if left_mib(r, utilization, margin_mib) >= 0]
    if len(fits) < n:
        raise NoRoom(_why([r for r in rooms if r not in fits], utilization, margin_mib,
                          f" ({len(fits)} of {n} devices fit)" if n > 1 else ""))
    best = sorted(fits, key=lambda r: (left_mib(r, utilization, margin_mib), _index(r.device)))
    return sorted((r.device for r in best[:n]), key=_index)


def _why(short: Sequence[Room], u: float, margin_mib: int, tail: str = "") -> str:
    parts = [f"needs {needed_mib(u, r.total_bytes)} MiB (--gpu-memory-utilization {u:g}), "
             f"{r.device} has {r.free_bytes // MIB} MiB free, margin {margin_mib}"
             for r in sorted(short, key=lambda r: _index(r.device))]
    return "no room: " + "; ".join(parts) + tail
