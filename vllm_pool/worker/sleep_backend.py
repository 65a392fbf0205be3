"""Level-1 sleep that copies a model's weights to host memory once, not at every park.

vLLM's CuMemBackend copies every weight allocation into freshly pinned host memory at each
sleep (12.45 s for the 13.65 GiB of a 7B model on an H100, about 1.1 GB/s) and drops that copy
at wake-up. Inference never writes weights, so the copy made
at the first park still holds the same bytes at every later one: this backend keeps it
after wake-up and lets vLLM's allocator discard those allocations at the next sleep
instead of copying them again. Wake-up is vLLM's own (copy back from the kept tensor).

The copy is made once, in the background while the model starts serving
(`start_host_copy`, called by the worker when the engine is ready), so that the first park
is as fast as the later ones; a park that comes before the copy is done waits for it.

The pool selects it (`compat.choose_sleep_backend`) only where weights stay read-only:
not with LoRA (adapters are written into buffers allocated at load) and not with
calculated KV scales. The kept copy is freed with the model at detach.
"""

from __future__ import annotations

import logging
import threading
import time

from vllm.device_allocator.sleep_mode_backend import CuMemBackend

NAME = "vllm-pool-kept-copy"
_KEPT = "_vllm_pool_host_copy"     # attribute on vLLM's AllocationData
_PARKED_TAG = "_vllm_pool_kept"    # a tag vLLM's sleep does not offload: discard, no copy
logger = logging.getLogger("vllm_pool.worker")


class _HostCopy:
    """The background copy of one model's weights to pinned host memory."""

    def __init__(self, device) -> None:
        self.device = device
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="PoolHostCopy")

    def _run(self) -> None:
        try:
            self._copy()
        except Exception as e:  # noqa: BLE001  the first park then copies, as vLLM's does
            logger.warning("background host copy of the weights stopped: %s", e)

    def _copy(self) -> None:
        import torch

        t0, n = time.perf_counter(), 0
        stream = torch.cuda.Stream(device=self.device)  # off the serving stream
        with torch.cuda.stream(stream):
            for d in _allocations():
                if self.stop.is_set():
                    return
                if d.tag != "weights" or d.is_asleep or getattr(d, _KEPT, None) is not None:
                    continue
                size, ptr = d.handle[1], d.handle[2]
                host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                host.copy_(torch.as_tensor(_DeviceBytes(ptr, size), device=self.device),
                           non_blocking=True)
                stream.synchronize()
                setattr(d, _KEPT, host)
                n += size
        logger.info("weights copied to host memory for parking: %.2f GiB in %.2fs",
                    n / 2**30, time.perf_counter() - t0)

    def wait(self) -> None:
        self.thread.join()


class _DeviceBytes:
    """A uint8 view of device memory that torch.as_tensor takes without copying."""

    def __init__(self, ptr: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3}


_COPY: _HostCopy | None = None


def start_host_copy(device) -> None:
    """Copy the weights to host memory now, in the background, for the first park."""
    global _COPY
    _COPY = _HostCopy(device)
    _COPY.thread.start()


def stop_host_copy() -> None:
    """Before the model's memory goes (detach): end the copy, never read freed memory."""
    global _COPY
    if _COPY is not None:
        _COPY.stop.set()
        _COPY.wait()
        _COPY = None


def _allocations() -> list:
    from vllm.device_allocator import get_mem_allocator_instance

    return list(getattr(get_mem_allocator_instance(), "pointer_to_data", {}).values())


class KeptCopyBackend(CuMemBackend):
    def suspend(self, level: int = 1) -> None:
        if level != 1:
            return super().suspend(level)
        if _COPY is not None:
            _COPY.wait()  # a park before the background copy ends waits for it
        kept = [(d, getattr(d, _KEPT)) for d in _allocations()
                if d.tag == "weights" and not d.is_asleep
                and getattr(d, _KEPT, None) is not None]
        for d, _ in kept:
            d.tag = _PARKED_TAG
        try:
            super().suspend(level)
        finally:
            for d, host in kept:
                d.tag = "weights"
                d.cpu_backup_tensor = host  # what vLLM's wake-up copies back from

    def resume(self, tags: list[str] | None = None) -> None:
        backups = {id(d): d.cpu_backup_tensor for d in _allocations()
                   if d.tag == "weights" and d.cpu_backup_tensor is not None}
        super().resume(tags)
        for d in _allocations():
            host = backups.get(id(d))
            if host is not None and d.cpu_backup_tensor is None:  # copied back: keep it
                setattr(d, _KEPT, host)
