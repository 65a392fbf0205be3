"""The gateway end to end: a real 2-slot CPU pool started with a models file, real vLLM
engines attached on demand, real HTTP (and the `openai` client) through the gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import helpers

# 16 concurrent streams of a few tokens: the load run's shape (fits CI on two cores).
LOAD_REQUESTS, LOAD_CONCURRENCY, LOAD_MAX_TOKENS = 200, 16, 4
TTL_S = 3


def _models_yaml(model_a: str, model_b: str) -> str:
    args = "[" + ", ".join(helpers.ENGINE_ARGS) + "]"
    return f"""
models:
  - name: a             # both a and b pinned to cpu:0: two models, one slot
    aliases: [alpha]
    model: {model_a}
    args: {args}
    devices: [cpu:0]
  - name: b
    model: {model_b}
    args: {args}
    devices: [cpu:0]
  - name: c
    model: {model_b}
    args: {args}
  - name: t
    model: {model_a}
    args: {args}
    ttl: {TTL_S}
  - name: broken
    model: /nonexistent/model
    args: {args}
"""


class Gateway:
    def __init__(self, daemon: helpers.Daemon, port: int):
        self.daemon = daemon
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def complete(self, model: str, prompt: str = helpers.PROMPTS[0], **kw) -> httpx.Response:
        body = {"model": model, "prompt": prompt, "max_tokens": helpers.MAX_TOKENS,
                "temperature": 0, "return_token_ids": True, **kw}
        return self.client.post("/v1/completions", json=body)

    def metric(self, name: str, **labels) -> float:
        """A sample of the gateway's /metrics (0 when absent)."""
        text = self.client.get("/metrics").text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def states(self) -> dict[str, str]:
        return {m["id"]: m["state"] for m in self.client.get("/v1/models").json()["data"]}

    def instances(self) -> dict[str, dict]:
        return {i["name"]: i for i in self.daemon.instances()}


@pytest.fixture(scope="module")
def gateway(logs, model_a, model_b, tmp_path_factory):
    path = tmp_path_factory.mktemp("gw") / "models.yaml"
    path.write_text(_models_yaml(model_a, model_b))
    port = helpers.free_port()
    d = helpers.Daemon(2, os.path.join(logs, "gateway-pool"),
                       ["--models", str(path), "--gateway-port", str(port)])
    gw = Gateway(d, port)
    try:
        d.wait_ready()
        helpers.wait_http(gw.url + "/health", 120, d.proc)
        yield gw
    finally:
        gw.client.close()
        rc = d.stop()
        assert rc == 0, f"gateway daemon exited with {rc}"
        assert helpers.pool_leftovers(d.port) == {"processes": [], "shm": [], "run_dirs": []}


