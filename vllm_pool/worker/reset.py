"""Tear an attach down inside a pool worker and check the process is clean again.

Order matters (see docs/vllm-internals in shared/): the async output thread and the
queues go first, then vLLM's Worker.shutdown; captured CUDA graphs must be freed before
the process groups are destroyed (an NCCL abort blocks while graphs that use it exist);
then module globals, Dynamo caches and the environment are restored.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_pool import compat

logger = logging.getLogger("vllm_pool.worker")


@dataclass
class ProcessSnapshot:
    """What an attach may change in the worker process, captured while idle."""
    environ: dict[str, str] = field(default_factory=dict)
    set_num_threads: Any = None
    num_threads: int = 0
    sigterm: Any = None
    sigint: Any = None
    class_bases: dict[type, tuple] = field(default_factory=dict)
    bytecode_hooks: set[int] = field(default_factory=set)
    dynamo_globals: set[tuple[str, str]] = field(default_factory=set)
    frozen: int = 0  # gc.get_freeze_count(): the idle heap, frozen before the attach

    @classmethod
    def take(cls) -> "ProcessSnapshot":
        return cls(environ=dict(os.environ), set_num_threads=torch.set_num_threads,
                   num_threads=torch.get_num_threads(),
                   sigterm=signal.getsignal(signal.SIGTERM),
                   sigint=signal.getsignal(signal.SIGINT),
                   bytecode_hooks=set(compat.dynamo_bytecode_hooks()),
                   dynamo_globals=compat.dynamo_installed_globals(),
                   frozen=gc.get_freeze_count())

    def remember_worker_class(self, vllm_config: Any) -> None:
        """worker_extension_cls rewrites the worker class's bases in place."""
        qualname = getattr(vllm_config.parallel_config, "worker_cls", None)
        if not isinstance(qualname, str) or qualname == "auto":
            return
        try:
            klass = compat.resolve_obj_by_qualname(qualname)
            self.class_bases[klass] = klass.__bases__
        except Exception:  # the attach will fail on it with vLLM's own error
            pass

    def drop_compile_state(self) -> None:
        """What torch.compiler.reset() leaves: hooks and globals that hold the model."""
        hooks = compat.dynamo_bytecode_hooks()
        for key in [k for k in hooks if k not in self.bytecode_hooks]:
            del hooks[key]
        compat.drop_dynamo_installed_globals(self.dynamo_globals)

    def restore(self) -> None:
        for k in list(os.environ):
            if k not in self.environ:
                del os.environ[k]
        os.environ.update(self.environ)
        torch.set_num_threads = self.set_num_threads
        # vLLM's GPU worker drops to one thread after loading (0.32): the next attach
        # would load with one.
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        signal.signal(signal.SIGTERM, self.sigterm)
        signal.signal(signal.SIGINT, self.sigint)
        for klass, bases in self.class_bases.items():
            if klass.__bases__ != bases:
                klass.__bases__ = bases


def teardown(proc: Any, snap: ProcessSnapshot) -> None:
    """Release everything a PoolWorkerProc built. Never raises."""
    # Frozen objects are never collected: had anything frozen the attach's objects (a
    # vLLM freeze that compat.keep_attach_heap_unfrozen does not hold), the model runner
    # would survive the detach. Unfreezing brings the idle heap back too, and every
    # collection below would scan all of it: so only then.
    steps = []
    if gc.get_freeze_count() > snap.frozen:
        logger.info("the attach froze %d objects: unfreezing the whole heap",
                    gc.get_freeze_count() - snap.frozen)
        steps.append(("gc unfreeze", gc.unfreeze))
    if proc is not None:
        steps += [
            ("async output thread", proc.stop_async_output_thread),
            ("host copy for parking", compat.stop_host_copy_for_parking),
            ("broadcast queue", lambda: proc.rpc_broadcast_mq and proc.rpc_broadcast_mq.shutdown()),
            ("response queue", lambda: proc.worker_response_mq and proc.worker_response_mq.shutdown()),
            ("worker shutdown", lambda: proc.worker.shutdown()),
            ("cuda graphs", compat.clear_cuda_graphs),
            ("drop model runner", lambda: _drop_model(proc)),
        ]
    steps += [
        ("gc", gc.collect),
        ("model parallel groups", compat.destroy_model_parallel),
        ("distributed environment", compat.destroy_distributed_environment),
        ("dynamo", torch.compiler.reset),
        ("dynamo hooks and globals", snap.drop_compile_state),
        ("vllm globals", compat.reset_vllm_globals),
        ("gc", gc.collect),
    ]
    if torch.cuda.is_available():
        # cuBLAS keeps a workspace per handle and stream (vLLM uses several streams).
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            steps.append(("cublas workspaces", torch._C._cuda_clearCublasWorkspaces))
        steps.append(("cuda cache", torch.cuda.empty_cache))
        # PyTorch caches freed pinned host blocks: the host copies of a parked model (ours
        # and vLLM's sleep) would otherwise stay in this process after the model is gone.
        if hasattr(torch._C, "_host_emptyCache"):
            steps.append(("pinned host cache", torch._C._host_emptyCache))
        # Last: freeing a parked model's asleep allocations leaves vLLM's cumem allocator
        # in error, and every later allocation of the next attach would fail.
        steps.append(("cumem error flag", _clear_cumem_error))
    else:
        # vLLM's CPU TP communicator keeps its shared segments mapped until process exit.
        steps.append(("cpu tp shared memory", compat.release_cpu_tp_mappings))
    took: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except Exception as e:  # keep going: the clean check decides the worker's fate
            logger.warning("teardown step %s failed: %s", name, e)
        took[name] = took.get(name, 0.0) + time.perf_counter() - t0
    slow = sorted(took.items(), key=lambda kv: -kv[1])[:4]
    logger.info("teardown took %.2fs (%s)", time.perf_counter() - t_all,
                ", ".join(f"{n} {t:.2f}s" for n, t in slow))


