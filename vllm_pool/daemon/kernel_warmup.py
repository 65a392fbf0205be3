"""Kernel warm-up: one attach of a built-in tiny model on each new worker, before it is free.

What it moves off the first real attach is what a process pays once and no model owns
(measured on the H100, docs/performance.md): Triton compiling vLLM's sampling and input
kernels in `warmup_kernels` (15-18 s with an empty Triton cache), Triton's launcher build,
CUDA modules of the attention and custom-op kernels, and, with `compiled`, Inductor's own
first-use set-up. It runs vLLM's own start-up path (an ordinary attach through the pool),
so nothing of vLLM is copied to know which kernels those are.

Triton compiles per specialization of a kernel's arguments (dtype of the logits,
divisibility of sizes by 16), so the model is built to land in the common class: bfloat16
on GPUs, a vocabulary of 32000 (a multiple of 16, as the vocabularies of most models are).
A model outside that class still pays for its own kernels on its first attach to a worker.

On a device that another model holds, the warm-up asks vLLM for only the memory that is
free (`memory_args`), waits while even that is too little, and is retried with a backoff
when it fails (`run`): per worker, shown on it (`WarmupStatus`), never turned off for the
pool. A worker whose first try failed or waits is free meanwhile; it just has not paid
its once-per-process costs yet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from vllm_pool.states import WorkerState, transition

logger = logging.getLogger("vllm_pool.daemon")

MODES = ("auto", "off", "eager", "compiled")
NAME_PREFIX = "kernel-warmup-"
_VOCAB = 32000
_STAMP = {"size": "tiny", "seed": 0, "vocab": 2048, "layers": None, "v": 1, "model_vocab": _VOCAB}


def resolve_mode(mode: str, on_gpu: bool) -> str:
    """`auto`: compiled on GPUs; off on CPU, where vLLM has no Triton kernels to compile."""
    if mode == "auto":
        return "compiled" if on_gpu else "off"
    return mode


def engine_args(mode: str, on_gpu: bool, memory: list[str] | None = None) -> list[str]:
    """`vllm serve` arguments of the warm-up attach. The KV cache is kept small (the
    warm-up must fit beside other models on the device); max_num_seqs and the batching
    limits stay at vLLM's defaults, because vLLM's kernel warm-up sizes its dummy batch
    from them, and so picks the specialization compiled. `memory`: from memory_args."""
    args = ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--served-model-name", "kernel-warmup", "--disable-log-stats"]
    if on_gpu:
        args += ["--dtype", "bfloat16"]
    if mode == "eager":
        args.append("--enforce-eager")
    return args + list(memory or [])


# ---- room on a device that other models use -----------------------------------------
KV_CACHE_BYTES = 512 << 20
# What the warm-up engine takes on the device at most, with room to spare: its KV cache,
# the profile run's activations and logits (2048 tokens x 32000), the sampler's dummy
# batch, CUDA graphs and attention workspaces; the 4M-parameter weights are 8 MiB.
NEED_BYTES = 3 << 30
# Free memory moves between the reading here and vLLM's own at start-up.
MARGIN_BYTES = 1 << 30
MAX_UTILIZATION = 0.9


def memory_args(free: int, total: int) -> tuple[list[str], str | None]:
    """(`--gpu-memory-utilization` for the warm-up, None), or ([], why it must wait).

    vLLM 0.26-0.32 refuses to start when the device's free memory is below utilization x
    total (`request_memory` in v1/worker/utils.py, on the whole device's free memory),
    whatever `--kv-cache-memory-bytes` says; with that flag set, the utilization serves
    that check only (no profiling sizes the KV cache from it), so the warm-up asks for
    the free memory less a margin. No reading (CPU): nothing, vLLM's default."""
    if total <= 0:
        return [], None
    if free < NEED_BYTES:
        return [], (f"{free / 2**20:.0f} MiB free on the device, the warm-up needs "
                    f"{NEED_BYTES / 2**20:.0f} MiB: waiting for room")
    # Rounded down, so utilization x total never exceeds free less the margin.
    util = min(MAX_UTILIZATION, math.floor(1e4 * (free - MARGIN_BYTES) / total) / 1e4)
    return ["--gpu-memory-utilization", f"{util:.4f}"], None


def need_only_args(total: int) -> list[str]:
    """Where the daemon cannot read the device again (no NVML): ask for what the warm-up
    needs, and let vLLM's own check say whether it is free (a failure is retried)."""
    util = min(1.0, math.ceil(1e4 * NEED_BYTES / total) / 1e4)
    return ["--gpu-memory-utilization", f"{util:.4f}"]


# ---- retries, per worker ----------------------------------------------------------------
RETRY_FIRST_S = 15.0      # after the first failure; doubles after each further one
RETRY_MAX_S = 600.0
MAX_FAILURES = 6          # then the worker serves without it (shown as failed)
ROOM_POLL_S = 5.0         # how often a warm-up waiting for room reads the device again
BUSY_POLL_S = 1.0         # the worker serves a model: try when it is idle again


@dataclass
class WarmupStatus:
    """One worker process's kernel warm-up, as `ls` and GET /workers show it."""
    state: str = "pending"          # pending|running|waiting|retrying|done|failed|off
    attempts: int = 0               # warm-up attaches started
    failures: int = 0
    error: str | None = None        # the last failure, or why it waits
    retry_at: float | None = None   # time.time() of the next try
    released: bool = False          # a try failed or waited: the worker is free between tries

    def view(self) -> dict:
        return {"state": self.state, "attempts": self.attempts, "failures": self.failures,
                "error": self.error, "retry_at": self.retry_at}


def retry_delay(failures: int) -> float:
    """Seconds before the next try after `failures` failed ones: 15, 30, 60 ... 600."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, failures - 1))


def note_failure(st: WarmupStatus, error: str, now: float) -> None:
    st.failures += 1
    st.error = error
    if st.failures >= MAX_FAILURES:
        st.state, st.retry_at = "failed", None
    else:
        st.state, st.retry_at = "retrying", now + retry_delay(st.failures)


def note_wait(st: WarmupStatus, reason: str, now: float) -> None:
    """Too little room is no failure: read again soon, without a count towards the end."""
    st.state, st.error, st.retry_at = "waiting", reason, now + ROOM_POLL_S


def retry_loop(w, attempt: Callable[[list[str]], bool], release: Callable[[], None],
               stopping: Callable[[], bool], now: Callable[[], float] = time.time,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Warm one worker process up, retrying until done, failed for good, or the process
    is gone. `w`: its WorkerHandle (WARMING, or IDLE between tries). `attempt(memory_args)`
    runs one warm-up attach and detach; False when the worker was taken, raises when the
    warm-up failed. `release()` makes the worker free while a retry is pending."""
    st, pid = w.warmup_status, w.pid
    on_gpu = w.device.startswith("cuda")

    def free_meanwhile():
        st.released = True
        release()

    while not stopping() and w.pid == pid and w.state != WorkerState.STOPPED:
        t = now()
        if st.retry_at is not None and t < st.retry_at:
            sleep(min(BUSY_POLL_S, st.retry_at - t))
            continue
        if w.state not in (WorkerState.IDLE, WorkerState.WARMING) or w.instance_id is not None:
            sleep(BUSY_POLL_S)
            continue
        _own, free, total = w.memory_now()
        memory, wait = memory_args(free, total) if on_gpu else ([], None)
        if wait and not w.device_uuid:  # a stale figure: waiting on it could last forever
            memory, wait = need_only_args(total), None
        if wait:
            if st.state != "waiting":
                logger.info("worker %d: kernel warm-up waits: %s", w.slot, wait)
            note_wait(st, wait, t)
            free_meanwhile()
            continue
        st.state, st.retry_at = "running", None
        st.attempts += 1
        try:
            if not attempt(memory):  # taken in the meantime: not a try
                st.attempts -= 1
                st.state = "retrying" if st.failures else "pending"
                sleep(BUSY_POLL_S)
                continue
        except Exception as e:  # noqa: BLE001 - this worker's warm-up, not the pool's
            if w.pid != pid or stopping():
                return
            note_failure(st, str(e)[-2000:], now())
            if st.state == "failed":
                logger.error("worker %d: kernel warm-up failed %d times, serving without it: "
                             "%s", w.slot, st.failures, e)
                free_meanwhile()
                return
            logger.warning("worker %d: kernel warm-up failed (%d of %d), retrying in %.0fs: "
                           "%s", w.slot, st.failures, MAX_FAILURES, st.retry_at - now(), e)
            free_meanwhile()
            continue
        st.state, st.error, st.retry_at = "done", None, None
        return


def model_dir(cache_root: str | None = None) -> str:
    root = cache_root or os.environ.get("VLLM_POOL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-pool")
    return os.path.join(root, "kernel-warmup-model")


def ensure_model(cache_root: str | None = None) -> str:
    """Build the warm-up model once (a few seconds, in a subprocess: the daemon does not
    import torch); later pools reuse it. Built aside and renamed, so a concurrent build
    or a crash never leaves a half-written model in place."""
    out = model_dir(cache_root)
    stamp_path = os.path.join(out, "vllm_pool_fixture.json")
    try:
        with open(stamp_path) as f:
            if json.load(f) == _STAMP:
                return out
    except (OSError, ValueError):
        pass
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kernel-warmup-", dir=parent)
    try:
        subprocess.run([sys.executable, "-m", "vllm_pool.testing.tiny_model", tmp,
                        "--model-vocab", str(_VOCAB)], check=True, capture_output=True,
                       text=True, timeout=600)
        with open(os.path.join(tmp, "vllm_pool_fixture.json")) as f:
            if json.load(f) != _STAMP:
                raise RuntimeError("the warm-up model's stamp does not match this pool")
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"could not build the kernel warm-up model: {e.stderr[-2000:]}") \
            from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_model_lock = threading.Lock()  # one build, however many workers start at once


