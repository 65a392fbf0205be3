"""A process's own device memory, from the driver's per-process accounting (NVML).

`torch.cuda.mem_get_info` is the whole device, every process on it: where two workers share
a GPU it counts the other's model as this worker's memory. NVML's running-process list
gives each process's own figure (`usedGpuMemory`, CUDA context included), and the device's
free and total memory apart from it.

Readings are taken in one place (`read_device`) and turned into figures by pure functions
(`own_bytes`), so the accounting is testable from recorded readings on a machine without
a GPU. Everything degrades to None: no `pynvml` (CPU installs), no driver, a MIG instance
or a container that does not report per-process memory, a process not in NVML's list (a
PID namespace other than the driver's). Callers then keep their own fallback.

Imports nothing of the project: the worker (torch side) and the daemon (no torch) use it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

logger = logging.getLogger("vllm_pool.device_memory")


@dataclass(frozen=True)
class ProcessUse:
    pid: int
    used_bytes: int | None  # None: NVML_VALUE_NOT_AVAILABLE (MIG, some containers)


@dataclass(frozen=True)
class DeviceReading:
    """One device as NVML saw it at one moment."""
    uuid: str
    total_bytes: int
    free_bytes: int
    processes: tuple[ProcessUse, ...] = field(default_factory=tuple)


def own_bytes(reading: DeviceReading | None, pid: int) -> int | None:
    """`pid`'s own device memory on that device, or None when NVML cannot tell: no reading,
    no entry for the pid (a process shows up once it has a context, so a missing entry is a
    namespace mismatch or no context: not a measured zero), or no figure for it. A pid can
    be listed more than once (one entry per context): the entries add up."""
    if reading is None:
        return None
    mine = [p.used_bytes for p in reading.processes if p.pid == pid]
    if not mine or any(u is None for u in mine):
        return None
    return sum(mine)


def others_bytes(reading: DeviceReading | None, pid: int) -> int | None:
    """What every other process holds on that device (None where a figure is missing)."""
    if reading is None:
        return None
    other = [p.used_bytes for p in reading.processes if p.pid != pid]
    if any(u is None for u in other):
        return None
    return sum(other)


def nvml_ref(visible_devices: str | None, cuda_index: int) -> tuple[str, str | int] | None:
    """Which NVML device CUDA's device `cuda_index` is, from CUDA_VISIBLE_DEVICES alone:
    ("uuid", "GPU-..."/"MIG-...") for a UUID entry, ("index", n) for a number (NVML counts
    in PCI bus order, which is CUDA's order on a machine of one GPU model, as vLLM itself
    assumes), None when the index is not visible. Used only when the CUDA runtime cannot
    give the device's UUID itself."""
    if visible_devices is None or visible_devices.strip() == "":
        return ("index", cuda_index) if visible_devices is None else None
    entries = [e.strip() for e in visible_devices.split(",")]
    # CUDA stops at the first invalid entry.
    valid = []
    for e in entries:
        if e.isdigit() or e.startswith(("GPU-", "MIG-")):
            valid.append(e)
        else:
            break
    if cuda_index < 0 or cuda_index >= len(valid):
        return None
    e = valid[cuda_index]
    return ("index", int(e)) if e.isdigit() else ("uuid", e)


def uuid_candidates(cuda_uuid: str) -> list[str]:
    """NVML names a GPU `GPU-<uuid>` and a MIG instance `MIG-<uuid>`; the CUDA runtime
    gives the bare UUID."""
    u = cuda_uuid.strip()
    if u.startswith(("GPU-", "MIG-")):
        return [u]
    return [f"GPU-{u}", f"MIG-{u}"]


# ---- NVML access (the only place that calls it) ---------------------------------------
_lock = threading.Lock()
_state: dict[str, object] = {}


def _nvml():
    """The initialised pynvml module, or None (the reason is logged once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        try:
            import pynvml

            pynvml.nvmlInit()
            _state["module"] = pynvml
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, driver errors
            _state["module"] = None
            _state["why"] = f"{type(e).__name__}: {e}"
            logger.debug("no per-process device memory (NVML unavailable: %s)", _state["why"])
        return _state["module"]


def unavailable_reason() -> str | None:
    return None if _nvml() is not None else str(_state.get("why", "unknown"))


def handle_uuid(cuda_uuid: str | None = None, visible_devices: str | None = None,
                cuda_index: int = 0) -> str | None:
    """The NVML UUID of a CUDA device: from the runtime's UUID when given (exact, whatever
    CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER say), else from CUDA_VISIBLE_DEVICES."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        if cuda_uuid:
            for cand in uuid_candidates(cuda_uuid):
                try:
                    h = nv.nvmlDeviceGetHandleByUUID(cand)
                    return str(nv.nvmlDeviceGetUUID(h))
                except nv.NVMLError:
                    continue
        ref = nvml_ref(visible_devices, cuda_index)
        if ref is None:
            return None
        h = (nv.nvmlDeviceGetHandleByIndex(ref[1]) if ref[0] == "index"
             else nv.nvmlDeviceGetHandleByUUID(ref[1]))
        return str(nv.nvmlDeviceGetUUID(h))
    except Exception as e:  # noqa: BLE001 - no figure rather than a failed worker
        logger.debug("no NVML handle for CUDA device %s: %s", cuda_uuid or cuda_index, e)
        return None


def read_device(uuid: str | None) -> DeviceReading | None:
    """NVML's view of one device now: total, free, and each compute process's memory."""
    nv = _nvml()
    if nv is None or not uuid:
        return None
    try:
        h = nv.nvmlDeviceGetHandleByUUID(uuid)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        procs = tuple(ProcessUse(int(p.pid), None if p.usedGpuMemory is None
                                 else int(p.usedGpuMemory))
                      for p in nv.nvmlDeviceGetComputeRunningProcesses(h))
        return DeviceReading(uuid, int(mem.total), int(mem.free), procs)
    except Exception as e:  # noqa: BLE001
        logger.debug("NVML reading of %s failed: %s", uuid, e)
        return None


def process_bytes(pid: int | None = None, uuid: str | None = None) -> int | None:
    """`pid`'s (default: this process's) own memory on the NVML device `uuid`."""
    return own_bytes(read_device(uuid), os.getpid() if pid is None else pid)
