"""vllm-pool on CPU, end to end: tiny model, 2-slot pool, attach, chat, detach, stop.

Run through scripts/demo.sh, which prepares the environment first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 900):
    req = urllib.request.Request(url, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=2)
    args = ap.parse_args()
    from vllm_pool.testing.tiny_model import build_model

    t = time.perf_counter()
    model = build_model(os.path.join(ROOT, ".cache", "models", "tiny-a"))
    print(f"[demo] tiny model ready at {model} ({time.perf_counter() - t:.1f}s)")

    port = free_port()
    pool = f"http://127.0.0.1:{port}"
    logs = tempfile.mkdtemp(prefix="vllm-pool-demo-logs-")
    t = time.perf_counter()
    daemon = subprocess.Popen([sys.executable, "-m", "vllm_pool", "serve", "--cpu-slots",
                               str(args.slots), "--port", str(port), "--log-dir", logs],
                              start_new_session=True)
    try:
        while True:
            try:
                if http("GET", pool + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if daemon.poll() is not None:
                print(f"[demo] the pool exited ({daemon.returncode}); logs in {logs}")
                return 1
            time.sleep(0.2)
        print(f"[demo] pool of {args.slots} warm CPU workers ready in "
              f"{time.perf_counter() - t:.1f}s at {pool}")

        t = time.perf_counter()
        _, inst = http("POST", pool + "/instances", {
            "model": model, "name": "demo",
            "args": ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]})
        attach_s = time.perf_counter() - t
        print(f"[demo] attached as {inst['name']} at {inst['url']} in {attach_s:.2f}s")
        print("[demo] phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in inst["phases"].items()))

        t = time.perf_counter()
        _, out = http("POST", inst["url"] + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 16, "temperature": 0})
        print(f"[demo] chat answer ({time.perf_counter() - t:.2f}s; random weights, so "
              f"gibberish): {out['choices'][0]['message']['content']!r}")
        print(f"[demo] attach to first answer: {attach_s + time.perf_counter() - t:.2f}s")

        t = time.perf_counter()
        http("DELETE", pool + "/instances/demo")
        _, workers = http("GET", pool + "/workers")
        print(f"[demo] detached in {time.perf_counter() - t:.2f}s; workers: " + ", ".join(
            f"{w['device']} {w['state']} pid {w['pid']}" for w in workers))
    finally:
        t = time.perf_counter()
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGTERM)
        rc = daemon.wait(120)
        print(f"[demo] pool stopped (exit {rc}) in {time.perf_counter() - t:.1f}s; logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
