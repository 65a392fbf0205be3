"""Parked models on CPU: the states, the re-attach rule, a second worker per device,
eviction of the occupant on wake, the budget. (vLLM's sleep does nothing on CPU, so a
parked instance stays alive here; the GPU's sleep and wake are the same calls to vLLM's
endpoints, measured by the benchmark.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import helpers


@pytest.fixture(scope="module")
def parking_pool(logs, model_a, model_b, tmp_path_factory):
    """One CPU slot, parking on, and a gateway over two models (ga, gb) that share it."""
    args = "[" + ", ".join(helpers.ENGINE_ARGS) + "]"
    path = tmp_path_factory.mktemp("park") / "models.yaml"
    path.write_text(f"models:\n  - name: ga\n    model: {model_a}\n    args: {args}\n"
                    f"  - name: gb\n    model: {model_b}\n    args: {args}\n")
    d = helpers.Daemon(1, os.path.join(logs, "parking-pool"),
                       ["--enable-parking", "--models", str(path),
                        "--gateway-port", str(helpers.free_port())])
    d.gateway = d.proc.args[d.proc.args.index("--gateway-port") + 1]
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0
        assert helpers.pool_leftovers(d.port) == {"processes": [], "shm": [], "run_dirs": []}


def _ls(d) -> str:
    return subprocess.run([sys.executable, "-m", "vllm_pool", "ls", "--pool", d.url],
                          capture_output=True, text=True, timeout=60).stdout


def test_park_frees_the_device_and_reattach_wakes_the_same_instance(
        parking_pool, model_a, model_b, reference):
    d = parking_pool
    r = d.attach(model_a, name="a")
    assert r.status_code == 201, r.text
    a = r.json()
    before = helpers.greedy(a["url"], model_a)
    assert before == reference(model_a)
    first_pid = d.workers()[0]["pid"]

    r = d.client.delete("/instances/a", params={"park": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "parked" and r.json()["host_bytes"] > 0
    # The parked worker keeps the model; a second warm worker now serves cpu:0.
    ws = d.wait_workers(lambda ws: len(ws) == 2 and ws[1]["state"] == "idle", 240)
    assert ws[0]["state"] == "parked" and ws[0]["pid"] == first_pid
    assert ws[1]["device"] == ws[0]["device"] == "cpu:0"
    assert d.client.get("/health").status_code == 200
    out = _ls(d)
    assert "parked" in out and "host memory" in out, out

    r = d.attach(model_b, name="b")
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["workers"] == [1]
    assert helpers.greedy(b["url"], model_b) == reference(model_b)

    # Same model and settings again: the parked instance is woken, not built; it needs
    # cpu:0, so the occupant (b) is parked (the pool's default --wake-evicts park).
    r = d.attach(model_a)
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["woken"] and again["id"] == a["id"] and again["url"] == a["url"]
    assert "wake_total" in again["phases"]
    assert helpers.greedy(again["url"], model_a) == before
    states = {i["name"]: i["state"] for i in d.instances()}
    assert states == {"a": "serving", "b": "parked"}

    # A different setting is another model: no wake, and no free worker for it.
    r = d.attach(model_a, args=[*helpers.ENGINE_ARGS, "--max-num-seqs", "4"])
    assert r.status_code == 409, r.text

    # The wake call (what `vllm-pool gateway` uses) wakes b as it is, by name; a serving
    # instance is not parked, so waking it again is refused.
    r = d.client.post("/instances/b/wake")
    assert r.status_code == 200 and r.json()["id"] == b["id"], r.text
    assert helpers.greedy(b["url"], model_b) == reference(model_b)
    assert {i["name"]: i["state"] for i in d.instances()} == {"a": "parked", "b": "serving"}
    assert d.client.post("/instances/b/wake").status_code == 409
    assert d.client.post("/instances/nope/wake").status_code == 404

    # Detach for real: every worker beyond one per device is stopped again.
    assert d.detach("a").status_code == 200
    assert d.detach("b").status_code == 200
    ws = d.wait_workers(lambda ws: len(ws) == 1 and ws[0]["state"] == "idle", 120)
    assert d.instances() == []


def test_park_refused_when_parking_is_off(idle_pool, model_a):
    r = idle_pool.attach(model_a, name="nopark")
    assert r.status_code == 201, r.text
    r = idle_pool.client.delete("/instances/nopark", params={"park": "true"})
    assert r.status_code == 409 and "--enable-parking" in r.json()["detail"]
    assert idle_pool.instances()[0]["state"] == "serving"


def test_gateway_parks_to_make_room_and_wakes_on_the_next_request(parking_pool, model_a,
                                                                 model_b, reference):
    """Two models, one slot, parking on: ga, gb, ga. The second ga is a wake of the
    instance parked to make room for gb (same instance id), with plain vLLM's tokens."""
    d = parking_pool
    url = f"http://127.0.0.1:{d.gateway}"
    helpers.wait_http(url + "/health", 120, d.proc)

    def ask(model: str) -> list:
        with helpers.httpx.Client(timeout=600) as c:
            out = []
            for p in helpers.PROMPTS:
                r = c.post(url + "/v1/completions", json={
                    "model": model, "prompt": p, "max_tokens": helpers.MAX_TOKENS,
                    "temperature": 0, "return_token_ids": True})
                assert r.status_code == 200, r.text
                ch = r.json()["choices"][0]
                out.append((ch["text"], ch.get("token_ids")))
            return out

    assert ask("ga") == reference(model_a)
    first = {i["name"]: i for i in d.instances()}["ga"]
    assert ask("gb") == reference(model_b)
    states = {i["name"]: i["state"] for i in d.instances()}
    assert states == {"ga": "parked", "gb": "serving"}
    assert ask("ga") == reference(model_a)
    insts = {i["name"]: i for i in d.instances()}
    assert insts["ga"]["id"] == first["id"] and insts["ga"]["woken"]
    assert insts["ga"]["state"] == "serving" and insts["gb"]["state"] == "parked"
    metrics = helpers.httpx.get(url + "/metrics").text
    assert 'vllm_pool_gateway_attaches_total{model="ga",outcome="woken"} 1.0' in metrics
    for name in ("ga", "gb"):
        assert d.client.delete(f"/instances/{name}", params={"park": "false"}).status_code == 200
