"""Two models on one GPU (issue 19, items 1, 2 and 4): run with VLLM_POOL_TEST_GPUS=0.

  VLLM_POOL_TEST_GPUS=0 python -m pytest tests/test_gpu_sharing.py -s
  bash benchmarks/gpu_sharing.sh     # the same on the lent GPU machine, results in $OUT

A pool with parking on GPU 0 puts a second worker beside a parked one, so two workers (and
two models) share the device. What is checked:

- the issue's sequence: attach A; park A; attach B; wake A (B parked); wake B (A parked);
  detach A; detach B: no worker respawned, no worker found unclean, the greedy tokens of
  plain vLLM after every wake, and every worker's figures its own (its idle baseline a
  CUDA context's size, not the other model's share of the device);
- kill -9 of one of the two workers while the other model serves (or is woken): that model
  keeps plain vLLM's greedy tokens, and the killed slot's new process passes its kernel
  warm-up on a device that the other model mostly holds.

Timings (detach, park, wake; the issue's target is detach <= 5 s) are benchmark figures:
written to gpu-sharing.json in the test log directory and printed, not asserted.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time

import pytest

from tests import helpers

pytestmark = pytest.mark.skipif(not helpers.GPUS, reason="GPU test: set VLLM_POOL_TEST_GPUS=0")

DEVICE = "cuda:0"
GiB = 2**30
# An idle worker's own device memory: its CUDA context and what loaded kernels add (0.6 to
# 1.4 GiB measured on H100/H200); a model's share here is 0.4 of the device (56 GiB).
IDLE_MAX = 4 * GiB
# What a detached worker may keep over its idle figure: the pool's default
# --memory-slack-mib + --context-memory-mib.
KEPT_MAX = (256 + 1024) * 2**20
DETACH_TARGET_S = 5.0
RESULTS: dict = {"sequence": {}, "kill": {}}


def _args(util: float) -> list[str]:
    args = list(helpers.ENGINE_ARGS)
    i = args.index("--gpu-memory-utilization")
    args[i + 1] = str(util)
    return args


@pytest.fixture(scope="module")
def refs(reference, model_a, model_b):
    """Plain vLLM's greedy tokens, taken before the pool holds anything on the GPU."""
    return {model_a: reference(model_a), model_b: reference(model_b)}


@pytest.fixture(scope="module")
def gpu_pool(refs, logs):
    # `eager`: every new process of the device's own worker runs the kernel warm-up, the
    # respawn in the kill test included (the extra workers beside parked ones do not).
    d = helpers.Daemon(1, os.path.join(logs, "gpu-sharing-pool"),
                       ["--enable-parking", "--kernel-warmup", "eager"])
    try:
        d.wait_ready(900)
        yield d
    finally:
        rc = d.stop()
        RESULTS["machine"] = _gpu_name()
        path = os.path.join(logs, "gpu-sharing.json")
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
        print(f"\n{path}:\n{json.dumps(RESULTS, indent=1)}")
        assert rc == 0
        assert helpers.pool_leftovers(d.port) == {"processes": [], "shm": [], "run_dirs": []}


def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _unclean_or_respawned(d) -> list[str]:
    """Lines of the pool's logs that say a worker failed its clean check or was respawned."""
    found = []
    for path in glob.glob(os.path.join(d.log_dir, "*.log")):
        with open(path, errors="replace") as f:
            found += [ln.strip() for ln in f if "unclean after detach" in ln
                      or "respawning" in ln or "kernel warm-up failed" in ln]
    return found


def _by_slot(d) -> dict[int, dict]:
    return {w["slot"]: w for w in d.workers()}


def _state(d) -> dict[str, str]:
    return {i["name"]: i["state"] for i in d.instances()}


def _own_figures_ok(w: dict) -> None:
    assert w["memory_source"] == "nvml", w
    assert 0 < w["baseline_bytes"] < IDLE_MAX, w
    assert w["device_total_bytes"] and w["device_free_bytes"] is not None, w


def _timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, round(time.perf_counter() - t0, 3)


