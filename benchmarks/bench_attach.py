"""Benchmark: pool attach against plain `vllm serve`, side by side, on one machine.

In one run, interleaving the contenders so drift hits both:
  1. plain `vllm serve`: launch to /health 200 and to the first completion;
  2. pool attach: request to /health 200 and to the first completion, with the phases;
  3. detach: time, and each worker's memory after it against its idle baseline;
  4. swap: model A detached and model B attached on the same workers, to B's first completion;
  5. serving parity: a seeded random workload against an attached engine and plain vLLM;
  6. the compile-cache state (empty or warm) of every measurement.

Example (CPU, tiny models built on the fly):
  python benchmarks/bench_attach.py --device cpu --reps 3 --output-json cpu.json
Example (GPU, 1.1B model):
  python benchmarks/bench_attach.py --device gpu --gpus 0 --model /root/models/l1b \
      --model-b /root/models/l1b-b --reps 2 --output-json h100.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from common import free_port, machine, start_run, wait_health
from pool_calls import wait_pool

from vllm_pool.api_models import InstanceInfo
from vllm_pool.client import PoolClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- processes ----------------------------------------------------------------------



def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def first_completion(url: str, model: str, max_tokens: int = 16) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": "def main(", "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True})
    r.raise_for_status()
    ch = r.json()["choices"][0]
    return {"text": ch["text"], "token_ids": ch.get("token_ids")}


def cache_state(env: dict) -> str:
    root = env.get("VLLM_CACHE_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "vllm")
    d = os.path.join(root, "torch_compile_cache")
    return "warm" if os.path.isdir(d) and os.listdir(d) else "empty"


def cache_env(mode: str, scratch: str) -> dict:
    """'empty': fresh vLLM, Inductor and Triton caches for this one measurement."""
    if mode == "warm":
        return {}
    d = tempfile.mkdtemp(prefix="cache-", dir=scratch)
    return {"VLLM_CACHE_ROOT": os.path.join(d, "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(d, "inductor"),
            "TRITON_CACHE_DIR": os.path.join(d, "triton")}


# ---- contenders ---------------------------------------------------------------------
def run_plain(a, model: str, extra_env: dict, log: str, workload: bool,
              mp: bool = False) -> dict:
    """Plain vLLM; `mp`: with `--distributed-executor-backend mp`, so that its worker is a
    separate process behind vLLM's shm MessageQueue as an attached engine's is. On GPU,
    TP=1 otherwise runs the worker inside EngineCore (UniProcExecutor); vLLM's CPU
    platform (0.32) already turns that into mp, so on CPU both plain contenders are one."""
    port = free_port()
    env = dict(os.environ, **extra_env)
    if a.device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(a.tp))
    else:
        env["CUDA_VISIBLE_DEVICES"] = a.gpus
    cache = cache_state(env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--port", str(port), "--tensor-parallel-size", str(a.tp), *a.engine_args,
             *(["--distributed-executor-backend", "mp"] if mp else [])],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_health(url, proc, a.timeout)
        t_health = time.perf_counter() - t0
        out = first_completion(url, model)
        t_first = time.perf_counter() - t0
        res = {"health_s": t_health, "first_completion_s": t_first, "cache": cache,
               "output": out}
        if workload:
            res["serving"] = serving(url, model, a)
        return res
    finally:
        stop_group(proc)


class Pool:
    def __init__(self, a, log_dir: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        dev = ["--gpus", a.gpus] if a.device == "gpu" else ["--cpu-slots", str(a.cpu_slots)]
        cli = ([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve-pool"]
               if a.pool_cli == "vllm" else [sys.executable, "-m", "vllm_pool", "serve"])
        t0 = time.perf_counter()
        self.log = open(os.path.join(log_dir, "daemon.log"), "ab")
        self.proc = subprocess.Popen([*cli, *dev, "--port", str(self.port), "--log-dir", log_dir,
                                      "--kernel-warmup", a.kernel_warmup],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_pool(self.url, self.proc, a.timeout)
        self.ready_s = time.perf_counter() - t0
        self.client = PoolClient(self.url, timeout=a.timeout)
        self.timeout = a.timeout
        # Each worker's start: process warm-up, then the kernel warm-up attach (if on), and
        # its idle footprint after both (what detaches are measured against).
        self.workers_at_start = [
            {k: getattr(w, k) for k in ("slot", "device", "start_s", "kernel_warmup_s",
                                        "baseline_bytes")}
            for w in self.client.workers()]

    def attach(self, a, model: str, name: str, extra_env: dict) -> InstanceInfo:
        return self.client.attach({"model": model, "tp": a.tp, "name": name,
                                   "args": a.engine_args, "env": extra_env,
                                   "timeout_s": a.timeout})

    def detach(self, name: str) -> float:
        t0 = time.perf_counter()
        self.client.detach(name, timeout=self.timeout)
        return time.perf_counter() - t0

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


def run_attach(a, pool: Pool, model: str, name: str, extra_env: dict, workload: bool) -> dict:
    env = dict(os.environ, **extra_env)
    cache = cache_state(env)
    pids = {w.slot: w.pid for w in pool.client.workers()}
    t0 = time.perf_counter()
    inst = pool.attach(a, model, name, extra_env)
    t_health = time.perf_counter() - t0
    out = first_completion(inst.url, model)
    t_first = time.perf_counter() - t0
    res = {"health_s": t_health, "first_completion_s": t_first, "cache": cache,
           "phases": inst.phases, "engine_host": inst.engine_host, "output": out}
    if workload:
        res["serving"] = serving(inst.url, model, a)
    res["detach_s"] = pool.detach(name)
    ws = pool.client.workers()
    res["memory_after_detach"] = [
        {"device": w.device, "after_bytes": w.memory_bytes,
         "idle_bytes": w.baseline_bytes, "delta_mib": (w.memory_bytes - w.baseline_bytes) / 2**20,
         "state": w.state.value, "same_pid": w.pid == pids.get(w.slot)}
        for w in ws if w.slot in inst.workers]
    return res


def run_swap(a, pool: Pool, model_a: str, model_b: str, extra_env: dict) -> dict:
    inst_a = pool.attach(a, model_a, "swap-a", extra_env)
    first_completion(inst_a.url, model_a)
    t0 = time.perf_counter()
    pool.detach("swap-a")
    inst = pool.attach(a, model_b, "swap-b", extra_env)
    first_completion(inst.url, model_b)
    t = time.perf_counter() - t0
    pool.detach("swap-b")
    return {"swap_to_first_completion_s": t, "phases_b": inst.phases,
            "engine_host_b": inst.engine_host}


# ---- serving workload -----------------------------------------------------------------
def serving(url: str, model: str, a) -> dict:
    """The workload `--serving-rounds` times on the same server; each figure is the median
    over rounds (one round of a few seconds is too noisy on a GPU to compare)."""
    for _ in range(a.warmup_rounds):  # unmeasured: first-batch JIT and allocator growth
        asyncio.run(serve_workload(url, model, a))
    rounds = [asyncio.run(serve_workload(url, model, a)) for _ in range(a.serving_rounds)]
    med = statistics.median
    return {"rounds": rounds,
            "duration_s": med(r["duration_s"] for r in rounds),
            "output_tok_per_s": med(r["output_tok_per_s"] for r in rounds),
            **{k: {q: med(r[k][q] for r in rounds) for q in ("p50", "p90", "p99")}
               for k in ("ttft_ms", "itl_ms")}}


async def serve_workload(url: str, model: str, a) -> dict:
    rng = random.Random(a.seed)
    vocab = list(range(10, 1000))
    prompts = [[rng.choice(vocab) for _ in range(a.input_len)] for _ in range(a.num_prompts)]
    sem = asyncio.Semaphore(a.concurrency)
    ttfts, itls, tokens = [], [], 0

    async def one(client, p):
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            last = None
            n = 0
            async with client.stream("POST", url + "/v1/completions", json={
                    "model": model, "prompt": p, "max_tokens": a.output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttfts.append(now - t0)
                    else:
                        itls.append(now - last)
                    last = now
                    n += 1
            tokens += a.output_len

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as c:
        await asyncio.gather(*(one(c, p) for p in prompts))
    dur = time.perf_counter() - t0

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] * 1000 if xs else None

    return {"duration_s": dur, "output_tok_per_s": tokens / dur,
            "ttft_ms": {"p50": pct(ttfts, 50), "p90": pct(ttfts, 90), "p99": pct(ttfts, 99)},
            "itl_ms": {"p50": pct(itls, 50), "p90": pct(itls, 90), "p99": pct(itls, 99)}}


# ---- reporting -----------------------------------------------------------------------
def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} \
        if xs else {}




def build_models(a, scratch: str) -> tuple[str, str]:
    from vllm_pool.testing.tiny_model import build_model

    cache = os.path.join(ROOT, ".cache", "models")
    ma = a.model or build_model(os.path.join(cache, "tiny-a"), seed=0)
    mb = a.model_b or build_model(os.path.join(cache, "tiny-b"), seed=1, num_layers=2)
    return ma, mb


def main() -> int:
    p = argparse.ArgumentParser(description="pool attach vs plain vllm serve")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--gpus", default="0")
    p.add_argument("--cpu-slots", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--model", default=None, help="default: tiny model built here")
    p.add_argument("--model-b", default=None, help="second model for the swap")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-modes", default="warm", help="comma list of empty,warm")
    p.add_argument("--engine-args", default="--dtype float32 --max-model-len 512 --enforce-eager",
                   help="vllm serve arguments shared by both contenders")
    p.add_argument("--pool-cli", choices=["vllm-pool", "vllm"], default="vllm-pool")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--serving-rounds", type=int, default=1,
                   help="run the workload this many times per server; medians are reported")
    p.add_argument("--warmup-rounds", type=int, default=0,
                   help="unmeasured runs of the workload before the measured rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-workload", action="store_true")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--plain-mp", action="store_true",
                   help="also measure plain vLLM with --distributed-executor-backend mp "
                        "(contender 'plain-mp': worker in its own process, as attached)")
    p.add_argument("--kernel-warmup", choices=["auto", "off", "eager", "compiled"],
                   default="auto", help="the pool's kernel warm-up at worker start")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    scratch, log_dir = start_run(a, "bench-attach-")
    model_a, model_b = build_models(a, scratch)
    import vllm  # noqa: F401  (version only; the contenders run in their own processes)

    result = {"machine": machine(a.device), "device": a.device, "vllm_version": vllm.__version__,
              "model": model_a, "model_b": model_b, "settings": {
                  k: v for k, v in vars(a).items() if k not in ("output_json", "log_dir")},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    pool = Pool(a, log_dir)
    result["pool_ready_s"] = pool.ready_s
    result["workers_at_start"] = pool.workers_at_start
    try:
        for mode in a.cache_modes.split(","):
            for rep in range(a.reps):
                wl = not a.skip_workload and rep == 0 and mode == a.cache_modes.split(",")[-1]
                order = ["plain", *(["plain-mp"] if a.plain_mp else []), "attach"]
                if rep % 2:
                    order.reverse()
                for who in order:
                    env = cache_env(mode, scratch)
                    if who == "plain" and a.skip_plain:
                        continue
                    if who in ("plain", "plain-mp"):
                        r = run_plain(a, model_a, env, os.path.join(log_dir, f"{who}.log"), wl,
                                      mp=who == "plain-mp")
                    else:
                        r = run_attach(a, pool, model_a, f"bench-{mode}-{rep}", env, wl)
                    r.update(contender=who, cache_mode=mode, rep=rep)
                    result["runs"].append(r)
                    save(result, a.output_json, partial=True)
                    print(f"[{mode} rep {rep}] {who}: health {r['health_s']:.2f}s, "
                          f"first completion {r['first_completion_s']:.2f}s", flush=True)
                sw = run_swap(a, pool, model_a, model_b, cache_env(mode, scratch))
                sw.update(contender="swap", cache_mode=mode, rep=rep)
                result["runs"].append(sw)
                save(result, a.output_json, partial=True)
                print(f"[{mode} rep {rep}] swap A->B: {sw['swap_to_first_completion_s']:.2f}s",
                      flush=True)
    finally:
        pool.stop()
        for d in os.listdir(scratch):  # fresh compile caches of 'empty' runs; logs stay
            if d.startswith("cache-"):
                shutil.rmtree(os.path.join(scratch, d), ignore_errors=True)
    summarize(result)
    save(result, a.output_json, partial=False)
    print_table(result)
    return 0


def save(result: dict, path: str | None, partial: bool) -> None:
    """Written after every run too, so a run cut short by a time limit keeps what it got."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(dict(result, partial=partial), f, indent=2)
        os.replace(path + ".tmp", path)


