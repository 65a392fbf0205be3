"""The pool worker process: warm, model-free, serving one attach at a time.

Started by the daemon, one per device. It imports torch and vLLM, makes its device ready
(GPU: a CUDA context on its own GPU while seeing all pool GPUs; CPU: OpenMP bound to its
core by the spawn environment), reports IDLE and waits. An engine's executor connects to
its Unix socket with the pool's key and sends an AttachRequest; the worker builds vLLM's
WorkerProc in place, answers READY, runs vLLM's busy loop until the engine detaches or
dies, tears everything down, checks it is clean and reports IDLE again, same PID.

Channels: commands from the daemon arrive as JSON lines on --cmd-fd (EOF there means
the daemon died: the worker exits, so no worker outlives its pool); events go back as
JSON lines on --evt-fd.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener

_T_START = time.perf_counter()

import setproctitle  # noqa: E402  (cheap; lets ps show the slot while importing)

logger = logging.getLogger("vllm_pool.worker")


class Session:
    """One attach: the executor's connection and how it ends."""

    def __init__(self, conn: Connection, instance_id: str):
        self.conn = conn
        self.instance_id = instance_id
        self.proc = None
        self.ready = False
        self.ended = threading.Event()
        self.reason = ""
        self.lock = threading.Lock()

    def end(self, reason: str) -> None:
        """Leave vLLM's busy loop: shut the reader side of the queues, as vLLM's own
        death-pipe monitor does. Callable from any thread, more than once."""
        with self.lock:
            if not self.ended.is_set():
                self.reason = reason
                self.ended.set()
            proc = self.proc
        if proc is not None:
            for mq in (proc.rpc_broadcast_mq, proc.worker_response_mq):
                if mq is not None:
                    mq.shutdown()