def _serve(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_pool", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


def _standalone(pool: helpers.Daemon, models: str, port: int, log: str) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "vllm_pool", "gateway", "--pool",
                                 pool.url, "--models", models, "--gateway-port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def test_standalone_gateway_restart_keeps_instances(idle_pool, model_a, reference, logs,
                                                    tmp_path):
    """`vllm-pool gateway` in a process of its own, in front of a running pool: killed, it
    leaves its instance serving and no process behind; started again, it finds that
    instance and routes to it: no second attach, same instance, same greedy tokens."""
    pool = idle_pool
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: sa\n    model: {model_a}\n"
                      f"    args: [{', '.join(helpers.ENGINE_ARGS)}]\n")
    port = helpers.free_port()
    url = f"http://127.0.0.1:{port}"
    first = _standalone(pool, str(models), port, os.path.join(logs, "standalone-gw-1.log"))
    try:
        helpers.wait_http(url + "/health", 60, first)
        assert helpers.greedy(url, "sa") == reference(model_a, 1)
        (inst,) = [i for i in pool.instances() if i["name"] == "sa"]
        assert helpers.process_tree(first.pid) == {}  # it owns no process
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert httpx.get(inst["url"] + "/health", timeout=5).status_code == 200
    second = _standalone(pool, str(models), port, os.path.join(logs, "standalone-gw-2.log"))
    try:
        helpers.wait_http(url + "/health", 60, second)
        gw = Gateway(pool, port)
        try:
            card = gw.client.get("/v1/models/sa").json()
            assert (card["state"], card["instance"]) == ("serving", inst["id"]), card
            assert helpers.greedy(url, "sa") == reference(model_a, 1)
            assert gw.metric("vllm_pool_gateway_attaches_total", model="sa", outcome="ok") == 0
        finally:
            gw.client.close()
        now = [i for i in pool.instances() if i["name"] == "sa"]
        assert [(i["id"], i["engine_pid"]) for i in now] == [(inst["id"], inst["engine_pid"])]
    finally:
        assert helpers.stop(second, 30) == 0
    assert [i["state"] for i in pool.instances() if i["name"] == "sa"] == ["serving"]
    # A gateway whose pool does not answer refuses to start, with the reason.
    r = subprocess.run([sys.executable, "-m", "vllm_pool", "gateway", "--pool",
                        f"http://127.0.0.1:{helpers.free_port()}", "--models", str(models),
                        "--gateway-port", str(helpers.free_port()), "--pool-wait", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot be used" in r.stderr, r.stderr[-500:]


def test_bad_models_file_refuses_start(tmp_path, model_a):
    """Invalid entries: `serve` exits non-zero naming the entry and the field, before it
    starts any worker."""
    cases = {
        "tll": (f"models:\n  - name: a\n    model: {model_a}\n  - name: b\n    model: {model_a}"
                "\n    tll: 5\n", "entry 2 ('b'), field 'tll'"),
        "tp": (f"models:\n  - name: a\n    model: {model_a}\n    tp: 0\n",
               "entry 1 ('a'), field 'tp'"),
        "devices": (f"models:\n  - name: a\n    model: {model_a}\n    devices: [cpu:7]\n",
                    "entry 1 ('a'), field 'devices'"),
        "owned arg": (f"models:\n  - name: a\n    model: {model_a}\n    args: [--port, 1]\n",
                      "entry 1 ('a'), field 'args'"),
        "alias twice": (f"models:\n  - name: a\n    model: {model_a}\n  - name: b\n    model: "
                        f"{model_a}\n    aliases: [a]\n", "entry 2 ('b'), field 'aliases'"),
    }
    for case, (text, expected) in cases.items():
        f = tmp_path / "models.yaml"
        f.write_text(text)
        r = _serve(["--cpu-slots", "1", "--port", str(helpers.free_port()), "--models", str(f),
                    "--gateway-port", str(helpers.free_port())])
        assert r.returncode != 0, case
        assert expected in r.stderr and "models file refused" in r.stderr, (case, r.stderr)
    # A gateway on a non-loopback address needs a key, like the control API.
    f.write_text(f"models:\n  - name: a\n    model: {model_a}\n")
    r = _serve(["--cpu-slots", "1", "--port", str(helpers.free_port()), "--models", str(f),
                "--gateway-host", "0.0.0.0"])
    assert r.returncode != 0 and "API key is required" in r.stderr, r.stderr


def test_models_list_and_unknown_model(gateway):
    data = gateway.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["a", "b", "c", "t", "broken"]
    assert all(m["state"] == "cold" and m["object"] == "model" for m in data)
    assert data[0]["aliases"] == ["alpha"]
    r = gateway.complete("no-such-model")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "NotFoundError" and err["code"] == 404
    assert "no-such-model" in err["message"]
    assert gateway.client.get("/v1/models/no-such-model").status_code == 404
    r = gateway.client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert gateway.instances() == {}  # nothing attached for any of this


def test_two_models_one_slot(gateway, model_a, model_b, reference):
    """A, B, A on one slot (both pinned to cpu:0): each answered with plain vLLM's greedy
    tokens; B evicts A and A evicts B."""
    ref_a, ref_b = reference(model_a, 1), reference(model_b, 1)
    assert helpers.greedy(gateway.url, "a") == ref_a
    assert helpers.greedy(gateway.url, "b") == ref_b
    assert helpers.greedy(gateway.url, "alpha") == ref_a  # an alias reaches a
    insts = gateway.instances()
    assert set(insts) == {"a"} and insts["a"]["devices"] == ["cpu:0"]
    assert gateway.metric("vllm_pool_gateway_attaches_total", model="a", outcome="ok") == 2
    assert gateway.metric("vllm_pool_gateway_attaches_total", model="b", outcome="ok") == 1
    assert gateway.metric("vllm_pool_gateway_evictions_total", model="a", reason="lru") == 1
    assert gateway.metric("vllm_pool_gateway_evictions_total", model="b", reason="lru") == 1
    assert gateway.metric("vllm_pool_gateway_requests_total", model="a", status="200") == 8
    assert gateway.metric("vllm_pool_gateway_attach_phase_seconds_count", phase="total") == 3
    assert gateway.states()["a"] == "serving" and gateway.states()["b"] == "cold"


def test_streaming_with_openai_client(gateway):
    import openai

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="a", max_tokens=helpers.MAX_TOKENS, temperature=0)
    plain = client.completions.create(prompt=helpers.PROMPTS[1], **kw).choices[0].text
    chunks = [c.choices[0].text for c in
              client.completions.create(prompt=helpers.PROMPTS[1], stream=True, **kw)]
    assert len(chunks) > 1 and "".join(chunks) == plain
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(messages=msgs, stream=True, **kw) if c.choices]
    assert chat and "".join(pieces) == chat
    # The openai client hangs up right after [DONE], before the body's end: still a 200.
    assert gateway.metric("vllm_pool_gateway_requests_total", model="a", status="499") == 0