def summarize(result: dict) -> None:
    s: dict = {}
    runs = result["runs"]
    for mode in sorted({r["cache_mode"] for r in runs}):
        rs = [r for r in runs if r["cache_mode"] == mode]
        m: dict = {}
        for who in CONTENDERS:
            sel = [r for r in rs if r["contender"] == who]
            if not sel and who == "plain-mp":
                continue
            m[who] = {k: stats([r[k] for r in sel]) for k in ("health_s", "first_completion_s")}
        att = [r for r in rs if r["contender"] == "attach"]
        m["attach"]["detach_s"] = stats([r["detach_s"] for r in att])
        m["attach"]["phases"] = {k: stats([r["phases"][k] for r in att])
                                 for k in (att[0]["phases"] if att else {})}
        m["attach"]["memory_after_detach_max_delta_mib"] = max(
            (x["delta_mib"] for r in att for x in r["memory_after_detach"]), default=None)
        m["swap"] = stats([r["swap_to_first_completion_s"] for r in rs if r["contender"] == "swap"])
        pl, at = m["plain"].get("first_completion_s"), m["attach"].get("first_completion_s")
        if pl and at:
            m["speedup_first_completion"] = pl["median"] / at["median"]
        srv = {r["contender"]: r["serving"] for r in rs if "serving" in r}
        if srv:
            m["serving"] = srv
        # serving_ratio: attached / plain; serving_ratio_mp: attached / plain-mp
        for key, base in (("serving_ratio", "plain"), ("serving_ratio_mp", "plain-mp")):
            if base in srv and "attach" in srv:
                m[key] = serving_ratio(srv["attach"], srv[base])
        outs = {json.dumps(r["output"]) for r in rs if r["contender"] in CONTENDERS}
        m["same_greedy_output"] = len(outs) == 1
        s[mode] = m
    result["summary"] = s


