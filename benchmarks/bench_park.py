"""Benchmark: parked models. Park, re-attach (wake) and swap on one pool slot.

One pool with --enable-parking; on its first device:
  1. attach model A cold (to first completion), greedy tokens as reference;
  2. --reps times: park A (detach --park), the device memory of A's processes while parked,
     re-attach A (a wake: same instance and endpoint) to first completion, tokens again;
  3. attach model B cold, then --reps swaps between A and B, both parked in turn: request
     for the parked one to its first completion (the pool parks the serving one first);
  4. each instance's host memory while parked, and whether the wake kept the greedy tokens.

On CPU vLLM's sleep does nothing: parking keeps the engine alive, so the figures there show
the pool's own cost (state machine, HTTP, routing), not the GPU's.

Example (H100, 1.1B):
  python benchmarks/bench_park.py --device gpu --model /root/models/l1b \
      --model-b /root/models/l1b-b --engine-args "--dtype bfloat16 --max-model-len 2048 \
      --gpu-memory-utilization 0.45" --output-json park.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_attach import build_models, first_completion, stop_group
from common import free_port, machine, start_run
from pool_calls import detach_all, wait_pool

from vllm_pool.api_models import InstanceInfo
from vllm_pool.client import PoolClient, PoolError


def gpu_mem_by_pid() -> dict[int, int]:
    """Device memory per process (bytes), from nvidia-smi; {} where it cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    res = {}
    for ln in out.splitlines():
        try:
            pid, mib = (x.strip() for x in ln.split(","))
            res[int(pid)] = int(mib) * 2**20
        except ValueError:
            continue
    return res


def gpu_used_total() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout.split()
        return int(out[0]) * 2**20
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return None


