"""An attach as it happens, end to end on the shared CPU pool: the streamed control API
(`POST /instances?stream=true`), the CLI's progress (plain lines off a terminal, one live
line on one, nothing extra with --json), refusals, and the phase a gateway's `/v1/models`
shows for a model that is attaching."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests import helpers
from vllm_pool.api_models import InstanceInfo, PhaseEvent, attach_event
from vllm_pool.states import ATTACH_PHASES

# The phases a stream reports, in vLLM's start-up order (compile is a part of the others,
# known only at the end; graph_capture runs inside model_warmup).
STREAMED = [p for p in ATTACH_PHASES if p != "compile"]
WORKER_PHASES = {"worker_init", "weight_load", "memory_profiling", "kv_cache", "model_warmup"}


def _cli(pool: helpers.Daemon, *args: str, **kw) -> subprocess.CompletedProcess:
    if "stderr" not in kw:
        kw["capture_output"] = True
    return subprocess.run([sys.executable, "-m", "vllm_pool", "attach", "--pool", pool.url,
                           *args], text=True, timeout=600, **kw)


def _pool_state(pool: helpers.Daemon) -> tuple:
    return ([(w["slot"], w["pid"], w["state"]) for w in pool.workers()], pool.instances())


def test_streamed_attach_phases_in_order_then_the_instance(idle_pool, model_a):
    pool = idle_pool
    body = {"model": model_a, "name": "st1", "args": helpers.ENGINE_ARGS}
    with httpx.Client(timeout=600) as c, \
            c.stream("POST", pool.url + "/instances?stream=true", json=body) as r:
        assert r.status_code == 201
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [attach_event.validate_json(line) for line in r.iter_lines() if line]
    kinds = [e.event for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done", kinds
    assert set(kinds[1:-1]) == {"phase"}, kinds
    started, done = events[0].instance, events[-1].instance
    assert started.state == "attaching" and started.id == done.id and started.name == "st1"
    phases = [e for e in events[1:-1] if isinstance(e, PhaseEvent)]
    names = [e.phase for e in phases]
    assert names[:2] == ["reserve", "engine_start"] and names[-1] == "ready", names
    assert WORKER_PHASES <= set(names), names
    assert names == sorted(names, key=STREAMED.index), names  # in order, known names only
    # `next` is the phase that runs after each (the capture runs inside model_warmup).
    steps = [e for e in phases if e.phase != "graph_capture"]
    assert [e.next for e in steps] == [e.phase for e in steps[1:]] + [None]
    # The figures streamed are the instance's, and the stream's instance is the pool's.
    assert done.state == "serving" and done.phase is None
    assert {e.phase: e.seconds for e in phases} == \
        {k: round(v, 4) for k, v in done.phases.items() if k in set(names)}
    got = InstanceInfo.model_validate(pool.client.get("/instances/st1").json())
    assert got.model_dump(exclude={"uptime_s"}) == done.model_dump(exclude={"uptime_s"})
    assert helpers.greedy(done.url, model_a, helpers.PROMPTS[:1])[0][0]


def test_cli_progress_lines_and_json(idle_pool, model_a):
    pool = idle_pool
    r = _cli(pool, "--model", model_a, "--name", "cl1", *helpers.ENGINE_ARGS)
    assert r.returncode == 0, r.stderr
    (inst,) = [i for i in pool.instances() if i["name"] == "cl1"]
    # stdout: the result as before; stderr (not a terminal): a line per finished phase.
    assert f"endpoint: {inst['url']}/v1" in r.stdout.splitlines()
    assert "\r" not in r.stderr
    err = r.stderr.splitlines()
    assert err[0].startswith(f"attaching {model_a} as cl1 (id {inst['id']})"), r.stderr
    shown = [ln.split()[0] for ln in err[1:]]
    assert shown[0] == "reserve" and shown[-1] == "ready" and WORKER_PHASES <= set(shown)
    assert shown == sorted(shown, key=STREAMED.index), r.stderr
    assert pool.detach("cl1").status_code == 200  # room for the next on a one-GPU pool
    # --json: nothing but the instance's JSON on stdout, no progress on stderr.
    j = _cli(pool, "--model", model_a, "--name", "cl2", "--json", *helpers.ENGINE_ARGS)
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["name"] == "cl2"
    assert not any(p in j.stderr for p in ("attaching", "reserve", "ready")), j.stderr


def test_cli_on_a_terminal_rewrites_one_line(idle_pool, model_a):
    pool = idle_pool
    master, slave = pty.openpty()
    out = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other side closed
                return
            if not chunk:
                return
            out.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        r = _cli(pool, "--model", model_a, "--name", "tty1", *helpers.ENGINE_ARGS,
                 stderr=slave, stdout=subprocess.PIPE)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    assert r.returncode == 0
    text = out.decode(errors="replace")
    assert "attaching tty1: " in text and "\r" in text
    # One line rewritten in place, cleared at the end: no line feed at all.
    assert "\n" not in text and text.endswith("\r\x1b[K"), repr(text[-200:])
    assert "endpoint: " in r.stdout


def test_refused_and_failed_attaches_exit_nonzero_and_change_nothing(idle_pool, model_a):
    pool = idle_pool
    before = _pool_state(pool)
    # Refused before it starts: a plain HTTP error, not a stream, the same as the plain POST.
    for body, status in (({"model": model_a, "args": ["--distributed-executor-backend", "mp"]},
                          422), ({"model": model_a, "tp": 0}, 422),
                         ({"model": model_a, "tp": 3, "args": helpers.ENGINE_ARGS}, 409)):
        s = pool.client.post("/instances?stream=true", json=body)
        p = pool.client.post("/instances", json=body)
        assert s.status_code == p.status_code == status, (s.text, p.text)
        assert s.headers["content-type"] == "application/json" and s.json() == p.json()
    r = _cli(pool, "--model", model_a, "--", "--distributed-executor-backend", "mp")
    assert r.returncode == 1 and r.stdout == ""
    assert "attach failed: HTTP 422: argument --distributed-executor-backend" in r.stderr
    # Failed once started (the engine cannot load it): the error event carries the plain
    # POST's status and reason.
    plain = pool.attach("/nonexistent/model")
    assert plain.status_code == 400
    r = _cli(pool, "--model", "/nonexistent/model", *helpers.ENGINE_ARGS)
    assert r.returncode == 1 and r.stdout == ""
    assert f"attach failed: HTTP 400: {plain.json()['detail'][:40]}" in r.stderr, r.stderr
    assert "nonexistent" in r.stderr
    pool.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 180)
    assert _pool_state(pool) == before


def _models_file(tmp_path, model: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - name: gp\n    model: {model}\n"
                    f"    args: [{', '.join(helpers.ENGINE_ARGS)}]\n")
    return str(path)


def _phases_shown_while_attaching(url: str) -> list[str]:
    """Attach model `gp` on demand through the gateway at `url` (one completion) and
    poll its /v1/models card meanwhile: the phases shown, in the order shown."""
    result: dict = {}

    def complete() -> None:
        result["r"] = httpx.post(url + "/v1/completions", timeout=600, json={
            "model": "gp", "prompt": "def main(", "max_tokens": 4, "temperature": 0})

    t = threading.Thread(target=complete)
    t.start()
    seen: list[str] = []
    with httpx.Client(base_url=url, timeout=30) as c:
        while t.is_alive():
            card = c.get("/v1/models/gp").json()
            if card["state"] == "attaching" and card["phase"] and \
                    (not seen or seen[-1] != card["phase"]):
                seen.append(card["phase"])
            time.sleep(0.05)
        t.join()
        assert result["r"].status_code == 200, result["r"].text
        card = c.get("/v1/models").json()["data"][0]
    assert card["id"] == "gp" and card["state"] == "serving" and card["phase"] is None
    assert seen, "no phase was shown while the model attached"
    assert set(seen) <= set(STREAMED) and seen == sorted(seen, key=STREAMED.index), seen
    return seen


def test_standalone_gateway_models_show_the_attaching_phase(idle_pool, model_a, logs,
                                                            tmp_path):
    """A gateway in a process of its own (the pool over the control API: it attaches
    through the stream) shows the phase of the model it attaches, then none."""
    port = helpers.free_port()
    with open(os.path.join(logs, "progress-gw.log"), "ab") as f:
        gw = subprocess.Popen([sys.executable, "-m", "vllm_pool", "gateway", "--pool",
                               idle_pool.url, "--models", _models_file(tmp_path, model_a),
                               "--gateway-port", str(port)],
                              stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        helpers.wait_http(f"http://127.0.0.1:{port}/health", 60, gw)
        _phases_shown_while_attaching(f"http://127.0.0.1:{port}")
    finally:
        os.killpg(gw.pid, signal.SIGTERM)
        gw.wait(60)


def test_embedded_gateway_models_show_the_attaching_phase(model_a, logs, tmp_path):
    """The gateway of `serve --models` (the daemon's own Instance) shows it too."""
    port = helpers.free_port()
    d = helpers.Daemon(1, os.path.join(logs, "progress-embedded"),
                       ["--models", _models_file(tmp_path, model_a),
                        "--gateway-port", str(port)])
    try:
        d.wait_ready()
        helpers.wait_http(f"http://127.0.0.1:{port}/health", 60, d.proc)
        _phases_shown_while_attaching(f"http://127.0.0.1:{port}")
    finally:
        assert d.stop() == 0


def test_streamed_reattach_of_a_parked_model_wakes_it(model_a, logs):
    """An attach with a parked instance's settings wakes it: the stream says so (200, the
    parked instance first, the wake's steps, the instance woken), and so does the CLI."""
    d = helpers.Daemon(1, os.path.join(logs, "progress-parking"), ["--enable-parking"])
    try:
        d.wait_ready()
        assert d.attach(model_a, name="pk").status_code == 201
        assert d.client.delete("/instances/pk", params={"park": "true"}).status_code == 200
        body = {"model": model_a, "name": "pk", "args": helpers.ENGINE_ARGS}
        with httpx.Client(timeout=600) as c, \
                c.stream("POST", d.url + "/instances?stream=true", json=body) as r:
            assert r.status_code == 200
            events = [attach_event.validate_json(line) for line in r.iter_lines() if line]
        assert [e.event for e in events] == ["started", "phase", "phase", "done"], events
        assert events[0].instance.state in ("parked", "waking")
        assert [e.phase for e in events[1:3]] == ["evict", "wake"]
        done = events[-1].instance
        assert done.woken and done.state == "serving" and done.id == events[0].instance.id
        assert done.phases["wake"] == events[2].seconds
        assert d.client.delete("/instances/pk", params={"park": "true"}).status_code == 200
        cli = _cli(d, "--model", model_a, "--name", "pk", *helpers.ENGINE_ARGS)
        assert cli.returncode == 0, cli.stderr
        assert cli.stderr.splitlines()[0].startswith(f"waking {model_a} as pk"), cli.stderr
        assert cli.stderr.splitlines()[-1].split()[0] == "wake", cli.stderr
        assert cli.stdout.startswith(f"woke parked {model_a} as pk"), cli.stdout
    finally:
        assert d.stop() == 0


def test_phase_bookkeeping_units():
    """No processes: the instance's phase in progress follows the finished ones (the
    capture, inside model_warmup, moves nothing; a repeated engine_start is dropped), and
    a remote gateway's snapshot never moves an attaching instance's phase back."""
    from vllm_pool.daemon.instance import Instance
    from vllm_pool.gateway.pool_view import _not_back

    i = Instance(id="i", name="n", model="m", tp=1, pp=1, port=1, host="h", args=[], env={},
                 slots=[0], token="t", run_dir="/nonexistent", log_path="/nonexistent")
    for name in ("reserve", "engine_start", "worker_init", "weight_load", "memory_profiling",
                 "kv_cache", "graph_capture"):
        i.phase_done(name, 0.5)
    i.phase_done("engine_start", 9.0, once=True)
    assert i.phase == "model_warmup" and i.done_seconds("engine_start") == 0.5
    assert [(n, nxt) for n, _, nxt in i.progress][-2:] == [("kv_cache", "model_warmup"),
                                                         ("graph_capture", "model_warmup")]
    i.phase_done("model_warmup", 0.5)
    i.phase_done("ready", 0.5)
    assert i.phase is None and len(i.progress) == 9

    base = dict(id="i", name="n", model="m", tp=1, pp=1, port=1, url="u", workers=[0],
                devices=["cpu:0"], args=[], engine_pid=None, engine_host="", created_at=0.0,
                uptime_s=None, phases={}, error=None)
    old = InstanceInfo(state="attaching", phase="kv_cache", **base)
    stale = InstanceInfo(state="attaching", phase="weight_load", **base)
    assert _not_back(old, stale).phase == "kv_cache"
    assert _not_back(stale, old).phase == "kv_cache"
    served = InstanceInfo(state="serving", phase=None, **base)
    assert _not_back(old, served).phase is None