class PoolWorker:
    def __init__(self, args: argparse.Namespace):
        self.slot = args.slot
        self.device_spec = args.device
        self.socket_path = args.socket
        self.authkey = bytes.fromhex(os.environ.pop("VLLM_POOL_AUTHKEY"))
        self.evt = os.fdopen(args.evt_fd, "wb", buffering=0)
        self.cmd = os.fdopen(args.cmd_fd, "rb")
        self.evt_lock = threading.Lock()
        self.lease = None
        self.session: Session | None = None
        self.stopping = False
        self.device = None
        self.baseline = None  # reset.IdleBaseline, measured after warm-up
        self.start_s = 0.0
        self.slack = int(args.memory_slack_mib) * 2**20
        self.context_allowance = int(args.context_memory_mib) * 2**20
        from vllm_pool.worker.heap_trace import HeapTrace

        self.heap_trace = HeapTrace()  # off unless VLLM_POOL_HEAP_TRACE=1

    # ---- events ---------------------------------------------------------------
    def emit(self, kind, **kw) -> None:
        """Report this process's phase (a messages.Event class) with its memory in use."""
        from vllm_pool import messages
        from vllm_pool.worker.reset import memory_figures

        if kind is messages.Idle:
            kw.update(baseline_bytes=self.baseline.device_bytes if self.baseline else 0,
                      start_s=self.start_s)
        figs = memory_figures(self.device)
        ev = kind(pid=os.getpid(), memory_bytes=figs.own_bytes, memory_source=figs.source,
                  device_free_bytes=figs.device_free_bytes,
                  device_total_bytes=figs.device_total_bytes, device_uuid=figs.device_uuid,
                  **kw)
        with self.evt_lock:
            try:
                self.evt.write(messages.encode(ev))
            except (BrokenPipeError, OSError):
                os._exit(0)  # the daemon is gone

    # ---- start-up --------------------------------------------------------------
    def start_up(self) -> None:
        from vllm_pool import compat

        # Range, every symbol the pool uses (a missing one fails the warm-up, naming it) and
        # the signatures it was written for (a changed one is logged): the compat tests'
        # own check.
        compat.check_vllm()
        self.device = compat.prepare_worker_process(self.device_spec)
        compat.time_warmup_parts()
        try:
            from vllm_pool.worker import sleep_backend
        except ImportError:  # no sleep-mode registry in this vLLM: vLLM's own sleep
            pass
        else:
            compat.register_sleep_backend(sleep_backend.NAME, sleep_backend.__name__,
                                          sleep_backend.KeptCopyBackend.__name__)
        compat.key_startup_plan_by_memory_share()
        compat.keep_attach_heap_unfrozen()
        if not compat.share_compile_cache_by_architecture():
            logger.warning("compile cache stays per model path: a compile-key site is missing")
        for part, secs in compat.prepay_once_per_process(self.device).items():
            logger.info("worker %d paid %s at start: %.2fs", self.slot, part, secs)
        from vllm_pool.worker.reset import (IdleBaseline, clean_check, device_uuid,
                                            freeze_idle_heap)

        self.baseline = IdleBaseline.measure(self.device)
        if self.device.type == "cuda":
            from vllm_pool import device_memory

            if self.baseline.source == "nvml":
                logger.info("worker %d: own device memory from NVML (%s): %.0f MiB idle",
                            self.slot, device_uuid(self.device),
                            self.baseline.device_bytes / 2**20)
            else:
                logger.warning("worker %d: NVML gives no per-process device memory (%s); "
                               "the clean check covers PyTorch's allocator only", self.slot,
                               device_memory.unavailable_reason()
                               or "no figure for this process")
        err = clean_check(self.device, self.baseline, 1 << 62, 0)
        if err:
            raise RuntimeError(err)
        freeze_idle_heap()
        self.start_s = time.perf_counter() - _T_START

    # ---- daemon commands ---------------------------------------------------------
    def command_loop(self) -> None:
        from vllm_pool import messages

        for line in self.cmd:
            try:
                cmd = messages.decode_command(line)
            except Exception as e:
                logger.warning("bad command from daemon: %s", e)
                continue
            if isinstance(cmd, messages.Lease):
                self.lease = cmd
            elif isinstance(cmd, messages.Release):
                if self.lease is not None and self.lease.instance_id == cmd.instance_id:
                    self.lease = None
                s = self.session
                if s is not None and s.instance_id == cmd.instance_id:
                    s.end("released")
            elif isinstance(cmd, messages.Abort):
                s = self.session
                if s is not None and s.instance_id == cmd.instance_id:
                    self._end_session(s, "aborted by the pool")
            elif isinstance(cmd, messages.Shutdown):
                self.shutdown("pool shutdown")
        self.shutdown("daemon gone")  # EOF: never outlive the pool

    def shutdown(self, reason: str) -> None:
        self.stopping = True
        s = self.session
        if s is not None:
            self._end_session(s, reason)
        # Wake the accept() in the main thread.
        try:
            Client(self.socket_path, family="AF_UNIX", authkey=self.authkey).close()
        except Exception:
            pass
        if reason == "daemon gone":
            time.sleep(5)
            os._exit(0)

    def _end_session(self, s: Session, reason: str) -> None:
        if not s.ready:
            # vLLM's worker construction (distributed init, load) cannot be interrupted:
            # a half-built worker is not trusted again. The daemon respawns this slot.
            from vllm_pool import messages

            self.emit(messages.Failed, instance_id=s.instance_id,
                      error=f"attach interrupted ({reason})")
            os._exit(1)
        s.end(reason)

    # ---- attach ----------------------------------------------------------------
    def watch(self, s: Session) -> None:
        """The executor's connection is this attach's death pipe."""
        from vllm_pool.messages import Detach

        try:
            while True:
                msg = s.conn.recv()
                if isinstance(msg, Detach):
                    s.end(msg.reason)
                    return
        except (EOFError, OSError):
            if not s.ended.is_set():
                self._end_session(s, "engine connection closed")

    def serve_attach(self, conn: Connection) -> None:
        import gc

        import torch

        from vllm_pool import messages
        from vllm_pool.worker.reset import (IdleBaseline, clean_check, freeze_idle_heap,
                                            memory_in_use, torch_reserved)

        kernel_warmup = self.lease is not None and self.lease.kernel_warmup
        instance_id = self._attach_session(conn)
        if instance_id is None:
            return
        # Every reference to the attach's objects is gone with the session's frame.
        t0 = time.perf_counter()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        dirty = clean_check(self.device, self.baseline, self.slack, self.context_allowance)
        checked_s = time.perf_counter() - t0
        if dirty:
            from vllm_pool.worker.leak_report import describe_live_objects

            logger.error("worker %d unclean after detach of %s: %s; exiting to be respawned\n%s",
                         self.slot, instance_id, dirty,
                         describe_live_objects(self.device, self.baseline.live))
            self.emit(messages.Failed, instance_id=instance_id,
                      error=f"unclean after detach: {dirty}")
            os._exit(1)
        over = (memory_in_use(self.device) - self.baseline.device_bytes) / 2**20
        if self.device.type == "cuda":
            logger.info("worker %d clean after detach of %s (checked in %.2fs): own device "
                        "memory %+.0f MiB over idle (PyTorch %+.0f MiB; the rest is CUDA "
                        "context kept for the next attach)", self.slot, instance_id,
                        checked_s, over,
                        (torch_reserved(self.device) - self.baseline.torch_bytes) / 2**20)
        else:
            logger.info("worker %d clean after detach of %s (checked in %.2fs): RSS %+.0f MiB "
                        "over idle", self.slot, instance_id, checked_s, over)
        if kernel_warmup:
            # The pool's kernel warm-up attach: what it leaves loaded (kernel modules, the
            # Triton and cuBLAS state) is this process's idle footprint from now on, and
            # later detaches are measured against it.
            before = self.baseline.device_bytes
            self.baseline = IdleBaseline.measure(self.device)
            logger.info("worker %d idle footprint after the kernel warm-up: %.0f MiB (was "
                        "%.0f MiB)", self.slot, self.baseline.device_bytes / 2**20,
                        before / 2**20)
        self.heap_trace.after_detach(self.slot)
        freeze_idle_heap(collect=False)  # collected just before the clean check
        self.emit(messages.Idle)

    def _attach_session(self, conn: Connection) -> str | None:
        """Build vLLM's worker, serve the engine until it detaches, tear down.
        Returns the instance id, or None when the request was refused."""
        from vllm_pool import compat, messages
        from vllm_pool.messages import AttachReply, AttachRequest
        from vllm_pool.worker.proc import PoolWorkerProc
        from vllm_pool.worker.reset import ProcessSnapshot, teardown

        req = conn.recv()
        if not isinstance(req, AttachRequest):
            conn.close()
            return None
        lease = self.lease
        if lease is None or (lease.instance_id, lease.token) != (req.instance_id, req.token):
            conn.send(AttachReply(ok=False, error=f"worker {self.slot} is not leased to "
                                                  f"instance {req.instance_id}"))
            conn.close()
            return None
        s = Session(conn, req.instance_id)
        self.session = s
        phases: dict[str, float] = {}
        shm = compat.shm_names_of_handle(req.input_shm_handle)
        self.emit(messages.Attaching, instance_id=s.instance_id, shm_names=shm)
        snap = ProcessSnapshot.take()
        snap.remember_worker_class(req.vllm_config)
        os.environ.update(req.env)
        compat.isolate_compile_cache(self.device, req.local_rank)
        threading.Thread(target=self.watch, args=(s,), daemon=True,
                         name="PoolAttachWatch").start()

        def init_done():
            self.emit(messages.Serving, instance_id=s.instance_id, phases=dict(phases),
                      shm_names=shm, dist_ident=os.environ.get("VLLM_DIST_IDENT"))

        def on_phase(name: str, seconds: float) -> None:
            self.emit(messages.Progress, instance_id=s.instance_id, phase=name,
                      seconds=seconds)

        proc = None
        error = None
        try:
            proc = PoolWorkerProc(req, phases, on_init_done=init_done, on_phase=on_phase)
            shm += compat.shm_names_of_handle(proc.worker_response_mq.export_handle())
            with s.lock:
                s.proc = proc
            s.ready = True
            conn.send(AttachReply(ok=True,
                                  response_handle=proc.worker_response_mq.export_handle(),
                                  peer_response_handles=proc.peer_response_handles,
                                  phases=dict(phases)))
            self.emit(messages.Attaching, instance_id=s.instance_id, shm_names=shm)
            # Same order as vLLM's worker_main; the executor waits in the same order.
            if not s.ended.is_set():
                proc.rpc_broadcast_mq.wait_until_ready()
                proc.worker_response_mq.wait_until_ready()
            if not s.ended.is_set():
                proc.worker_busy_loop()
        except Exception as e:
            if not s.ended.is_set():
                error = f"{type(e).__name__}: {e}"
                logger.error("attach %s failed on worker %d:\n%s", s.instance_id, self.slot,
                             traceback.format_exc())
                try:
                    if not s.ready:
                        conn.send(AttachReply(ok=False, error=error, phases=dict(phases)))
                except Exception:
                    pass
        finally:
            s.ready = True  # from here on, an abort just waits for this teardown
            self.emit(messages.Detaching, instance_id=s.instance_id, error=error)
            with s.lock:
                s.proc = None
            teardown(proc, snap)
            compat.release_config(req.vllm_config)
            snap.restore()
            setproctitle.setproctitle(f"vllm-pool-worker-{self.slot}")
            try:
                conn.close()
            except Exception:
                pass
            self.session = None
            self.lease = None
        return s.instance_id

    def run(self) -> None:
        from vllm_pool import messages

        listener = Listener(self.socket_path, family="AF_UNIX", authkey=self.authkey)
        os.chmod(self.socket_path, 0o600)
        threading.Thread(target=self.command_loop, daemon=True, name="PoolCommands").start()
        self.emit(messages.Idle)
        logger.info("pool worker %d ready on %s in %.1fs", self.slot, self.device, self.start_s)
        while not self.stopping:
            try:
                conn = listener.accept()
            except Exception as e:  # bad key or a client that went away
                logger.warning("rejected a connection: %s", e)
                continue
            if self.stopping:
                conn.close()
                break
            try:
                self.serve_attach(conn)
            except Exception:
                logger.exception("attach handling failed")
                os._exit(1)
        listener.close()
        self.emit(messages.Stopped)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vllm-pool-worker")
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--device", required=True, help="cuda:<visible index> or cpu:<core>")
    p.add_argument("--socket", required=True)
    p.add_argument("--cmd-fd", type=int, required=True)
    p.add_argument("--evt-fd", type=int, required=True)
    p.add_argument("--memory-slack-mib", type=int, default=256)
    p.add_argument("--context-memory-mib", type=int, default=1024)
    args = p.parse_args(argv)
    setproctitle.setproctitle(f"vllm-pool-worker-{args.slot}")
    from vllm_pool.logs import configure_logging

    configure_logging(f"PoolWorker{args.slot}")
    w = PoolWorker(args)
    try:
        w.start_up()
    except Exception as e:
        from vllm_pool import messages

        w.emit(messages.Failed, error=f"start-up failed: {e}")
        sys.exit(1)
    w.run()


if __name__ == "__main__":
    main()