class ParkPool:
    def __init__(self, a, log_dir: str):
        self.port = a.pool_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        dev = ["--gpus", a.gpus] if a.device == "gpu" else ["--cpu-slots", "1"]
        self.log = open(os.path.join(log_dir, "daemon.log"), "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_pool", "serve", *dev, "--port", str(self.port),
             "--log-dir", log_dir, "--enable-parking", "--wake-evicts", "park",
             "--state-file", "none"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_pool(self.url, self.proc, a.timeout)
        self.ready_s = time.perf_counter() - t0
        self.client = PoolClient(self.url, timeout=a.timeout)
        self.timeout = a.timeout

    def attach(self, a, model: str, name: str) -> tuple[InstanceInfo, float, dict]:
        """POST /instances (201, or 200 for a wake) to first completion: (instance, seconds,
        output)."""
        t0 = time.perf_counter()
        inst = self.client.attach({"model": model, "tp": a.tp, "name": name,
                                   "args": a.engine_args, "timeout_s": a.timeout})
        out = first_completion(inst.url, model)
        return inst, time.perf_counter() - t0, out

    def park(self, name: str) -> float:
        t0 = time.perf_counter()
        self.client.detach(name, park=True, timeout=self.timeout)
        return time.perf_counter() - t0

    def worker_pids(self, inst: InstanceInfo) -> list[int]:
        return [w.pid for w in self.client.workers() if w.instance_id == inst.id]

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


def parked_memory(pool: ParkPool, inst: InstanceInfo, device: str) -> dict:
    """Device memory of the parked instance's worker processes (GPU), host memory (pool)."""
    time.sleep(1.0)  # the driver's accounting lags the release by a moment
    try:
        info = pool.client.instance(inst.name)
        res = {"state": info.state.value, "host_bytes": info.host_bytes}
    except PoolError as e:  # gone, not parked: recorded (no state), not fatal
        if e.status is None:
            raise
        res = {"state": None, "host_bytes": None}
    if device == "gpu":
        per_pid = gpu_mem_by_pid()
        pids = pool.worker_pids(inst)
        res["worker_pids"] = pids
        res["device_bytes_per_worker"] = [per_pid.get(p) for p in pids]
        res["gpu_used_total_bytes"] = gpu_used_total()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description="parked models: park, re-attach, swap")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--gpus", default="0")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--model", default=None, help="default: tiny model built here")
    p.add_argument("--model-b", default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--engine-args", default="--dtype float32 --max-model-len 512 --enforce-eager")
    p.add_argument("--pool-port", type=int, default=0, help="default: a free port")
    p.add_argument("--serve-before-park", type=float, default=0.0,
                   help="seconds between A's first completion and its first park (the weights' "
                        "host copy is made in the background meanwhile)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    scratch, log_dir = start_run(a, "bench-park-")
    model_a, model_b = build_models(a, scratch)
    import vllm

    res: dict = {"machine": machine(a.device), "device": a.device,
                 "vllm_version": vllm.__version__, "model": model_a, "model_b": model_b,
                 "settings": {k: v for k, v in vars(a).items()
                              if k not in ("output_json", "log_dir")},
                 "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.device == "gpu":
        res["gpu_used_before_pool_bytes"] = gpu_used_total()
    pool = ParkPool(a, log_dir)
    res["pool_ready_s"] = pool.ready_s
    try:
        if a.device == "gpu":
            res["gpu_used_idle_pool_bytes"] = gpu_used_total()
            res["idle_worker_device_bytes"] = list(gpu_mem_by_pid().values())
        inst_a, t, ref_a = pool.attach(a, model_a, "a")
        res["attach_a_cold_s"] = t
        time.sleep(a.serve_before_park)  # a model serves a while before it is parked
        res["parks"], res["reattaches"] = [], []
        for rep in range(a.reps):
            res["parks"].append({"park_s": pool.park("a"),
                                 **parked_memory(pool, inst_a, a.device)})
            inst, t, out = pool.attach(a, model_a, "a")
            res["reattaches"].append({
                "to_first_completion_s": t, "woken": inst.woken,
                "same_instance": inst.id == inst_a.id and inst.url == inst_a.url,
                "same_greedy_tokens": out == ref_a, "phases": inst.phases})
            print(f"[rep {rep}] park {res['parks'][-1]['park_s']:.2f}s, re-attach "
                  f"{t:.2f}s, woken {inst.woken}, same tokens {out == ref_a}", flush=True)
        res["park_a_before_b_s"] = pool.park("a")
        inst_b, t, ref_b = pool.attach(a, model_b, "b")
        res["attach_b_cold_s"] = t
        pool.park("b")
        res["swaps"] = []
        refs = {"a": (model_a, ref_a), "b": (model_b, ref_b)}
        # Serving A and parked B at first; each swap wakes the parked one (the pool parks the
        # serving one to make room).
        pool.attach(a, model_a, "a")
        for rep in range(2 * a.reps):
            to = "b" if rep % 2 == 0 else "a"
            model, ref = refs[to]
            inst, t, out = pool.attach(a, model, to)
            res["swaps"].append({"to": to, "to_first_completion_s": t,
                                 "woken": inst.woken, "same_greedy_tokens": out == ref})
            print(f"[swap {rep}] -> {to}: {t:.2f}s, woken {inst.woken}, same tokens "
                  f"{out == ref}", flush=True)
        res["instances_end"] = [i.model_dump(mode="json") for i in pool.client.instances()]
        detach_all(pool.client, ("a", "b"), a.timeout)
        res["workers_end"] = [w.model_dump(mode="json") for w in pool.client.workers()]
    finally:
        pool.stop()
    summarize(res)
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=2)
    print_table(res)
    return 0


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} \
        if xs else {}


def summarize(res: dict) -> None:
    parks = [p["park_s"] for p in res["parks"]]
    s = {"park_first_s": parks[0] if parks else None,
         "park_later_s": _stats(parks[1:]),
         "reattach_s": _stats([r["to_first_completion_s"] for r in res["reattaches"]]),
         "swap_s": _stats([r["to_first_completion_s"] for r in res["swaps"]]),
         "all_woken": all(r["woken"] for r in res["reattaches"] + res["swaps"]),
         "same_greedy_tokens": all(r["same_greedy_tokens"]
                                   for r in res["reattaches"] + res["swaps"]),
         "host_bytes_parked": max((p.get("host_bytes") or 0 for p in res["parks"]), default=0)}
    dev = [b for p in res["parks"] for b in p.get("device_bytes_per_worker", []) if b]
    if dev:
        s["parked_device_bytes_per_worker_max"] = max(dev)
    res["summary"] = s


def print_table(res: dict) -> None:
    s = res["summary"]
    mib = 2**20
    print(f"\n=== parked models | {res['machine']} | vLLM {res['vllm_version']} | model "
          f"{os.path.basename(res['model'].rstrip('/'))} ===")
    print(f"{'measure':<44}{'median':>9}{'min':>9}{'max':>9}")
    print(f"{'attach A cold, to 1st completion (s)':<44}{res['attach_a_cold_s']:>9.2f}")
    print(f"{'park A, first (s)':<44}{s['park_first_s']:>9.2f}")
    for key, label in (("park_later_s", "park A, later (s)"),
                       ("reattach_s", "re-attach A (wake) to 1st completion (s)"),
                       ("swap_s", "swap, both parked, to 1st completion (s)")):
        v = s[key]
        if v:
            print(f"{label:<44}{v['median']:>9.2f}{v['min']:>9.2f}{v['max']:>9.2f}")
    if "parked_device_bytes_per_worker_max" in s:
        print(f"{'device memory per parked worker (MiB)':<44}"
              f"{s['parked_device_bytes_per_worker_max'] / mib:>9.0f}")
    if res.get("idle_worker_device_bytes"):
        print(f"{'device memory per idle worker (MiB)':<44}"
              f"{max(res['idle_worker_device_bytes']) / mib:>9.0f}")
    print(f"{'host memory of parked A (MiB)':<44}{s['host_bytes_parked'] / mib:>9.0f}")
    print(f"every re-attach a wake: {s['all_woken']}; greedy tokens unchanged: "
          f"{s['same_greedy_tokens']}")


if __name__ == "__main__":
    sys.exit(main())