def _clear_cumem_error() -> None:
    code = compat.clear_cumem_error()
    if code:
        logger.info("cleared CUDA error %d that vLLM's cumem allocator kept from freeing "
                    "the parked model's unmapped memory", code)


def _drop_model(proc: Any) -> None:
    wrapper = proc.worker
    inner = getattr(wrapper, "worker", None)
    if inner is not None:
        # Captured CUDA graphs live in the runner: free them before NCCL groups go.
        inner.model_runner = None
        wrapper.worker = None
    proc.worker = None
    proc.rpc_broadcast_mq = None
    proc.worker_response_mq = None
    gc.collect()


@dataclass
class IdleBaseline:
    """The idle worker's footprint, measured after start and again after the kernel warm-up."""
    device_bytes: int = 0  # this worker's own memory (memory_figures: NVML on a GPU, RSS on CPU)
    torch_bytes: int = 0   # what PyTorch's CUDA allocator holds
    live: dict[str, int] = field(default_factory=dict)  # live_attach_objects()
    source: str = ""       # MemoryFigures.source of device_bytes

    @classmethod
    def measure(cls, device: torch.device | None) -> "IdleBaseline":
        figs = memory_figures(device)
        return cls(figs.own_bytes, torch_reserved(device), live_attach_objects(), figs.source)


