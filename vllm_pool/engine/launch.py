"""Start, watch and stop one attached engine (vLLM's API server plus its EngineCore)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from vllm_pool import messages
from vllm_pool.states import HostState, Stateful, transition

EXECUTOR = "vllm_pool.executor.PoolExecutor"


def engine_argv(model: str, host: str, port: int, tp: int, pp: int, extra: list[str],
                device_ids: list[int] | None) -> list[str]:
    """`vllm serve` arguments for an attached engine; the user's own come last, except
    the executor, which is always the pool's."""
    argv = ["--model", model, "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
    if device_ids is not None:
        argv += ["--device-ids", ",".join(str(d) for d in device_ids)]
    return argv + list(extra) + ["--distributed-executor-backend", EXECUTOR]


class EngineProcess(Stateful):
    """One engine host: a process that runs vLLM's API server once it gets its order.

    Two kinds share this interface: `SpawnedHost`, a fresh interpreter (for an attach that
    sets environment read at import time), and `ForkedHost`, forked by the `ForkServer`.
    Either leads its own process group (its pid), which holds the API server and EngineCore.
    """

    pid: int
    log_path: str
    kind: str = ""
    _cmd_w: int | None = None

    def label(self) -> str:
        return f"{self.kind} engine host {self.pid}"

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        """Hand the host its engine: vLLM serve arguments and the full environment."""
        env = dict(env)
        # EngineCore forks from this warm process instead of spawning a fresh interpreter.
        env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
        transition(self, HostState.RUNNING, [HostState.STARTING, HostState.READY])
        os.write(self._cmd_w, (json.dumps({"argv": argv, "env": env}) + "\n").encode())

    def _exited(self) -> None:
        if self.state != HostState.EXITED:
            transition(self, HostState.EXITED)

    def alive(self) -> bool:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int | None:
        """The host's exit code once it has exited (None: still running after `timeout`)."""
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the engine's process group, SIGKILL it after `timeout`; reap."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            if self.wait(wait) is not None:
                break
        # EngineCore may outlive the API server by a moment: sweep the group.
        _wait_group_gone(self.pid, timeout)
        if self._cmd_w is not None:
            try:
                os.close(self._cmd_w)
            except OSError:
                pass
            self._cmd_w = None
        return self.wait(10.0)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class SpawnedHost(EngineProcess):
    """A fresh interpreter: imports vLLM itself (seconds), then takes its order."""

    kind = "fresh"

    def __init__(self, base_env: dict[str, str], log_path: str):
        self._init_state(HostState.STARTING)  # importing; takes its order when done
        self.log_path = log_path
        cmd_r, self._cmd_w = os.pipe()
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_pool.engine.entry", "--cmd-fd", str(cmd_r)],
            env=base_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            pass_fds=(cmd_r,), start_new_session=True)
        log.close()
        os.close(cmd_r)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._exited()
        return rc


class ForkedHost(EngineProcess):
    """A host forked by the fork server. Its parent is the server, which reports its exit
    code; the daemon watches it through a pidfd, which stays valid after it is reaped."""

    kind = "forked"

    def __init__(self, pid: int, cmd_w: int, log_path: str):
        self._init_state(HostState.READY)  # forked from a warm server: ready at once
        self.pid = pid
        self._cmd_w = cmd_w
        self.log_path = log_path
        self.returncode: int | None = None
        self._exit_reported = threading.Event()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # already gone and reaped: its exit report follows
            self._pidfd = None

    def _set_exit(self, rc: int) -> None:
        self.returncode = rc
        self._exit_reported.set()

    def alive(self) -> bool:
        if self._exit_reported.is_set():
            return False
        if self._pidfd is None:
            return False
        r, _, _ = select.select([self._pidfd], [], [], 0)
        return not r

    def wait(self, timeout: float | None = None) -> int | None:
        if self._pidfd is not None and not self._exit_reported.is_set():
            r, _, _ = select.select([self._pidfd], [], [], timeout)
            if not r:
                return None
        # Exited; its code comes from the server a moment later (None: server gone too).
        self._exit_reported.wait(5.0)
        self._exited()
        if self._pidfd is not None:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
            self._pidfd = None
        return self.returncode if self._exit_reported.is_set() else -1


