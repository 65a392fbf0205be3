"""Why a worker is unclean after a detach, for its log: the attach's surviving objects and
the largest live device tensors, each with the chain of objects that keeps it alive (so
the holder can be named and released in teardown), its threads, and PyTorch's pools.
Diagnostics only: the clean check in reset.py decides; this only explains.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch

from vllm_pool.worker.reset import memory_figures, new_attach_objects, torch_reserved


def describe_live_objects(device, live_baseline: dict[str, int] | None = None,
                          top: int = 3, depth: int = 12) -> str:
    """For an unclean worker's log: live threads, the attach's surviving objects and the
    largest live device tensors, each with the chain of objects that keeps it alive, so
    the holder can be named and released in teardown."""
    import sys
    import threading

    lines = ["threads: " + ", ".join(t.name for t in threading.enumerate())]
    frames = sys._current_frames()
    for t in threading.enumerate():
        f = frames.get(t.ident)
        if f is not None and t is not threading.current_thread():
            lines.append(f"  {t.name}: {_frame_desc(f)} <- {_frame_desc(f.f_back) if f.f_back else ''}")
    alive = new_attach_objects(live_baseline or {})
    survivors = [o for o in gc.get_objects() if type(o).__name__ in alive]
    for obj in survivors[:top]:
        lines.append(f"  {type(obj).__qualname__}: {referrer_chain(obj, depth, {id(survivors)})}")
    del survivors
    if device is not None and device.type == "cuda":
        lines.append(describe_cuda_memory(device))
    lines.append(describe_live_tensors(device, top, depth))
    return "\n".join(lines)


def describe_cuda_memory(device) -> str:
    """What of the device memory in use PyTorch's allocator holds, and in which pools
    (a pool id other than (0, 0) is a CUDA graph's private pool)."""
    figs = memory_figures(device)
    line = (f"cuda: this process {figs.own_bytes / 2**20:.0f} MiB ({figs.source}), device "
            f"free {figs.device_free_bytes / 2**20:.0f} of "
            f"{figs.device_total_bytes / 2**20:.0f} MiB, torch reserved "
            f"{torch_reserved(device) / 2**20:.0f} MiB, allocated "
            f"{torch.cuda.memory_allocated(device) / 2**20:.0f} MiB")
    try:
        pools: dict[str, list[int]] = {}
        for seg in torch.cuda.memory_snapshot():
            if seg.get("device") != device.index:
                continue
            p = pools.setdefault(str(seg.get("segment_pool_id")), [0, 0])
            p[0] += 1
            p[1] += int(seg.get("total_size", 0))
        line += "; segments by pool: " + ", ".join(
            f"{k}: {n} = {b / 2**20:.0f} MiB" for k, (n, b) in pools.items())
    except Exception as e:  # noqa: BLE001 - diagnostics only
        line += f"; no snapshot: {e}"
    return line


def _frame_desc(f) -> str:
    return f"frame {f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"


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
    obj = None
    found.sort(key=lambda t: t.numel() * t.element_size(), reverse=True)
    lines = [f"{len(found)} live tensors on {device} (views counted apart)"]
    for t in found[:top]:
        lines.append(f"  {tuple(t.shape)} {t.dtype}: {referrer_chain(t, depth, {id(found)})}")
    return "\n".join(lines)


def referrer_chain(obj, depth: int = 8, ignore: set[int] | None = None) -> str:
    """'list <- Runner.kv_caches': who holds `obj`. Breadth-first up the referrers to the
    nearest named holder (an object attribute, a module global or a thread's frame),
    through containers (lists, dicts, cells, tuples), skipping our own stack."""
    import inspect
    import sys

    ignore = set(ignore or ())
    f = sys._getframe()
    while f is not None:
        ignore.add(id(f))
        f = f.f_back
    parent: dict[int, tuple[Any, Any]] = {id(obj): (obj, None)}
    level = [obj]
    ignore.add(id(parent))
    ignore.add(id(level))
    for _ in range(depth):
        nxt: list = []
        ignore.add(id(nxt))
        for cur in level:
            refs = gc.get_referrers(cur)
            ignore.add(id(refs))
            for r in refs[:64]:
                if id(r) in ignore or id(r) in parent:
                    continue
                parent[id(r)] = (r, cur)
                named = inspect.isframe(r) or _holds_as_attribute(r, cur) or (
                    isinstance(r, dict) and "__name__" in r and "__builtins__" in r)
                if named:
                    return _path(r, parent)
                nxt.append(r)
        if not nxt:
            break
        level = nxt[:256]
    return "(no named holder found: a C extension or a cycle root)"


def _holds_as_attribute(holder, obj) -> bool:
    """holder.x is obj, or obj is holder's __dict__ (Python 3.11+ makes it lazily)."""
    try:
        d = vars(holder)
    except TypeError:
        return False
    return d is obj or any(v is obj for v in d.values())


def _path(top, parent) -> str:
    import inspect

    chain, node = [], top
    while node is not None:
        obj, child = parent[id(node)]
        if child is None:
            break
        if inspect.isframe(obj):
            desc = _frame_desc(obj)
        elif isinstance(obj, dict):
            key = next((k for k, v in obj.items() if v is child), None)
            name = obj.get("__name__") if "__builtins__" in obj else None
            desc = (f"module {name}" if name else "dict") + (f"[{key!r}]" if key is not None else "")
        else:
            desc = type(obj).__qualname__
            try:
                d = vars(obj)
            except TypeError:
                d = {}
            if d is child:  # held through its __dict__: name the attribute
                grandchild = parent[id(child)][1]
                attr = next((k for k, v in d.items() if v is grandchild), None)
            else:
                attr = next((k for k, v in d.items() if v is child), None)
            desc += f".{attr}" if attr is not None else ""
        chain.append(desc)
        node = child
    return " <- ".join(reversed(chain))
