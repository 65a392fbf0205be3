"""Benchmark: a step load against one model, with replicas (`replicas: {max: N}`) against one
instance (`replicas: {max: 1}`).

Two pools of one CPU slot each, on their own cores (`serve --cpu-slots 1 --cpu-cores K`),
or the pools given with `--pool URL` (e.g. several shares of one GPU), and the standalone
gateway in front of them. Per variant: one client for `--base-s` seconds (the first
instance attaches), then `--concurrency` clients (default 16) for `--step-s` seconds. It
reports the time from the step to the second replica serving, p50/p99 latency of the
requests sent during the step, and the step's throughput; JSON (--output-json) and a table
naming the machine.

    python benchmarks/bench_scale.py --output-json scale.json
    python benchmarks/bench_scale.py --device gpu --pool http://127.0.0.1:8100 \\
        --pool http://127.0.0.1:8101 --model /root/models/l1b --args "--max-model-len 4096"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from common import free_port, machine, wait_health
from pool_calls import detach_all, wait_pool

from vllm_pool.client import PoolClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--max-num-seqs", "16", "--seed", "0"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _start_pool(core: int, log_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    d = os.path.join(log_dir, f"pool-{core}")
    os.makedirs(d, exist_ok=True)
    log = open(os.path.join(d, "daemon.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_pool", "serve", "--cpu-slots", "1",
                             "--cpu-cores", str(core), "--port", str(port), "--log-dir", d],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _detach_all(pools: list[str]) -> None:
    for p in pools:
        pool = PoolClient(p, timeout=60)
        detach_all(pool, [i.id for i in pool.instances()], 600)


def run_variant(a, pools: list[str], model: str, max_replicas: int, work: str,
                log_dir: str) -> dict:
    models = os.path.join(work, f"models-{max_replicas}.yaml")
    with open(models, "w") as f:
        json.dump({"models": [{"name": "m", "model": model, "args": a.args.split(),
                               "replicas": {"max": max_replicas},
                               "target_in_flight": a.target_in_flight}]}, f)
    port = free_port()
    gw = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "vllm_pool", "gateway", "--models", models,
            "--gateway-port", str(port)]
    for p in pools:
        argv += ["--pool", p]
    log = open(os.path.join(log_dir, f"gateway-{max_replicas}.log"), "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    results: list[tuple[float, float, int, int]] = []  # start, latency, status, tokens
    lock = threading.Lock()
    replicas_at: list[tuple[float, int]] = []
    stop_all = threading.Event()
    try:
        wait_health(gw, proc, 300)
        body = {"model": "m", "prompt": "def main(", "max_tokens": a.max_tokens,
                "temperature": 0, "ignore_eos": True}

        def client(until: threading.Event) -> None:
            with httpx.Client(timeout=600) as c:
                while not until.is_set() and not stop_all.is_set():
                    t0 = time.perf_counter()
                    r = c.post(gw + "/v1/completions", json=body)
                    dt = time.perf_counter() - t0
                    toks = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                    with lock:
                        results.append((t0, dt, r.status_code, toks))

        def watch() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop_all.is_set():
                    card = c.get(gw + "/v1/models/m").json()
                    n = sum(1 for r in card["replicas"] if r["state"] == "serving")
                    replicas_at.append((time.perf_counter(), n))
                    time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        base_stop = threading.Event()
        base = threading.Thread(target=client, args=(base_stop,))
        base.start()
        # The base phase starts once the first instance serves (its attach is not the step).
        while not results:
            time.sleep(0.05)
        time.sleep(a.base_s)
        step_t = time.perf_counter()
        step_stop = threading.Event()
        step = [threading.Thread(target=client, args=(step_stop,))
                for _ in range(a.concurrency - 1)]
        for t in step:
            t.start()
        time.sleep(a.step_s)
        step_stop.set()
        base_stop.set()
        for t in [base, *step]:
            t.join()
        step_end = time.perf_counter()
        stop_all.set()
        watcher.join(5)
    finally:
        stop_all.set()
        _stop(proc)
        log.close()
    during = [r for r in results if r[0] >= step_t]
    ok = [r for r in during if r[2] == 200]
    second = next((t - step_t for t, n in replicas_at if t >= step_t and n >= 2), None)
    ms = lambda x: None if x is None else round(x * 1000, 1)  # noqa: E731
    return {
        "max_replicas": max_replicas,
        "requests_in_step": len(during), "errors_in_step": len(during) - len(ok),
        "p50_ms": ms(pct([r[1] for r in ok], 50)), "p99_ms": ms(pct([r[1] for r in ok], 99)),
        "throughput_rps": round(len(ok) / (step_end - step_t), 3),
        "throughput_tok_s": round(sum(r[3] for r in ok) / (step_end - step_t), 1),
        "second_replica_s": None if second is None else round(second, 2),
        "max_replicas_seen": max((n for _, n in replicas_at), default=0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--pool", action="append", default=None,
                   help="use these running pools (repeatable); default: two CPU pools on "
                        "cores 0 and 1, started and stopped here")
    p.add_argument("--model", default=None, help="model path (default: the tiny test model)")
    p.add_argument("--args", default=" ".join(ENGINE_ARGS), help="`vllm serve` arguments")
    p.add_argument("--replicas", type=int, default=2, help="max replicas of the scaled run")
    p.add_argument("--target-in-flight", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16, help="clients after the step")
    p.add_argument("--base-s", type=float, default=5.0, help="seconds of one client")
    p.add_argument("--step-s", type=float, default=40.0, help="seconds of the step load")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = a.model
    if model is None:
        from vllm_pool.testing.tiny_model import build_model

        model = build_model(os.path.join(ROOT, ".cache", "models", "tiny-a"), seed=0)
    work = tempfile.mkdtemp(prefix="bench-scale-")
    log_dir = a.log_dir or os.path.join(work, "logs")
    os.makedirs(log_dir, exist_ok=True)
    started: list[subprocess.Popen] = []
    pools = a.pool
    try:
        if not pools:
            for core in (0, 1):
                proc, url = _start_pool(core, log_dir)
                started.append(proc)
                pools = (pools or []) + [url]
            for proc, url in zip(started, pools):
                wait_pool(url, proc, 600)
        runs = []
        for n in (1, a.replicas):
            _detach_all(pools)
            runs.append(run_variant(a, pools, model, n, work, log_dir))
        _detach_all(pools)
    finally:
        for proc in started:
            _stop(proc)
    one, many = runs
    res = {"benchmark": "scale", "machine": machine(a.device), "device": a.device,
           "model": model, "pools": len(pools), "date": time.strftime("%Y-%m-%d"),
           "settings": {"concurrency": a.concurrency, "base_s": a.base_s, "step_s": a.step_s,
                        "max_tokens": a.max_tokens, "target_in_flight": a.target_in_flight,
                        "args": a.args.split()},
           "runs": runs,
           "summary": {
               "second_replica_s": many["second_replica_s"],
               "p99_ratio": round(one["p99_ms"] / many["p99_ms"], 2)
               if one["p99_ms"] and many["p99_ms"] else None,
               "throughput_ratio": round(many["throughput_rps"] / one["throughput_rps"], 2)
               if one["throughput_rps"] else None}}
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"\nstep load 1 -> {a.concurrency} clients on {res['machine']} ({a.device}, "
          f"{len(pools)} pools), model {os.path.basename(model.rstrip('/'))}, "
          f"{a.max_tokens} tokens per request")
    print(f"{'':28}{'max 1':>12}{f'max {a.replicas}':>12}")
    rows = [("p50 latency (ms)", "p50_ms"), ("p99 latency (ms)", "p99_ms"),
            ("throughput (req/s)", "throughput_rps"), ("throughput (tok/s)", "throughput_tok_s"),
            ("2nd replica after step (s)", "second_replica_s"),
            ("replicas seen", "max_replicas_seen"), ("errors", "errors_in_step")]
    for label, k in rows:
        print(f"{label:28}{str(one[k]):>12}{str(many[k]):>12}")
    s = res["summary"]
    print(f"p99 max 1 / max {a.replicas}: {s['p99_ratio']}x; throughput: "
          f"{s['throughput_ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
