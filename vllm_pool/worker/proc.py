"""vLLM's WorkerProc, built inside a long-lived pool worker instead of a fresh process.

The constructor is vLLM's own (init_worker, init_device with distributed init among the
assigned peers only, load_model, message queues); we add timing of each phase and a way
out of the async-output thread, whose base loop never returns and would otherwise keep
the whole model runner alive after detach.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from vllm.v1.executor.multiproc_executor import WorkerProc

from vllm_pool import compat
from vllm_pool.messages import AttachRequest

_STOP = object()  # sentinel ending the async output thread


class PoolWorkerProc(WorkerProc):
    def __init__(self, req: AttachRequest, phases: dict[str, float],
                 on_init_done: Callable[[], None] | None = None,
                 on_phase: Callable[[str, float], None] | None = None):
        self.phases = phases
        self._on_init_done = on_init_done
        self._on_phase = on_phase  # each phase as it ends, so the attach shows progress
        self._t = time.perf_counter()
        self._title_calls = 0
        super().__init__(
            vllm_config=req.vllm_config,
            local_rank=req.local_rank,
            rank=req.rank,
            distributed_init_method=req.distributed_init_method,
            input_shm_handle=req.input_shm_handle,
            shared_worker_lock=None,  # only used by the shm multimodal cache
            is_driver_worker=req.is_driver_worker,
        )
        self._wrap_rpcs()

    def _lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self._t)
        self._t = now
        self._report(name)

    def _report(self, name: str) -> None:
        if self._on_phase is not None:
            self._on_phase(name, self.phases[name])

    # WorkerProc.__init__ calls this after init_worker and again after init_device.
    def setup_proc_title_and_log_prefix(self, enable_ep: bool) -> None:  # type: ignore[override]
        self._title_calls += 1
        if self._title_calls == 2:
            self._lap("worker_init")
        WorkerProc.setup_proc_title_and_log_prefix(enable_ep)

    # ...and this right after load_model.
    def _init_message_queues(self, input_shm_handle, vllm_config) -> None:
        self._lap("weight_load")
        super()._init_message_queues(input_shm_handle, vllm_config)

    def _wrap_rpcs(self) -> None:
        """Time the engine's start-up RPCs (they arrive through the busy loop)."""
        wrapper = self.worker
        inner = wrapper.worker

        def timed(obj: Any, method: str, phase: str, after: Callable[[], None] | None = None):
            fn = getattr(obj, method, None)
            if fn is None:
                return

            def run(*args, **kwargs):
                if kwargs.get("profile_only"):  # 0.32 sizes graph memory while profiling
                    return fn(*args, **kwargs)
                if after is not None:
                    compat.warmup_sink(self.phases)  # parts of the warm-up, by name
                t0 = time.perf_counter()
                ok = False
                try:
                    out = fn(*args, **kwargs)
                    ok = True
                    return out
                finally:
                    self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0
                    if after is not None:
                        compat.warmup_sink(None)
                        after()
                    elif ok:
                        self._report(phase)
            setattr(obj, method, run)

        timed(wrapper, "determine_available_memory", "memory_profiling")
        timed(wrapper, "initialize_from_config", "kv_cache")
        runner = getattr(inner, "model_runner", None)
        if runner is not None:
            timed(runner, "capture_model", "graph_capture")
        timed(wrapper, "compile_or_warm_up_model", "model_warmup", after=self._init_done)

    def _init_done(self) -> None:
        # compile_or_warm_up_model is the engine's last start-up RPC.
        self.phases["model_warmup"] -= self.phases.get("graph_capture", 0.0)
        self._report("model_warmup")
        cc = getattr(self.worker.vllm_config, "compilation_config", None)
        self.phases["compile"] = float(getattr(cc, "compilation_time", 0.0) or 0.0)
        if "vllm_pool.worker.sleep_backend" in sys.modules:  # registered at the worker's start
            from vllm_pool.worker import sleep_backend

            compat.start_host_copy_for_parking(
                self.worker.vllm_config, getattr(self.worker, "device", None),
                sleep_backend.NAME, sleep_backend.start_host_copy)
        if self._on_init_done is not None:
            self._on_init_done()

    def async_output_busy_loop(self) -> None:
        from vllm.platforms import current_platform

        if hasattr(self.worker, "device"):
            current_platform.set_device(self.worker.device)
        while True:
            output = self.async_output_queue.get()
            if output is _STOP:
                return
            self.enqueue_output(output)

    def stop_async_output_thread(self) -> None:
        thread = getattr(self, "async_output_copy_thread", None)
        if thread is not None and thread.is_alive():
            self.async_output_queue.put(_STOP)
            thread.join(timeout=10)