@pytest.mark.timeout(1800)  # the plain-vLLM references and the pool's start come first
def test_park_wake_detach_two_models_one_gpu_no_respawn(gpu_pool, model_a, model_b, refs):
    d = gpu_pool
    rec = RESULTS["sequence"]
    assert _unclean_or_respawned(d) == []
    r = d.attach(model_a, name="a", devices=[DEVICE])
    assert r.status_code == 201, r.text
    a = r.json()
    slot_a = a["workers"][0]
    assert helpers.greedy(a["url"], model_a) == refs[model_a]
    # With parking on, an attach starts the next worker beside it.
    d.wait_workers(lambda ws: any(w["slot"] != slot_a and w["device"] == DEVICE
                                  and w["state"] == "idle" for w in ws), 600)

    (r, rec["park_a_s"]) = _timed(lambda: d.client.delete("/instances/a",
                                                          params={"park": "true"}))
    assert r.status_code == 200 and r.json()["state"] == "parked", r.text
    r = d.attach(model_b, name="b", devices=[DEVICE])
    assert r.status_code == 201, r.text
    b = r.json()
    slot_b = b["workers"][0]
    assert slot_b != slot_a
    assert helpers.greedy(b["url"], model_b) == refs[model_b]
    pids = {s: w["pid"] for s, w in _by_slot(d).items()}

    # Both models on the device: each worker's figures are its own.
    ws = _by_slot(d)
    total = ws[slot_b]["device_total_bytes"]
    for s in (slot_a, slot_b):  # (the worker started beside B may still be starting)
        _own_figures_ok(ws[s])
    assert ws[slot_b]["memory_bytes"] > 0.3 * total, ws[slot_b]  # B's own 0.4 share
    assert ws[slot_a]["memory_bytes"] < IDLE_MAX * 2, ws[slot_a]  # A asleep: contexts only
    parked_a = d.client.get("/instances/a").json()
    assert 0 < parked_a["device_bytes"] < IDLE_MAX * 2, parked_a
    rec["parked_a_device_mib"] = parked_a["device_bytes"] / 2**20
    rec["serving_b_own_mib"] = ws[slot_b]["memory_bytes"] / 2**20
    rec["device_free_mib_a_parked_b_serving"] = ws[slot_b]["device_free_bytes"] / 2**20

    (r, rec["wake_a_s"]) = _timed(lambda: d.client.post("/instances/a/wake"))
    assert r.status_code == 200, r.text
    rec["wake_a_phases"] = r.json()["phases"]
    assert _state(d) == {"a": "serving", "b": "parked"}
    assert helpers.greedy(a["url"], model_a) == refs[model_a]

    (r, rec["wake_b_s"]) = _timed(lambda: d.client.post("/instances/b/wake"))
    assert r.status_code == 200, r.text
    rec["wake_b_phases"] = r.json()["phases"]
    assert _state(d) == {"a": "parked", "b": "serving"}
    assert helpers.greedy(b["url"], model_b) == refs[model_b]

    # Detach of the parked A while B serves on the same GPU: A's worker stays, clean.
    (r, rec["detach_parked_a_s"]) = _timed(lambda: d.detach("a"))
    assert r.status_code == 200 and r.json()["state"] == "detached", r.text
    ws = d.wait_workers(lambda ws: any(w["slot"] == slot_a and w["state"] == "idle"
                                       for w in ws), 120)
    wa = next(w for w in ws if w["slot"] == slot_a)
    assert wa["pid"] == pids[slot_a] and wa["restarts"] == 0 and wa["error"] is None, wa
    _own_figures_ok(wa)
    assert wa["memory_bytes"] - wa["baseline_bytes"] <= KEPT_MAX, wa
    assert helpers.greedy(b["url"], model_b) == refs[model_b]  # B never noticed

    (r, rec["detach_serving_b_s"]) = _timed(lambda: d.detach("b"))
    assert r.status_code == 200, r.text
    ws = d.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 120)
    # Extra workers beyond one idle per device are stopped by design (not respawned):
    # whoever is left kept its PID.
    for w in ws:
        assert w["restarts"] == 0 and w["error"] is None, w
        if w["slot"] in pids:
            assert w["pid"] == pids[w["slot"]], (w, pids)
        _own_figures_ok(w)
        assert w["memory_bytes"] - w["baseline_bytes"] <= KEPT_MAX, w
    assert _unclean_or_respawned(d) == []
    rec["detach_target_s"] = DETACH_TARGET_S
    rec["detach_within_target"] = max(rec["detach_parked_a_s"],
                                      rec["detach_serving_b_s"]) <= DETACH_TARGET_S
    rec["idle_baselines_mib"] = {w["slot"]: w["baseline_bytes"] / 2**20 for w in ws}
    print("sequence:", json.dumps(rec))


