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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

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


def engine_args(mode: str, on_gpu: bool) -> list[str]:
    """`vllm serve` arguments of the warm-up attach. The KV cache is kept small (the
    warm-up must fit beside nothing else on the device but should not take it all);
    max_num_seqs and the batching limits stay at vLLM's defaults, because vLLM's kernel
    warm-up sizes its dummy batch from them, and so picks the specialization compiled."""
    args = ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(512 << 20),
            "--served-model-name", "kernel-warmup", "--disable-log-stats"]
    if on_gpu:
        args += ["--dtype", "bfloat16"]
    if mode == "eager":
        args.append("--enforce-eager")
    return args


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
    """Attach the built-in warm-up model to this new worker (WARMING) alone, then detach
    it; the worker measures its idle footprint again afterwards. It is IDLE after, warm-up
    done or not: a failed warm-up leaves a usable worker, and turns the warm-up off for
    later workers rather than letting them fail alike."""
    import time
    import uuid

    from vllm_pool.states import WorkerState, transition

    t0 = time.perf_counter()
    mode = pool.cfg.kernel_warmup
    try:
        if mode == "off":  # turned off by another worker's failed warm-up
            return
        with _model_lock:
            model = ensure_model()
        with pool.lock:
            if pool.stopping or w.state != WorkerState.WARMING or w.instance_id is not None:
                return
            inst = pool.lease(uuid.uuid4().hex[:12], f"{NAME_PREFIX}{w.slot}", model, 1, 1,
                              None, engine_args(mode, w.device.startswith("cuda")), {},
                              [w.slot], "", kernel_warmup=True)
        logger.info("worker %d: kernel warm-up attach (%s) of the built-in model", w.slot, mode)
        pool.launch(inst, pool.cfg.worker_start_timeout)
        pool.detach(inst.id, park=False)
        w.kernel_warmup_s = time.perf_counter() - t0
        logger.info("worker %d: kernel warm-up done in %.1fs (attach %.1fs)", w.slot,
                    w.kernel_warmup_s, inst.phases.get("total", 0.0))
    except Exception as e:  # noqa: BLE001 - a failed warm-up must not take the pool down
        logger.error("worker %d: kernel warm-up failed, turning it off for this pool: %s",
                     w.slot, e)
        pool.cfg.kernel_warmup = "off"
    finally:
        with pool.lock:
            if w.state == WorkerState.WARMING:
                transition(w, WorkerState.IDLE, instance_id=None)
