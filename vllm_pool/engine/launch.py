"""Start, watch and stop one attached engine (vLLM's API server plus its EngineCore)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

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


class EngineProcess:
    """An engine host process: warm (imports done) once `ready`, an engine once `start`ed.

    Spares are started ahead of time by the daemon; an attach that finds none ready
    starts one on the spot (the same process, just not warm yet).
    """

    def __init__(self, base_env: dict[str, str], log_path: str):
        self.log_path = log_path
        cmd_r, self._cmd_w = os.pipe()
        ready_r, ready_w = os.pipe()
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_pool.engine.entry", "--cmd-fd", str(cmd_r),
             "--ready-fd", str(ready_w)],
            env=base_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            pass_fds=(cmd_r, ready_w), start_new_session=True)
        log.close()
        os.close(cmd_r)
        os.close(ready_w)
        self._ready_r = ready_r
        self.pid = self.proc.pid

    def ready(self, timeout: float = 0.0) -> bool:
        """True once the host has finished its imports (non-blocking by default)."""
        if self._ready_r is None:
            return True
        r, _, _ = select.select([self._ready_r], [], [], timeout)
        if r and os.read(self._ready_r, 16).startswith(b"ready"):
            os.close(self._ready_r)
            self._ready_r = None
            return True
        return False

    def start(self, argv: list[str], env: dict[str, str], log_path: str | None = None) -> None:
        """Hand the host its engine: vLLM serve arguments and the full environment."""
        if log_path and log_path != self.log_path:
            os.rename(self.log_path, log_path)  # the host keeps writing to the same file
            self.log_path = log_path
        env = dict(env)
        # EngineCore forks from this warm process instead of spawning a fresh interpreter.
        env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
        os.write(self._cmd_w, (json.dumps({"argv": argv, "env": env}) + "\n").encode())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the engine's process group, SIGKILL it after `timeout`; reap."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # EngineCore may outlive the API server by a moment: sweep the group.
        _wait_group_gone(self.pid, timeout)
        for fd in (self._cmd_w, self._ready_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._cmd_w = self._ready_r = None
        return self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