def run(pool, w) -> None:
    """The kernel warm-up of a new worker process (WARMING on entry), retried for this
    worker alone until it is done (retry_loop: room on a busy device, backoff, status on
    `w`). It is IDLE between tries and after: a worker without its warm-up still serves."""
    pid = w.pid

    def release() -> None:  # free while a retry is pending, and at the end
        with pool.lock:
            if w.pid == pid and w.state == WorkerState.WARMING and w.instance_id is None:
                transition(w, WorkerState.IDLE)

    try:
        retry_loop(w, lambda memory: _attempt(pool, w, pid, memory), release,
                   lambda: pool.stopping)
    finally:
        release()


def _attempt(pool, w, pid: int | None, memory: list[str]) -> bool:
    """Attach the built-in warm-up model to this worker alone, then detach it; the worker
    measures its idle footprint again afterwards. False when the worker was taken (or
    replaced); raises when the warm-up failed."""
    t0 = time.perf_counter()
    mode = pool.cfg.kernel_warmup
    with _model_lock:
        model = ensure_model()
    with pool.lock:
        if pool.stopping or w.pid != pid or w.instance_id is not None \
                or w.state not in (WorkerState.IDLE, WorkerState.WARMING):
            return False
        if w.state == WorkerState.IDLE:  # a retry: attaches wait for it rather than get 409
            transition(w, WorkerState.WARMING)
        inst = pool.lease(uuid.uuid4().hex[:12], f"{NAME_PREFIX}{w.slot}", model, 1, 1, None,
                          engine_args(mode, w.device.startswith("cuda"), memory), {},
                          [w.slot], "", kernel_warmup=True)
    logger.info("worker %d: kernel warm-up attach (%s) of the built-in model%s", w.slot, mode,
                f" ({' '.join(memory)})" if memory else "")
    pool.launch(inst, pool.cfg.worker_start_timeout)
    pool.detach(inst.id, park=False)
    w.kernel_warmup_s = time.perf_counter() - t0
    logger.info("worker %d: kernel warm-up done in %.1fs (attach %.1fs)", w.slot,
                w.kernel_warmup_s, inst.phases.get("total", 0.0))
    return True
