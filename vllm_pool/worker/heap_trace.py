"""What a worker's heap keeps from one detach to the next (issue 19, item 6: the soak's RSS
slope), off unless `VLLM_POOL_HEAP_TRACE=1` is in the worker's environment.

After each detach it logs, against the first detach's figures: the Python allocations
that grew most (tracemalloc, by line), the object types whose live count grew most (gc),
and glibc's own heap figures (mallinfo2: bytes in use against bytes held from the OS), so
a growth of RSS can be told apart as Python objects, native allocations, or free memory
that the allocator does not give back.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import tracemalloc
from collections import Counter

logger = logging.getLogger("vllm_pool.worker")
ENV = "VLLM_POOL_HEAP_TRACE"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo() -> dict[str, int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):  # not glibc, or glibc before 2.33
        return None
    return {"held": m.arena + m.hblkhd, "in_use": m.uordblks + m.hblkhd, "free": m.fordblks}


def _types() -> Counter:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


class HeapTrace:
    def __init__(self):
        self.on = os.environ.get(ENV) == "1"
        self.first: tuple | None = None
        self.n = 0

    def after_detach(self, slot: int) -> None:
        if not self.on:
            return
        self.n += 1
        if not tracemalloc.is_tracing():
            # From the first detach on: tracing vLLM's import and the first attach would
            # slow the worker's start several times over, and only the growth counts.
            tracemalloc.start(8)
        now = (tracemalloc.take_snapshot(), _types(), _mallinfo())
        if self.first is None:
            self.first = now
            return
        snap0, types0, mall0 = self.first
        snap, types, mall = now
        lines = [f"worker {slot} heap after detach {self.n} against detach 1:"]
        for st in snap.compare_to(snap0, "lineno")[:12]:
            fr = st.traceback[0]
            where = fr.filename.split("site-packages/")[-1]
            lines.append(f"  py {st.size_diff / 1024:+9.1f} KiB {st.count_diff:+6d} "
                         f"{where}:{fr.lineno}")
        grew = Counter({k: types[k] - types0.get(k, 0) for k in types})
        lines.append("  objects: " + ", ".join(f"{k} {v:+d}" for k, v in grew.most_common(12)
                                               if v > 0))
        if mall and mall0:
            lines.append("  malloc: " + ", ".join(
                f"{k} {(mall[k] - mall0[k]) / 2**20:+.2f} MiB ({mall[k] / 2**20:.0f})"
                for k in mall))
        logger.info("\n".join(lines))