@pytest.mark.parametrize("victim", ["parked", "serving"])
def test_kill9_of_one_of_two_workers_on_a_shared_gpu(gpu_pool, model_a, model_b, refs,
                                                    victim):
    """A parked and B serving on one GPU, B with most of the device (0.85). kill -9 of A's
    worker: B keeps serving plain vLLM's tokens. kill -9 of B's: A, woken, serves them.
    The killed slot's new process (the device's own worker: it runs the kernel warm-up)
    warms up beside the model that holds the GPU."""
    d = gpu_pool
    rec = RESULTS["kill"].setdefault(victim, {})
    d.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 300)
    r = d.attach(model_a, name="ka", devices=[DEVICE])
    assert r.status_code == 201, r.text
    ka = r.json()
    assert d.client.delete("/instances/ka", params={"park": "true"}).status_code == 200
    r = d.attach(model_b, name="kb", devices=[DEVICE], args=_args(0.85))
    assert r.status_code == 201, r.text
    kb = r.json()
    assert helpers.greedy(kb["url"], model_b) == refs[model_b]
    slot_a, slot_b = ka["workers"][0], kb["workers"][0]
    before = _by_slot(d)
    rec["device_free_mib_before_kill"] = before[slot_b]["device_free_bytes"] / 2**20
    dead, other = (slot_a, slot_b) if victim == "parked" else (slot_b, slot_a)
    os.kill(before[dead]["pid"], signal.SIGKILL)

    dead_name, live_name = ("ka", "kb") if victim == "parked" else ("kb", "ka")
    deadline = time.monotonic() + 120
    while _state(d).get(dead_name) != "failed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _state(d)[dead_name] == "failed", d.instances()
    if victim == "parked":
        assert _state(d)["kb"] == "serving"
        assert helpers.greedy(kb["url"], model_b) == refs[model_b]
    else:
        r = d.client.post("/instances/ka/wake")
        assert r.status_code == 200, r.text
        assert helpers.greedy(ka["url"], model_a) == refs[model_a]

    # The killed slot comes back as a new process; the other worker is the same process.
    n_devices = len(helpers.GPUS.split(","))

    def back(ws):
        w = next((w for w in ws if w["slot"] == dead), None)
        if w is None:  # an extra worker the pool no longer needs: not respawned
            return True
        wu = w["kernel_warmup"]
        return w["state"] in ("idle", "serving") and wu["state"] in ("done", "off", "failed")

    ws = {w["slot"]: w for w in d.wait_workers(back, 900)}
    assert ws[other]["pid"] == before[other]["pid"]
    assert ws[other]["restarts"] == before[other]["restarts"], ws[other]
    if dead in ws:
        new = ws[dead]
        assert new["pid"] != before[dead]["pid"], new
        assert new["restarts"] == before[dead]["restarts"] + 1, new
        _own_figures_ok(new)  # its idle baseline is its own, not the other model's
        rec["respawned_baseline_mib"] = new["baseline_bytes"] / 2**20
        rec["respawned_kernel_warmup"] = new["kernel_warmup"]
        rec["respawned_kernel_warmup_s"] = new["kernel_warmup_s"]
        if dead < n_devices:  # the device's own worker: its warm-up ran on the busy GPU
            assert new["kernel_warmup"]["state"] == "done", new
            assert new["kernel_warmup_s"] > 0, new
    live = ka if live_name == "ka" else kb
    live_model = model_a if live_name == "ka" else model_b
    assert helpers.greedy(live["url"], live_model) == refs[live_model]

    (r, rec["detach_failed_s"]) = _timed(lambda: d.detach(dead_name))
    assert r.status_code == 200, r.text
    (r, rec["detach_live_s"]) = _timed(lambda: d.detach(live_name))
    assert r.status_code == 200, r.text
    ws = d.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 300)
    for w in ws:
        _own_figures_ok(w)
    lines = [ln for ln in _unclean_or_respawned(d) if "unclean" in ln
             or "kernel warm-up failed" in ln]
    assert lines == [], lines
    print(f"kill {victim}:", json.dumps(rec))


@pytest.mark.timeout(1800)
def test_packing_three_models_of_0_3_serve_at_once_then_a_fourth(gpu_pool, model_a, model_b,
                                                                 model_a_ft, reference, refs):
    """Issue 19 item 3 (select with `-k packing`): three attaches of 0.3 each all serve at
    once on GPU 0, each with plain vLLM's greedy tokens; a fourth gets 409 with figures;
    after one detach the fourth attaches and serves."""
    from vllm_pool.testing.tiny_model import build_model

    d = gpu_pool
    model_c = build_model(os.path.join(os.path.dirname(model_a), "tiny-c"), seed=4,
                          num_layers=3)
    models = {"p1": model_a, "p2": model_b, "p3": model_a_ft, "p4": model_c}
    want = {m: refs.get(m) or reference(m) for m in models.values()}
    d.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 300)
    urls = {}
    for name in ("p1", "p2", "p3"):
        r = d.attach(models[name], name=name, args=_args(0.3))
        assert r.status_code == 201, r.text
        assert r.json()["devices"] == [DEVICE] and r.json()["gpu_memory_utilization"] == 0.3
        urls[name] = r.json()["url"]
    assert {n: s for n, s in _state(d).items() if n in urls} == dict.fromkeys(urls, "serving")
    for name, url in urls.items():  # all three serve at once
        assert helpers.greedy(url, models[name]) == want[models[name]], name
    dev = next(x for x in d.client.get("/devices").json() if x["device"] == DEVICE)
    assert set(urls) <= set(dev["instances"]), dev
    RESULTS["packing"] = {"device_after_three": dev}
    r = d.attach(model_c, name="p4", args=_args(0.3))
    assert r.status_code == 409 and "no room" in r.text and "margin" in r.text, r.text
    assert "p4" not in _state(d)
    r = d.detach("p2")
    assert r.status_code == 200, r.text
    r = d.attach(model_c, name="p4", args=_args(0.3))
    assert r.status_code == 201, r.text
    urls["p4"] = r.json()["url"]
    for name in ("p1", "p3", "p4"):
        assert helpers.greedy(urls[name], models[name]) == want[models[name]], name
    for name in ("p1", "p3", "p4"):
        assert d.detach(name).status_code == 200
    d.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 300)
    assert _unclean_or_respawned(d) == []
