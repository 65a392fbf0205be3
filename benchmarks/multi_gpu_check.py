"""Multi-GPU acceptance run: TP=N attach and detach, then N TP=1 instances at once.

Starts a pool over --gpus through the `vllm` command route, attaches the model with TP equal
to the number of GPUs, asks for a greedy completion, detaches and checks every GPU is back
at its idle memory; then attaches one TP=1 instance per GPU concurrently, asks each, detaches
all and checks memory again. Writes JSON with the timings and memory figures.

  python benchmarks/multi_gpu_check.py --gpus 0-1 --model /root/models/l1b --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attach import first_completion, free_port, stop_group  # noqa: E402
from pool_calls import wait_pool  # noqa: E402

from vllm_pool.client import PoolClient, PoolError  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", default="0-1")
    p.add_argument("--model", required=True)
    p.add_argument("--engine-args", default="--dtype bfloat16 --max-model-len 2048")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="multi-gpu-")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    log = open(os.path.join(log_dir, "daemon.log"), "ab")
    daemon = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve-pool",
                               "--gpus", a.gpus, "--port", str(port), "--log-dir", log_dir],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    res: dict = {"gpus": a.gpus, "model": a.model}
    c = PoolClient(url, timeout=1800)
    try:
        wait_pool(url, daemon, 600)
        res["pool_ready_s"] = time.perf_counter() - t0
        workers = c.workers()
        n = len(workers)
        res["idle_memory_mib"] = [w.baseline_bytes / 2**20 for w in workers]

        def attach(name, tp, devices=None):
            t = time.perf_counter()
            try:
                inst = c.attach({"model": a.model, "tp": tp, "name": name,
                                 "devices": devices, "args": a.engine_args.split()})
            except PoolError as e:  # the message lands in the JSON's errors: as before
                if e.status is None:
                    raise
                raise RuntimeError(f"attach {name}: {e.status} {e.body}") from None
            out = first_completion(inst.url, a.model)
            return {"name": name, "tp": tp, "devices": inst.devices,
                    "attach_to_first_completion_s": time.perf_counter() - t,
                    "phases": inst.phases, "output": out["text"]}

        def after_detach():
            return [{"device": w.device, "state": w.state.value, "pid": w.pid,
                     "delta_mib": (w.memory_bytes - w.baseline_bytes) / 2**20}
                    for w in c.workers()]

        pids = [w.pid for w in workers]
        res[f"tp{n}"] = attach(f"tp{n}", n)
        t = time.perf_counter()
        c.detach(f"tp{n}", timeout=1800)
        res[f"tp{n}"]["detach_s"] = time.perf_counter() - t
        res[f"tp{n}"]["after_detach"] = after_detach()
        print(json.dumps(res[f"tp{n}"], indent=1), flush=True)

        singles: dict = {}
        errors: list = []

        def one(i):
            try:
                singles[i] = attach(f"single{i}", 1, [f"cuda:{i}"])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))

        t = time.perf_counter()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        res["tp1_concurrent"] = {"wall_s": time.perf_counter() - t, "instances": singles,
                                 "errors": errors}
        for i in singles:
            c.detach(f"single{i}", timeout=1800)
        res["tp1_concurrent"]["after_detach"] = after_detach()
        res["same_pids_throughout"] = [w.pid for w in c.workers()] == pids
        print(json.dumps(res["tp1_concurrent"], indent=1), flush=True)
    finally:
        stop_group(daemon)
        res["daemon_exit_code"] = daemon.returncode
        if a.output_json:
            with open(a.output_json, "w") as f:
                json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k not in ("tp1_concurrent",)}, indent=1))
    return 0 if not res.get("tp1_concurrent", {}).get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
