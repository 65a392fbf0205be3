"""Check: models that share an architecture share compiled code (issue 17, item 3).

In one fresh VLLM_CACHE_ROOT, one after the other:
  1. plain `vllm serve` of A, compiled: its greedy tokens, the compile-cache keys it filed;
  2. a pool (with --enable-parking unless --no-parking) attaches A: the keys must stay
     plain's (parking's sleep mode is not a key factor under the pool), then detaches;
  3. the pool attaches A' (A's config, other weights, other directory): no new key, vLLM's
     "Directly load" lines in the worker log, and the attach's `compile` phase;
  4. with --model-c, the pool attaches C (another config): keys of its own;
  5. plain `vllm serve` of A': the reference tokens for A' (plain compiles A' itself, under
     vLLM's own per-path key).
Writes JSON: each step's phases, keys added, load lines, tokens and whether they match.

Example (H200, 1.1B): see benchmarks/gpu_compile_share.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_attach import first_completion, stop_group
from common import free_port, machine, start_run, wait_health
from pool_calls import wait_pool

from vllm_pool.client import PoolClient, PoolError
from vllm_pool.compat import compile_cache_keys
from vllm_pool.states import WorkerState


def load_lines(text: str) -> list[str]:
    return [ln.strip()[-240:] for ln in text.splitlines()
            if "Directly load" in ln or "load failure" in ln or "Compiling a graph" in ln
            or "torch.compile takes" in ln or "saved AOT compiled" in ln]


def plain(a, model: str, env: dict, log: str) -> dict:
    port = free_port()
    full = dict(os.environ, **env)
    if a.device == "gpu":
        full["CUDA_VISIBLE_DEVICES"] = a.gpus
    else:
        full["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        start = f.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--port", str(port), *a.engine_args], env=full, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_health(url, proc, a.timeout)
        out = first_completion(url, model)
        ready = time.perf_counter() - t0
    finally:
        stop_group(proc)
    with open(log, errors="replace") as f:
        f.seek(start)
        lines = load_lines(f.read())
    return {"seconds_to_first_completion": round(ready, 2), "output": out, "log": lines}


def worker_log_size(log_dir: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(log_dir, n)) for n in os.listdir(log_dir)
            if n.startswith("worker")}


def worker_log_since(log_dir: str, sizes: dict[str, int]) -> list[str]:
    lines = []
    for n in sorted(worker_log_size(log_dir)):
        with open(os.path.join(log_dir, n), errors="replace") as f:
            f.seek(sizes.get(n, 0))
            lines += load_lines(f.read())
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description="compiled code shared by architecture")
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    p.add_argument("--gpus", default="0")
    p.add_argument("--model", required=True, help="A")
    p.add_argument("--model-ft", required=True, help="A': A's config, other weights")
    p.add_argument("--model-c", default=None, help="C: another config")
    p.add_argument("--engine-args", default="--dtype bfloat16 --max-model-len 2048")
    p.add_argument("--no-parking", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    scratch, log_dir = start_run(a, "compile-share-")
    root = os.path.join(scratch, "vllm-cache")
    env = {"VLLM_CACHE_ROOT": root}
    res: dict = {"machine": machine(a.device), "engine_args": a.engine_args,
                 "parking": not a.no_parking, "steps": []}
    try:
        import vllm

        res["vllm"] = vllm.__version__
    except ImportError:
        pass

    def step(name: str, **kw) -> dict:
        s = {"step": name, **kw}
        res["steps"].append(s)
        print(json.dumps(s), flush=True)
        return s

    before = compile_cache_keys(root)
    r = plain(a, a.model, env, os.path.join(log_dir, "plain-a.log"))
    plain_a = step("plain A", **r, keys_added=sorted(compile_cache_keys(root) - before))

    port = free_port()
    dev = ["--gpus", a.gpus] if a.device == "gpu" else ["--cpu-slots", "1"]
    park = [] if a.no_parking else ["--enable-parking"]
    with open(os.path.join(log_dir, "daemon.log"), "ab") as dl:
        pool = subprocess.Popen(
            [sys.executable, "-m", "vllm_pool", "serve", *dev, "--port", str(port),
             "--log-dir", log_dir, "--state-file", "none", *park],
            stdout=dl, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    c = PoolClient(url, timeout=a.timeout)
    attached: dict = {}
    try:
        wait_pool(url, pool, a.timeout)
        while not all(w.state is WorkerState.IDLE for w in c.workers()):
            time.sleep(0.5)  # kernel warm-up: not part of any attach below
        for label, model in (("A", a.model), ("A'", a.model_ft), ("C", a.model_c)):
            if model is None:
                continue
            before, sizes = compile_cache_keys(root), worker_log_size(log_dir)
            t0 = time.perf_counter()
            try:
                inst = c.attach({"model": model, "name": "share", "env": env,
                                 "args": a.engine_args, "timeout_s": a.timeout})
            except PoolError as e:
                if e.status is None:
                    raise
                step(f"pool {label}", error=f"{e.status} {e.body[:2000]}")
                return 1
            out = first_completion(inst.url, model)
            secs = time.perf_counter() - t0
            c.detach("share", timeout=a.timeout)
            while not all(w.state is WorkerState.IDLE for w in c.workers()):
                time.sleep(0.5)
            attached[label] = step(
                f"pool {label}", seconds_to_first_completion=round(secs, 2),
                phases=inst.phases, output=out,
                keys_added=sorted(compile_cache_keys(root) - before), log=worker_log_since(log_dir, sizes))
    finally:
        stop_group(pool)

    r = plain(a, a.model_ft, env, os.path.join(log_dir, "plain-a-ft.log"))
    plain_ft = step("plain A'", **r)
    ft = attached.get("A'", {})
    res["checks"] = {
        "pool A kept plain's keys": attached.get("A", {}).get("keys_added") == [],
        "A' added no key": ft.get("keys_added") == [],
        "A' loaded (Directly load in its log)": any("Directly load" in ln
                                                    for ln in ft.get("log", [])),
        "A' compile phase s": (ft.get("phases") or {}).get("compile"),
        "A' tokens == plain A' tokens": ft.get("output") == plain_ft["output"],
        "A' tokens != A tokens": ft.get("output") != plain_a["output"],
        "pool A tokens == plain A tokens": attached.get("A", {}).get("output")
        == plain_a["output"],
    }
    if "C" in attached:
        res["checks"]["C added keys of its own"] = bool(attached["C"].get("keys_added"))
    print(json.dumps(res["checks"], indent=1), flush=True)
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
