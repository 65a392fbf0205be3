"""The daemon's side of one pool worker process: spawn, command, events, reap, respawn."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import msgspec

from vllm_pool import device_memory, messages
from vllm_pool.daemon import kernel_warmup
from vllm_pool.states import WorkerState

logger = logging.getLogger("vllm_pool.daemon")


class WorkerHandle:
    def __init__(self, slot: int, device: str, socket_path: str, authkey: str,
                 spawn_env: dict[str, str], on_event: Callable[["WorkerHandle", messages.Event], None],
                 on_exit: Callable[["WorkerHandle", int], None], log_path: str,
                 memory_slack_mib: int = 256, context_memory_mib: int = 1024):
        self.slot = slot
        self.device = device
        self.socket_path = socket_path
        self.authkey = authkey
        self.spawn_env = spawn_env
        self.on_event = on_event
        self.on_exit = on_exit
        self.log_path = log_path
        self.memory_slack_mib = memory_slack_mib
        self.context_memory_mib = context_memory_mib
        self.state = WorkerState.STARTING
        self.instance_id: str | None = None
        self.pid: int | None = None
        self.memory_bytes = 0              # the worker's own memory, as it last reported it
        self.baseline_bytes = 0
        self.memory_source = ""            # nvml | torch | rss (reset.MemoryFigures)
        self.device_free_bytes = 0
        self.device_total_bytes = 0
        self.device_uuid = ""
        self.warmup_s = 0.0
        self.kernel_warmup_s = 0.0         # the pool's warm-up attach on this process
        self.warmup_status = kernel_warmup.WarmupStatus()
        self.error: str | None = None
        self.shm_names: list[str] = []
        self.phases: dict[str, float] = {}
        self.restarts = -1
        self.ever_idle = False             # since the last spawn: tells a crash loop apart
        self.given_up = False              # failed to start; the pool does not respawn it
        self.extra = False                 # started beside a parked worker on its device
        self.retired = False               # stopped for good (an extra no longer needed)
        self.idle_rss = 0                  # host memory when idle: parked instances' cost
        self.proc: subprocess.Popen | None = None
        self._cmd_w = None
        self._lock = threading.Lock()
        self.changed = threading.Condition()

    def spawn(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        env = dict(os.environ)
        env.update(self.spawn_env)
        env["VLLM_POOL_AUTHKEY"] = self.authkey
        argv = [sys.executable, "-m", "vllm_pool.worker.main", "--slot", str(self.slot),
                "--device", self.device, "--socket", self.socket_path,
                "--cmd-fd", str(cmd_r), "--evt-fd", str(evt_w),
                "--memory-slack-mib", str(self.memory_slack_mib),
                "--context-memory-mib", str(self.context_memory_mib)]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, pass_fds=(cmd_r, evt_w), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        os.close(cmd_r)
        os.close(evt_w)
        self._cmd_w = os.fdopen(cmd_w, "wb", buffering=0)
        self.pid = self.proc.pid
        self.restarts += 1
        self.ever_idle = False
        self.kernel_warmup_s = 0.0
        self.warmup_status = kernel_warmup.WarmupStatus()
        self.set_state(WorkerState.STARTING, instance_id=None, error=None)
        threading.Thread(target=self._read_events, args=(evt_r, self.proc), daemon=True,
                         name=f"PoolWorkerEvents-{self.slot}").start()

    def set_state(self, state: WorkerState, **kw) -> None:
        if state == WorkerState.IDLE and self.state != WorkerState.IDLE:
            from vllm_pool.daemon.parking import process_rss

            self.idle_rss = process_rss(self.pid)
        with self.changed:
            self.state = state
            self.ever_idle = self.ever_idle or state == WorkerState.IDLE
            for k, v in kw.items():
                setattr(self, k, v)
            self.changed.notify_all()

    def _read_events(self, fd: int, proc: subprocess.Popen) -> None:
        with os.fdopen(fd, "rb") as f:
            for line in f:
                try:
                    ev = messages.decode_event(line)
                except msgspec.DecodeError:
                    continue
                self.set_state(ev.state, instance_id=ev.instance_id, memory_bytes=ev.memory_bytes,
                          baseline_bytes=ev.baseline_bytes, warmup_s=ev.warmup_s,
                          memory_source=ev.memory_source, device_uuid=ev.device_uuid,
                          device_free_bytes=ev.device_free_bytes,
                          device_total_bytes=ev.device_total_bytes,
                          error=ev.error, **({"phases": ev.phases} if ev.phases else {}),
                          **({"shm_names": ev.shm_names} if ev.shm_names else {}))
                self.on_event(self, ev)
        # EOF: the process is gone (or going). Reap it so no zombie stays.
        rc = proc.wait()
        if proc is self.proc:
            self.set_state(WorkerState.FAILED if self.state != WorkerState.STOPPED else self.state,
                      error=self.error or f"worker process exited with {rc}")
            self.on_exit(self, rc)

    def memory_now(self) -> tuple[int, int, int]:
        """(own memory, device free, device total) now. A GPU worker's device is read
        again here through NVML (the worker reports only when its state changes: a parked
        worker's last report is from serving), and its own figure too where it comes from
        NVML; otherwise what the worker last reported."""
        if self.device_uuid and self.alive():
            reading = device_memory.read_device(self.device_uuid)
            if reading is not None:
                own = device_memory.own_bytes(reading, self.pid) \
                    if self.memory_source == "nvml" else None
                return (self.memory_bytes if own is None else own, reading.free_bytes,
                        reading.total_bytes)
        return self.memory_bytes, self.device_free_bytes, self.device_total_bytes

    def send(self, cmd: messages.Command) -> bool:
        with self._lock:
            try:
                self._cmd_w.write(messages.encode(cmd))
                return True
            except (BrokenPipeError, OSError, AttributeError):
                return False

    def wait_for(self, pred: Callable[["WorkerHandle"], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker's process group (the worker and anything it started)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the worker to exit; kill it if it does not."""
        if self.proc is None:
            return
        self.send(messages.Shutdown())
        with self._lock:
            if self._cmd_w is not None:
                try:
                    self._cmd_w.close()
                except OSError:
                    pass
                self._cmd_w = None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.set_state(WorkerState.STOPPED)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
