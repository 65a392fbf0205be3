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
    sigterm: Any = None
    sigint: Any = None
    class_bases: dict[type, tuple] = field(default_factory=dict)

    @classmethod
    def take(cls) -> "ProcessSnapshot":
        return cls(environ=dict(os.environ), set_num_threads=torch.set_num_threads,
                   sigterm=signal.getsignal(signal.SIGTERM),
                   sigint=signal.getsignal(signal.SIGINT))

    def remember_worker_class(self, vllm_config: Any) -> None:
        """worker_extension_cls rewrites the worker class's bases in place."""
        qualname = getattr(vllm_config.parallel_config, "worker_cls", None)
        if not isinstance(qualname, str) or qualname == "auto":
            return
        try:
            from vllm.utils.import_utils import resolve_obj_by_qualname
        except ImportError:  # pragma: no cover - older layout
            from vllm.utils import resolve_obj_by_qualname  # type: ignore
        try:
            klass = resolve_obj_by_qualname(qualname)
            self.class_bases[klass] = klass.__bases__
        except Exception:  # the attach will fail on it with vLLM's own error
            pass

    def restore(self) -> None:
        for k in list(os.environ):
            if k not in self.environ:
                del os.environ[k]
        os.environ.update(self.environ)
        torch.set_num_threads = self.set_num_threads
        signal.signal(signal.SIGTERM, self.sigterm)
        signal.signal(signal.SIGINT, self.sigint)
        for klass, bases in self.class_bases.items():
            if klass.__bases__ != bases:
                klass.__bases__ = bases


def teardown(proc: Any) -> None:
    """Release everything a PoolWorkerProc built. Never raises."""
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    # vLLM freezes the GC heap after start-up (freeze_gc_heap): frozen objects are never
    # collected, so the whole model runner, KV cache included, would survive the detach.
    steps = [("gc unfreeze", gc.unfreeze)]
    if proc is not None:
        steps += [
            ("async output thread", proc.stop_async_output_thread),
            ("broadcast queue", lambda: proc.rpc_broadcast_mq and proc.rpc_broadcast_mq.shutdown()),
            ("response queue", lambda: proc.worker_response_mq and proc.worker_response_mq.shutdown()),
            ("worker shutdown", lambda: proc.worker.shutdown()),
            ("drop model runner", lambda: _drop_model(proc)),
        ]
    steps += [
        ("gc", gc.collect),
        ("model parallel groups", destroy_model_parallel),
        ("distributed environment", destroy_distributed_environment),
        ("dynamo", torch.compiler.reset),
        ("vllm globals", compat.reset_vllm_globals),
        ("gc", gc.collect),
    ]
    if torch.cuda.is_available():
        steps.append(("cuda cache", torch.cuda.empty_cache))
    for name, step in steps:
        try:
            step()
        except Exception as e:  # keep going: the clean check decides the worker's fate
            logger.warning("teardown step %s failed: %s", name, e)


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


def clean_check(device: torch.device | None, baseline: int, slack: int) -> str | None:
    """None when clean, else what is wrong. Run after teardown, before reporting idle."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "torch.distributed is still initialised"
    used = memory_in_use(device)
    if device is not None and device.type == "cuda" and used - baseline > slack:
        return (f"device memory {used / 2**20:.0f} MiB is more than {slack / 2**20:.0f} MiB "
                f"above the idle baseline {baseline / 2**20:.0f} MiB")
    try:  # a small kernel still runs on the device
        x = torch.ones(8, device=device or "cpu")
        if float((x + x).sum()) != 16.0:
            return "device check kernel gave a wrong result"
    except Exception as e:
        return f"device check kernel failed: {e}"
    return None


def describe_live_tensors(device, top: int = 3, depth: int = 8) -> str:
    """For an unclean worker's log: the largest live tensors on the device and the chain
    of objects that keeps each alive, so the leak can be found and added to teardown."""
    found = []
    for obj in gc.get_objects():
        try:
            # Real storage only: fake and symbolic tensors from compile caches hold none.
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device == device \
                    and isinstance(obj.numel(), int):
                found.append(obj)
        except Exception:
            continue
    found.sort(key=lambda t: t.numel() * t.element_size(), reverse=True)
    lines = [f"{len(found)} live tensors on {device} (views counted apart)"]
    for t in found[:top]:
        lines.append(f"  {tuple(t.shape)} {t.dtype}: {referrer_chain(t, depth, {id(found)})}")
    return "\n".join(lines)


def referrer_chain(obj, depth: int = 8, ignore: set[int] | None = None) -> str:
    """'list <- GPUModelRunner.kv_caches <- dict['runner'] <- ...': who holds `obj`, upwards."""
    import inspect

    ignore = set(ignore or ())
    path, cur = [], obj
    for _ in range(depth):
        refs = gc.get_referrers(cur)
        ignore.add(id(refs))
        refs = [r for r in refs if id(r) not in ignore and not inspect.isframe(r)]
        if not refs:
            path.append("(nothing: a frame, a C extension or a cycle root)")
            break
        r = refs[0]
        desc = type(r).__qualname__
        if isinstance(r, dict):
            key = next((k for k, v in r.items() if v is cur), None)
            desc += f"[{key!r}]" if key is not None else ""
        elif hasattr(r, "__dict__"):
            attr = next((k for k, v in vars(r).items() if v is cur), None)
            desc += f".{attr}" if attr is not None else ""
        path.append(desc + (f" (+{len(refs) - 1} more)" if len(refs) > 1 else ""))
        cur = r
    return " <- ".join(path)


def memory_in_use(device: torch.device | None) -> int:
    """Device memory in use on this worker's GPU (all processes), or this process's RSS."""
    if device is not None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
