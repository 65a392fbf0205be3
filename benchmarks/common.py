"""What the benchmark scripts share: a free port, waiting for a server, the machine's name."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine(device: str) -> str:
    """The GPU's name, or the CPU model and core count: every result names its machine."""
    if device == "gpu":
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown GPU"
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return f"{ln.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor()


def wait_health(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """An engine's or the gateway's /health answers 200."""
    def ok() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_ready(ok, url, proc, timeout)


def wait_ready(ok, url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Poll `ok()` until true; the server's exit first, or the timeout, raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before {url} was healthy")
        if ok():
            return
        time.sleep(0.05)
    raise TimeoutError(url)


def start_run(a, prefix: str) -> tuple[str, str]:
    """What every benchmark does after parsing its arguments: SIGTERM runs its clean-up
    (stopping its pool) instead of killing it mid-way, `--engine-args` split, a small KV cache
    on CPU, and a scratch directory with the log directory. Returns (scratch, log_dir)."""
    import signal
    import sys
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    a.engine_args = a.engine_args.split()
    if a.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    scratch = tempfile.mkdtemp(prefix=prefix)
    log_dir = a.log_dir or os.path.join(scratch, "logs")
    os.makedirs(log_dir, exist_ok=True)
    return scratch, log_dir
