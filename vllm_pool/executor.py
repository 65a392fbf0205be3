"""The engine-side executor: vLLM's MultiprocExecutor, with pool workers instead of
spawned ones.

Selected with `--distributed-executor-backend vllm_pool.executor.PoolExecutor` (the
daemon adds it to every attach, for every TP size including 1, where vLLM would
otherwise run the worker inside EngineCore). It creates the broadcast queue exactly as
vLLM does, then, instead of spawning, connects to the pool workers the daemon leased to
this instance (VLLM_POOL_LEASE) and sends each its AttachRequest: the whole VllmConfig,
its ranks, the rendezvous and the queue handle. The READY handshake and its order are
vLLM's. Everything after start-up (collective_rpc, execute_model, sample_tokens,
check_health) is inherited unchanged.

This module is imported by the API server and again by EngineCore, so it must import
without touching any device.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection

from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
from vllm.logger import init_logger
from vllm.v1.executor.multiproc_executor import FutureWrapper, MultiprocExecutor

from vllm_pool import compat
from vllm_pool.messages import (LEASE_ENV, RUN_DIR_ENV, AttachReply, AttachRequest, Detach,
                                LeaseInfo)

logger = init_logger(__name__)
# The engine's environment the workers need to behave as vLLM's own spawned workers
# would (they inherit it there). OpenMP binding and LD_PRELOAD are excluded: a pool worker
# fixed those at spawn for its own core.
_FORWARD_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "HUGGINGFACE_", "TOKENIZERS_",
                     "TORCH_", "TORCHINDUCTOR_", "TORCHDYNAMO_", "NCCL_", "CUDA_LAUNCH_BLOCKING",
                     "PYTORCH_", "TRITON_")
_NOT_FORWARDED = {LEASE_ENV, "VLLM_POOL_AUTHKEY", "VLLM_CPU_OMP_THREADS_BIND",
                  "CUDA_VISIBLE_DEVICES"}


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(_FORWARD_PREFIXES) and k not in _NOT_FORWARDED}


@dataclass
class PoolWorkerHandle:
    """Stands where vLLM keeps a WorkerProcHandle; there is no child process to own."""
    rank: int
    slot: int
    conn: Connection
    worker_response_mq: MessageQueue | None
    peer_worker_response_mqs: list = field(default_factory=list)


class PoolExecutor(MultiprocExecutor):
    supports_pp: bool = True

    def _init_executor(self) -> None:
        self._finalizer = weakref.finalize(self, self.shutdown)
        self.is_failed = False
        self.failure_callback = None
        self.workers: list[PoolWorkerHandle] = []

        tp_size, pp_size, pcp_size = self._get_parallel_sizes()
        assert self.world_size == tp_size * pp_size * pcp_size
        if self.parallel_config.nnodes_within_dp != 1 or self.local_world_size != self.world_size:
            raise NotImplementedError("vllm-pool attaches run on one node")
        raw = os.environ.get(LEASE_ENV)
        if not raw:
            raise RuntimeError(
                f"{type(self).__name__} needs a pool lease ({LEASE_ENV}); start the engine "
                "with `vllm-pool attach`, not `vllm serve`")
        lease = LeaseInfo.from_json(raw)
        if len(lease.workers) != self.world_size:
            raise RuntimeError(f"the pool leased {len(lease.workers)} workers but the engine "
                               f"needs world size {self.world_size} (TP x PP)")

        init_method = compat.distributed_init_method(os.environ.get(RUN_DIR_ENV, "/tmp"),
                                                     lease.instance_id)
        self.rpc_broadcast_mq = compat.make_broadcast_mq(
            self.world_size, self.local_world_size, self.parallel_config)
        handle = self.rpc_broadcast_mq.export_handle()
        if _kept_copy_backend() and compat.choose_sleep_backend(self.vllm_config,
                                                                 _kept_copy_backend()):
            logger.info("park copies weights to host memory once (%s)",
                        self.vllm_config.model_config.sleep_mode_backend)
        env = forwarded_env()
        authkey = bytes.fromhex(lease.authkey)
        conns: list[Connection] = []
        success = False
        try:
            # Send every request before waiting on any: init_device is collective.
            for rank, w in enumerate(lease.workers):
                conn = Client(w.address, family="AF_UNIX", authkey=authkey)
                conns.append(conn)
                conn.send(AttachRequest(
                    instance_id=lease.instance_id, token=lease.token,
                    vllm_config=self.vllm_config, local_rank=rank, rank=rank,
                    distributed_init_method=init_method, input_shm_handle=handle,
                    is_driver_worker=self._is_driver_worker(rank), env=env))
            replies: list[AttachReply] = []
            for w, conn in zip(lease.workers, conns):
                try:
                    replies.append(conn.recv())
                except EOFError:
                    replies.append(AttachReply(ok=False, error=f"pool worker {w.slot} died"))
            errors = [f"worker {w.slot}: {r.error}" for w, r in zip(lease.workers, replies)
                      if not r.ok]
            if errors:
                raise RuntimeError("pool workers failed to attach: " + "; ".join(errors))
            for rank, (w, conn, r) in enumerate(zip(lease.workers, conns, replies)):
                self.workers.append(PoolWorkerHandle(
                    rank=rank, slot=w.slot, conn=conn,
                    worker_response_mq=MessageQueue.create_from_handle(r.response_handle, 0)))
            if self.monitor_workers:
                self.start_worker_monitor()
            self.response_mqs = [w.worker_response_mq for w in self.workers]
            # Same order as vLLM: broadcast queue first, then each response queue.
            self.rpc_broadcast_mq.wait_until_ready()
            for mq in self.response_mqs:
                mq.wait_until_ready()
            self.futures_queue = deque[FutureWrapper]()
            self._post_init_executor()
            success = True
        finally:
            if not success:
                for conn in conns:
                    _close(conn)
        self.output_rank = self._get_output_rank()

    def start_worker_monitor(self, inline: bool = False) -> None:
        """A pool worker's connection turns readable only at EOF: it died."""
        workers = list(self.workers)
        self_ref = weakref.ref(self)

        def monitor() -> None:
            conns = [w.conn for w in workers]
            try:
                ready = multiprocessing.connection.wait(conns)
            except OSError:
                ready = conns
            _self = self_ref()
            if _self is None or getattr(_self, "shutting_down", False):
                return
            _self.is_failed = True
            slot = next((w.slot for w in workers if w.conn in ready), "?")
            logger.error("Pool worker %s died unexpectedly, shutting down executor.", slot)
            _self.shutdown()
            callback = _self.failure_callback
            if callback is not None:
                _self.failure_callback = None
                callback()

        if inline:
            monitor()
        else:
            threading.Thread(target=monitor, daemon=True, name="PoolWorkerMonitor").start()

    def shutdown(self) -> None:
        """Detach: the workers leave vLLM's busy loop and return to the pool."""
        if not getattr(self, "shutting_down", False):
            self.shutting_down = True
            for w in getattr(self, "workers", None) or []:
                try:
                    w.conn.send(Detach())
                except Exception:
                    pass
                _close(w.conn)
                if w.worker_response_mq is not None:
                    w.worker_response_mq.shutdown()
                    w.worker_response_mq = None
        if rpc_broadcast_mq := getattr(self, "rpc_broadcast_mq", None):
            rpc_broadcast_mq.shutdown()
            self.rpc_broadcast_mq = None
        if response_mqs := getattr(self, "response_mqs", None):
            for mq in response_mqs:
                if mq is not None:
                    mq.shutdown()
            self.response_mqs = []


def _close(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:
        pass


def _kept_copy_backend() -> str | None:
    """The pool's sleep backend's name, where this vLLM has the sleep-mode registry."""
    try:
        from vllm_pool.worker import sleep_backend
    except ImportError:
        return None
    return sleep_backend.NAME
