"""Parked models: the policy and the engine calls, apart from the pool's orchestration.

A parked instance keeps its engine and worker processes, so its compiled code, CUDA graphs
and warm state survive. On the GPU its engine sleeps at vLLM's level 1 (weights copied to
pinned host memory, KV cache freed: the device keeps only the CUDA contexts), and the pool
starts another warm worker on each of its devices, so other models can attach there. Waking
it is vLLM's wake-up: weights back, KV cache re-made, same endpoint and instance id.

vLLM's sleep mode does nothing on CPU. There a parked instance simply stays alive, its
memory counted against the park budget, so the states, the re-attach rule and the eviction
are the same code on both.

vLLM exposes sleep and wake only as development endpoints (`VLLM_SERVER_DEV_MODE=1`), so a
pool with parking on starts its engines with that set. Those endpoints (and the others it
enables, such as collective RPC) are reachable by whoever can reach the engine's port, which
is loopback unless `--engine-host` says otherwise: the same trust as the control API.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass


class ParkError(Exception):
    pass


def settings_key(model: str, tp: int, pp: int, args: Sequence[str], env: dict[str, str],
                 devices: Sequence[str] | None) -> str:
    """What must match for a parked instance to stand in for a new attach."""
    blob = json.dumps([model, tp, pp, list(args), sorted(env.items()),
                       list(devices) if devices else None])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def engine_args(args: list[str], on_gpu: bool) -> list[str]:
    """An engine that may be parked must start with vLLM's sleep mode (GPU only: the CPU
    platform refuses it)."""
    if on_gpu and "--enable-sleep-mode" not in args:
        return [*args, "--enable-sleep-mode"]
    return args


def engine_env() -> dict[str, str]:
    return {"VLLM_SERVER_DEV_MODE": "1"}


def _post(url: str, timeout: float) -> None:
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if r.status != 200:
                raise ParkError(f"{url} answered {r.status}")
    except urllib.error.HTTPError as e:
        raise ParkError(f"{url} answered {e.code}: {e.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ParkError(f"{url} failed: {e}") from None


def engine_sleep(base_url: str, timeout: float = 300.0) -> None:
    """vLLM sleep level 1; in-flight requests are aborted (vLLM's default mode)."""
    _post(f"{base_url}/sleep?level=1", timeout)


def engine_wake(base_url: str, timeout: float = 300.0) -> None:
    _post(f"{base_url}/wake_up", timeout)


def process_rss(pid: int | None) -> int:
    """Resident memory of one process in bytes (0 if it is gone)."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def device_bytes(workers: Sequence) -> int | None:
    """GPU: the device memory an instance's workers hold now, each its own process's
    figure (NVML; a parked instance keeps its CUDA contexts and what sleep does not free),
    never the device's total, which counts every other model on it. None on CPU, or where
    a worker has no per-process figure. `workers`: WorkerHandles."""
    if not workers or not all(w.device.startswith("cuda") for w in workers):
        return None
    if not all(w.memory_source == "nvml" for w in workers):
        return None
    return sum(w.memory_now()[0] for w in workers)


def default_budget_bytes() -> int:
    """Half the machine's RAM: parked weights must never push the host into swap."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 16 << 30


@dataclass
class Parked:
    id: str
    host_bytes: int
    last_used: float


def over_budget(parked: Sequence[Parked], budget: int) -> list[str]:
    """Parked instances to detach for real, least recently used first, until the rest
    fits in `budget` bytes."""
    total = sum(p.host_bytes for p in parked)
    out = []
    for p in sorted(parked, key=lambda p: p.last_used):
        if total <= budget:
            break
        out.append(p.id)
        total -= p.host_bytes
    return out