CONTENDERS = ("plain", "plain-mp", "attach")


def serving_ratio(att: dict, base: dict) -> dict:
    return {"throughput": att["output_tok_per_s"] / base["output_tok_per_s"],
            **{f"{k}_{q}": att[f"{k}_ms"][q] / base[f"{k}_ms"][q]
               for k in ("ttft", "itl") for q in ("p50", "p99")}}


def a_rounds(result: dict) -> int:
    return result["settings"].get("serving_rounds", 1)


def print_table(result: dict) -> None:
    print(f"\n=== attach vs vllm serve | {result['machine']} | vLLM {result['vllm_version']} | "
          f"model {os.path.basename(result['model'].rstrip('/'))} ===")
    kw = ", ".join(f"{w['device']} {w['kernel_warmup_s']:.1f}s"
                   for w in result.get("workers_at_start", []) if w.get("kernel_warmup_s"))
    print(f"pool ready in {result['pool_ready_s']:.1f}s (kernel warm-up "
          f"{result['settings'].get('kernel_warmup', 'auto')}{': ' + kw if kw else ''})")
    hdr = f"{'cache':<7}{'contender':<10}{'to /health (med/min/max)':<28}{'to 1st completion (med/min/max)':<34}"
    print(hdr)
    for mode, m in result["summary"].items():
        for who in CONTENDERS:
            h, f = m.get(who, {}).get("health_s"), m.get(who, {}).get("first_completion_s")
            if not h:
                continue
            print(f"{mode:<7}{who:<10}{h['median']:6.2f} / {h['min']:6.2f} / {h['max']:6.2f}s      "
                  f"{f['median']:6.2f} / {f['min']:6.2f} / {f['max']:6.2f}s")
        if m.get("speedup_first_completion"):
            print(f"{mode:<7}speed-up to first completion: {m['speedup_first_completion']:.1f}x")
        if m["swap"]:
            print(f"{mode:<7}swap A->B to first completion: {m['swap']['median']:.2f}s")
        d = m["attach"].get("detach_s")
        if d:
            print(f"{mode:<7}detach {d['median']:.2f}s; worker memory after detach vs idle: "
                  f"+{m['attach']['memory_after_detach_max_delta_mib']:.0f} MiB (max)")
        ph = m["attach"].get("phases", {})
        if ph:
            print(f"{mode:<7}attach phases (median s): " + ", ".join(
                f"{k} {v['median']:.2f}" for k, v in ph.items()))
        for who, sv in m.get("serving", {}).items():
            print(f"{mode:<7}serving {who:<9}{sv['output_tok_per_s']:7.0f} tok/s; TTFT p50/p99 "
                  f"{sv['ttft_ms']['p50']:.0f}/{sv['ttft_ms']['p99']:.0f} ms, ITL p50/p99 "
                  f"{sv['itl_ms']['p50']:.1f}/{sv['itl_ms']['p99']:.1f} ms "
                  f"(medians of {a_rounds(result)} rounds)")
        for key, base in (("serving_ratio", "plain"), ("serving_ratio_mp", "plain-mp")):
            if key in m:
                r = m[key]
                print(f"{mode:<7}serving attached/{base}: thr {r['throughput']:.3f}, "
                      f"TTFT p50 {r['ttft_p50']:.3f}, ITL p50 {r['itl_p50']:.3f}, "
                      f"TTFT p99 {r['ttft_p99']:.3f}, ITL p99 {r['itl_p99']:.3f}")
        print(f"{mode:<7}same greedy output, all contenders: {m['same_greedy_output']}")


if __name__ == "__main__":
    sys.exit(main())