def torch_reserved(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_reserved(device)
    return 0


def clean_check(device: torch.device | None, base: IdleBaseline, slack: int,
                context_allowance: int) -> str | None:
    """None when clean, else what is wrong. Run after teardown, before reporting idle.

    Every tensor must be freed: PyTorch's allocator back within `slack` of idle. The CUDA
    context itself keeps what the attach loaded (kernel images of FlashAttention, Triton
    and cuBLAS, library handles; measured 0.3 GiB for TP=1, 0.6 GiB for TP=2 on H200
    with vLLM 0.26), which only process exit frees: up to `context_allowance` of that is
    kept, as it makes the next attach faster; beyond it the worker is respawned."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "torch.distributed is still initialised"
    alive = new_attach_objects(base.live)
    if alive:
        return "objects of the attach are still alive: " + ", ".join(
            f"{n} {name}" for name, n in sorted(alive.items()))
    if device is not None and device.type == "cuda":
        err = device_memory_verdict(base, torch_reserved(device), memory_figures(device),
                                    slack, context_allowance)
        if err:
            return err
    code = compat.cumem_error_code()
    if code:
        return (f"vLLM's cumem allocator holds CUDA error {code}: every allocation in its "
                f"pool would fail")
    try:  # a small kernel still runs on the device
        x = torch.ones(8, device=device or "cpu")
        if float((x + x).sum()) != 16.0:
            return "device check kernel gave a wrong result"
    except Exception as e:
        return f"device check kernel failed: {e}"
    return None


def device_memory_verdict(base: IdleBaseline, torch_now: int, figs: "MemoryFigures",
                          slack: int, context_allowance: int) -> str | None:
    """The device-memory part of the clean check, from readings (pure).

    PyTorch's allocator must be back within `slack` of idle. Then this process's own
    figure now against its own idle figure: both include the CUDA context, so what is
    compared is the context's growth plus whatever the attach left outside PyTorch's
    allocator (NCCL buffers, sleep mode's cuMem pools), within `slack` +
    `context_allowance`. Without a per-process figure (no NVML, MIG), now or at idle,
    only the first check applies: the device's total would count other processes' models
    as this worker's."""
    held = torch_now - base.torch_bytes
    if held > slack:
        return (f"PyTorch still holds {held / 2**20:.0f} MiB of device memory "
                f"(allowed {slack / 2**20:.0f} MiB)")
    if figs.source == base.source == SOURCE_NVML:
        used = figs.own_bytes - base.device_bytes
        if used > slack + context_allowance:
            return (f"this worker's device memory is {used / 2**20:.0f} MiB above its "
                    f"idle baseline {base.device_bytes / 2**20:.0f} MiB (allowed "
                    f"{slack / 2**20:.0f} MiB + {context_allowance / 2**20:.0f} MiB of "
                    f"CUDA context)")
    return None


# What an attach builds and a detach must free: model runners, WorkerProcs, worker
# wrappers, and modules that own parameters (the model's layers). Class names, so vLLM
# versions with other module layouts match too. Parameter-free modules are not counted:
# torch builds a few lazily, once per process (an fx `identity` graph in an lru_cache).
_ATTACH_CLASS_SUFFIXES = ("ModelRunner", "WorkerProc", "WorkerWrapperBase")


def _is_attach_object(obj: Any) -> bool:
    cls = type(obj)
    if cls.__name__.endswith(_ATTACH_CLASS_SUFFIXES):
        return True
    # issubclass on the type, not isinstance: no __class__ lookups on lazy proxies.
    return issubclass(cls, torch.nn.Module) and bool(vars(obj).get("_parameters"))


def live_attach_objects() -> dict[str, int]:
    """Counts, by class name, of live objects an attach builds (see above)."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        if _is_attach_object(obj):
            name = type(obj).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


def new_attach_objects(baseline: dict[str, int]) -> dict[str, int]:
    """live_attach_objects() above what the idle worker had."""
    counts = {k: n - baseline.get(k, 0) for k, n in live_attach_objects().items()}
    return {k: n for k, n in counts.items() if n > 0}


SOURCE_NVML = "nvml"    # the driver's per-process figure (CUDA context included)
SOURCE_TORCH = "torch"  # NVML gave none: PyTorch's reserved memory (no context, no NCCL)
SOURCE_RSS = "rss"      # a CPU worker: resident host memory


@dataclass(frozen=True)
class MemoryFigures:
    """This worker's own memory, and the room on its device (which all processes share)."""
    own_bytes: int
    source: str
    device_free_bytes: int = 0   # GPU: free on the whole device (what vLLM's start-up checks)
    device_total_bytes: int = 0
    device_uuid: str = ""        # the NVML UUID, for the daemon's own readings


_uuids: dict[int, str | None] = {}


def device_uuid(device: torch.device | None) -> str | None:
    """The NVML UUID of this worker's CUDA device (cached; None without NVML)."""
    if device is None or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _uuids:
        from vllm_pool import device_memory

        try:
            cuda_uuid = str(torch.cuda.get_device_properties(idx).uuid)
        except Exception:  # noqa: BLE001 - older torch: map through CUDA_VISIBLE_DEVICES
            cuda_uuid = None
        _uuids[idx] = device_memory.handle_uuid(
            cuda_uuid, os.environ.get("CUDA_VISIBLE_DEVICES"), idx)
    return _uuids[idx]


def memory_figures(device: torch.device | None) -> MemoryFigures:
    """GPU: this process's own device memory from NVML, else PyTorch's reserved memory;
    the device's free and total memory beside it. CPU: this process's RSS, as before."""
    if device is not None and device.type == "cuda":
        from vllm_pool import device_memory

        free, total = torch.cuda.mem_get_info(device)
        uuid = device_uuid(device)
        return gpu_figures(device_memory.read_device(uuid), os.getpid(),
                           torch_reserved(device), free, total)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = 0
    return MemoryFigures(rss, SOURCE_RSS)


def gpu_figures(reading, pid: int, torch_reserved_bytes: int, free: int,
                total: int) -> MemoryFigures:
    """A GPU worker's figures from readings (pure): its own entry in NVML's reading of its
    device (a device_memory.DeviceReading, or None), else PyTorch's reserved memory."""
    from vllm_pool import device_memory

    own = device_memory.own_bytes(reading, pid)
    uuid = reading.uuid if reading is not None else ""  # the daemon reads the device by it
    if own is None:
        return MemoryFigures(torch_reserved_bytes, SOURCE_TORCH, free, total, uuid)
    return MemoryFigures(own, SOURCE_NVML, free, total, uuid)


def memory_in_use(device: torch.device | None) -> int:
    """This worker's own memory: see memory_figures."""
    return memory_figures(device).own_bytes


def freeze_idle_heap(collect: bool = True) -> None:
    """Move the idle worker's heap (torch, vLLM, everything imported) out of the GC's reach.

    vLLM's model loader runs gc.collect() twice per load; over an unfrozen warm heap that
    cost 1.2 s of a CPU attach. vLLM freezes its own heap after warm-up the same way; the
    attach's objects stay unfrozen (compat.keep_attach_heap_unfrozen), so the teardown's
    collections and the clean check after a detach scan those, not the import heap; what
    survives a clean detach is frozen here once that check has passed.
    """
    if collect:
        gc.collect()
    gc.freeze()