def test_client_disconnect_aborts_in_engine(gateway):
    """A client that goes away mid-stream: the engine aborts the request (it stops well
    short of its 480 tokens), and the gateway counts it as 499."""
    inst = gateway.instances()["a"]

    def engine_metric(name: str, **labels) -> float:
        text = httpx.get(inst["url"] + "/metrics", timeout=10).text
        return sum(s.value for fam in text_string_to_metric_families(text)
                   for s in fam.samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    generated = engine_metric("vllm:generation_tokens_total")
    with gateway.client.stream("POST", "/v1/completions", json={
            "model": "a", "prompt": "x", "max_tokens": 480, "ignore_eos": True,
            "stream": True}) as s:
        lines = s.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 30
    while engine_metric("vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_metric("vllm:num_requests_running") == 0
    # Not aborted, it would have run to all 480 tokens (ignore_eos).
    assert engine_metric("vllm:generation_tokens_total") - generated < 240
    assert gateway.metric("vllm_pool_gateway_requests_total", model="a", status="499") == 1
    assert gateway.metric("vllm_pool_gateway_in_flight", model="a") == 0


def test_eight_concurrent_requests_for_cold_model_one_attach(gateway, model_b, reference):
    assert gateway.states()["c"] == "cold"
    ref = reference(model_b, 1)
    with ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(lambda i: gateway.complete("c", helpers.PROMPTS[i % 4]), range(8)))
    assert [r.status_code for r in rs] == [200] * 8, [r.text for r in rs]
    for i, r in enumerate(rs):
        ch = r.json()["choices"][0]
        assert (ch["text"], ch["token_ids"]) == ref[i % 4]
    assert gateway.metric("vllm_pool_gateway_attaches_total", model="c", outcome="ok") == 1
    assert [n for n in gateway.instances() if n == "c"] == ["c"]
    # c went to the slot no entry is pinned to; a kept cpu:0.
    assert gateway.instances()["c"]["devices"] == ["cpu:1"]
    assert gateway.metric("vllm_pool_gateway_queue_depth", model="c") == 0


def test_idle_ttl_detaches_and_next_request_reattaches(gateway, model_a, reference):
    ref = reference(model_a, 1)
    r = gateway.complete("t")
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert (ch["text"], ch["token_ids"]) == ref[0]
    assert "t" in gateway.instances()
    deadline = time.monotonic() + TTL_S + 30
    while gateway.states()["t"] != "cold":
        assert time.monotonic() < deadline, gateway.states()
        time.sleep(0.25)
    assert "t" not in gateway.instances()
    assert gateway.metric("vllm_pool_gateway_evictions_total", model="t", reason="ttl") == 1
    r = gateway.complete("t")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == ref[0][1]
    assert gateway.metric("vllm_pool_gateway_attaches_total", model="t", outcome="ok") == 2


def test_failed_attach_answers_503_with_reason(gateway):
    r = gateway.complete("broken")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "ServiceUnavailableError" and err["code"] == 503
    assert "attach of model `broken` failed" in err["message"]
    assert "nonexistent" in err["message"]  # the engine's own reason comes through
    assert gateway.metric("vllm_pool_gateway_attaches_total", model="broken",
                          outcome="failed") == 1
    assert "broken" not in gateway.instances() and gateway.states()["broken"] == "cold"


def test_pool_is_source_of_truth(gateway, model_a, reference):
    """An instance detached behind the gateway's back is noticed; one attached through the
    control API under an entry's name is that entry's: used, not attached twice."""
    d = gateway.daemon
    for name in list(gateway.instances()):
        assert d.detach(name).status_code in (200, 404, 409)  # 404/409: TTL got there first
    deadline = time.monotonic() + 60
    while gateway.instances():
        assert time.monotonic() < deadline, gateway.instances()
        time.sleep(0.25)
    r = d.attach(model_a, name="a", devices=["cpu:0"],
                 args=[*helpers.ENGINE_ARGS, "--served-model-name", "a", "alpha"])
    assert r.status_code == 201, r.text
    before = gateway.metric("vllm_pool_gateway_attaches_total", model="a", outcome="ok")
    assert helpers.greedy(gateway.url, "alpha") == reference(model_a, 1)
    assert gateway.metric("vllm_pool_gateway_attaches_total", model="a", outcome="ok") == before
    assert [n for n in gateway.instances()] == ["a"]
    assert gateway.states()["a"] == "serving"


def test_load_two_models_two_slots_none_lost(gateway):
    names = ["a", "c"]
    before = {n: gateway.metric("vllm_pool_gateway_requests_total", model=n, status="200")
              for n in names}
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> str:
        name = names[i % 2] if i % 7 else names[(i // 7) % 2]  # mixed, not strictly alternating
        try:
            r = gateway.complete(name, helpers.PROMPTS[i % 4], max_tokens=LOAD_MAX_TOKENS,
                                 stream=bool(i % 3 == 0))
            if r.status_code != 200:
                raise AssertionError(f"{r.status_code}: {r.text[:300]}")
            if i % 3 == 0:
                assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
            else:
                body = r.json()
                assert body["model"] == name and body["usage"]["completion_tokens"] == \
                    LOAD_MAX_TOKENS, body
        except Exception as e:  # collect, so one failure shows them all
            with lock:
                errors.append(f"request {i} ({name}): {e!r}")
        return name

    t0 = time.perf_counter()
    with ThreadPoolExecutor(LOAD_CONCURRENCY) as ex:
        sent = list(ex.map(one, range(LOAD_REQUESTS)))
    took = time.perf_counter() - t0
    assert not errors, errors[:5]
    for n in names:
        got = gateway.metric("vllm_pool_gateway_requests_total", model=n, status="200")
        assert got - before[n] == sent.count(n), (n, got, before[n])
    assert sorted(gateway.instances()) == ["a", "c"]
    for n in names:
        assert gateway.metric("vllm_pool_gateway_in_flight", model=n) == 0
        assert gateway.metric("vllm_pool_gateway_queue_depth", model=n) == 0
    print(f"load: {LOAD_REQUESTS} requests in {took:.1f}s")
