"""Level-1 sleep that copies a model's weights to host memory once, not at every park.

vLLM's CuMemBackend copies every weight allocation into freshly pinned host memory at each
sleep (10.2 s for the 13.5 GiB of a 7B model on an H100: the pinning, not the copy, is the
slow part) and drops that copy at wake-up. Inference never writes weights, so the copy made
at the first park still holds the same bytes at every later one: this backend keeps it
after wake-up and lets vLLM's allocator discard those allocations at the next sleep
instead of copying them again. Wake-up is vLLM's own (copy back from the kept tensor).

The pool selects it (`compat.choose_sleep_backend`) only where weights stay read-only:
not with LoRA (adapters are written into buffers allocated at load) and not with
calculated KV scales. The kept copy is freed with the model at detach.
"""

from __future__ import annotations

from vllm.device_allocator.sleep_mode_backend import CuMemBackend

NAME = "vllm-pool-kept-copy"
_KEPT = "_vllm_pool_host_copy"     # attribute on vLLM's AllocationData
_PARKED_TAG = "_vllm_pool_kept"    # a tag vLLM's sleep does not offload: discard, no copy


def _allocations() -> list:
    from vllm.device_allocator import get_mem_allocator_instance

    return list(getattr(get_mem_allocator_instance(), "pointer_to_data", {}).values())


class KeptCopyBackend(CuMemBackend):
    def suspend(self, level: int = 1) -> None:
        if level != 1:
            return super().suspend(level)
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
        self.kept_bytes = sum(h.numel() * h.element_size() for _, h in kept)

    def resume(self, tags: list[str] | None = None) -> None:
        backups = {id(d): d.cpu_backup_tensor for d in _allocations()
                   if d.tag == "weights" and d.cpu_backup_tensor is not None}
        super().resume(tags)
        for d in _allocations():
            host = backups.get(id(d))
            if host is not None and d.cpu_backup_tensor is None:  # copied back: keep it
                setattr(d, _KEPT, host)
