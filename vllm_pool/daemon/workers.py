"""The daemon's side of one pool worker process: spawn, command, events, reap, respawn.

The handle reads the worker's typed events and passes them to the pool, which decides the
worker's state (states.transition): the process reports its own phase, the daemon owns
the allocation states (RESERVED, WARMING, PARKED).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import msgspec

from vllm_pool import device_memory, messages
from vllm_pool.daemon import kernel_warmup
from vllm_pool.daemon.background import start_thread
from vllm_pool.states import Stateful, WorkerState, transition

logger = logging.getLogger("vllm_pool.daemon")


class WorkerHandle(Stateful):
    def __init__(self, slot: int, device: str, socket_path: str, authkey: str,
                 spawn_env: dict[str, str], on_event: Callable[["WorkerHandle", messages.Event], None],
                 on_exit: Callable[["WorkerHandle", int], None], log_path: str,
                 memory_slack_mib: int = 256, context_memory_mib: int = 1024,
                 extra: bool = False):
        self._init_state(WorkerState.STARTING)
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
        # Started beside a parked worker on its device (not one of the pool's own devices'
        # first workers): no kernel warm-up (its device runs a model), retired when its
        # device has an idle worker again.
        self.extra = extra
        self.instance_id: str | None = None
        # What the process last reported of itself (messages.Event kind, lower case):
        # "idle", "attaching", "serving", ... The allocation state is `state`.
        self.phase = "starting"
        self.pid: int | None = None
        self.memory_bytes = 0              # the worker's own memory, as it last reported it
        self.baseline_bytes = 0
        self.memory_source = ""            # nvml | torch | rss (reset.MemoryFigures)
        self.device_free_bytes = 0
        self.device_total_bytes = 0
        self.device_uuid = ""
        self.start_s = 0.0                 # the process's start: imports, CUDA context
        self.kernel_warmup_s = 0.0         # the pool's kernel warm-up attach on this process
        self.warmup_status = kernel_warmup.WarmupStatus()
        self.error: str | None = None
        self.shm_names: list[str] = []
        self.phases: dict[str, float] = {}
        self.restarts = -1
        self.idle_rss = 0                  # host memory when idle: parked instances' cost
        self.proc: subprocess.Popen | None = None
        self._cmd_w = None

    def label(self) -> str:
        return f"worker {self.slot}"

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
        with self.changed:
            self._cmd_w = os.fdopen(cmd_w, "wb", buffering=0)
        self.pid = self.proc.pid
        self.phase = "starting"
        self.restarts += 1
        self.kernel_warmup_s = 0.0
        self.warmup_status = kernel_warmup.WarmupStatus()
        if self.state != WorkerState.STARTING:  # a respawn
            transition(self, WorkerState.STARTING, instance_id=None, error=None)
        start_thread(f"PoolWorkerEvents-{self.slot}", self._read_events, evt_r, self.proc)

    def _read_events(self, fd: int, proc: subprocess.Popen) -> None:
        with os.fdopen(fd, "rb") as f:
            for line in f:
                try:
                    ev = messages.decode_event(line)
                except msgspec.DecodeError:
                    continue
                self.memory_bytes = ev.memory_bytes
                self.memory_source, self.device_uuid = ev.memory_source, ev.device_uuid
                self.device_free_bytes = ev.device_free_bytes
                self.device_total_bytes = ev.device_total_bytes
                self.on_event(self, ev)
        # EOF: the process is gone (or going). Reap it so no zombie stays.
        rc = proc.wait()
        if proc is self.proc:
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
        with self.changed:
            try:
                self._cmd_w.write(messages.encode(cmd))
                return True
            except (BrokenPipeError, OSError, AttributeError):
                return False

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
        """Stop the worker for good: it is STOPPED first, so its exit is not a crash."""
        starting = self.state == WorkerState.STARTING
        if self.state != WorkerState.STOPPED:
            transition(self, WorkerState.STOPPED)
        if self.proc is None:
            return
        if starting:
            # Still importing vLLM, reading no command yet: it holds nothing to release,
            # and waiting would cost the rest of its start (20 s on two cores).
            self.kill()
        self.send(messages.Shutdown())
        with self.changed:
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
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