class ForkServer(Stateful):
    """The daemon's side of the engine fork server (forkserver.py): start it, fork hosts.
    STARTING while it imports, READY once it can fork, EXITED when it is gone."""

    def __init__(self, base_env: dict[str, str], log_path: str):
        self._init_state(HostState.STARTING)
        self.log_path = log_path
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_pool.engine.entry", "--forkserver-fd",
             str(theirs.fileno())],
            env=base_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),), start_new_session=True)
        log.close()
        theirs.close()
        self.pid = self.proc.pid
        self._sock = ours
        self._lock = threading.Lock()           # one fork request at a time
        self._seq = 0
        self._forked: dict[int, int] = {}       # seq -> pid
        self._replied = threading.Condition()
        self._hosts: dict[int, ForkedHost] = {}
        self._early_exits: dict[int, int] = {}  # pid -> rc, reported before registration
        threading.Thread(target=self._read, daemon=True,
                         name=f"PoolForkServer-{self.pid}").start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                break
            msg = messages.decode_fork_reply(data.rstrip(b"\n"))
            if isinstance(msg, messages.ServerReady):
                transition(self, HostState.READY, [HostState.STARTING])
            elif isinstance(msg, messages.Forked):
                with self._replied:
                    self._forked[msg.seq] = msg.pid
                    self._replied.notify_all()
            else:
                with self._replied:
                    host = self._hosts.pop(msg.pid, None)
                    if host is None:
                        self._early_exits[msg.pid] = msg.returncode
                if host is not None:
                    host._set_exit(msg.returncode)
        self.proc.wait()  # reap; its hosts' exits are no longer reported
        transition(self, HostState.EXITED)
        with self._replied:
            self._replied.notify_all()

    def label(self) -> str:
        return f"engine fork server {self.pid}"

    def ready(self, timeout: float = 0.0) -> bool:
        self.wait_for(lambda s: s.state != HostState.STARTING, timeout)
        return self.state == HostState.READY and self.alive()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, log_path: str, timeout: float = 10.0) -> ForkedHost:
        """A new host, waiting for its order. Raises OSError if the server cannot fork."""
        cmd_r, cmd_w = os.pipe()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            with self._lock:
                self._seq += 1
                seq = self._seq
                socket.send_fds(self._sock, [messages.encode(messages.Fork(seq=seq))],
                                [cmd_r, log_fd])
                with self._replied:
                    ok = self._replied.wait_for(
                        lambda: seq in self._forked or not self.alive(), timeout)
                    pid = self._forked.pop(seq, None)
                    if not ok or pid is None:
                        raise OSError("the engine fork server did not fork a host")
                    host = ForkedHost(pid, cmd_w, log_path)
                    rc = self._early_exits.pop(pid, None)
                    if rc is None:
                        self._hosts[pid] = host
                if rc is not None:
                    host._set_exit(rc)
                return host
        except BaseException:
            os.close(cmd_w)
            raise
        finally:
            os.close(cmd_r)
            os.close(log_fd)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the control socket (the server exits on EOF); kill it if it lingers."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if not _live_members(pgid):
            return  # zombies only: they hold no memory or descriptors, and their reaper reaps
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies (from /proc; [] where unreadable)."""
    live = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return [pgid]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            live.append(pid)
    return live


def health_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# "ValueError: ..." from a traceback, or argparse's "api_server.py: error: ...".
_ERROR_LINE = re.compile(r"\b[A-Za-z_.]*(Error|Exception): |^\S+: error: ")
# vLLM's generic wrap-up lines; the root cause is printed before them.
_GENERIC = ("Engine core initialization failed", "See root cause above")


def failure_reason(log_text: str) -> str:
    """The most telling line of a failed engine's log: its root-cause error."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.search(ln)]
    specific = [ln for ln in errors if not any(g in ln for g in _GENERIC)]
    pick = specific or errors
    if not pick:
        return "no error in the engine log (killed?)"
    line = pick[-1]
    return line[_ERROR_LINE.search(line).start():][:1000]
