"""Fault matrix, CPU cells (issue 7, item 1; docs/reliability.md has the whole matrix).

Each cell kills one process of an attach (pool worker, engine API server, EngineCore) with
one signal in one phase, on the shared 2-slot pool, then checks the stated outcome and
that nothing is left: the killed process and the engine's whole process group gone, no
EngineCore under the daemon, no new unmapped /dev/shm segment, no instance directory
(ipc sockets) in the pool's run dir, every worker idle (the killed one respawned with a
new PID, the others the same PIDs), and the pool attaches and serves again on that slot.

Already covered elsewhere, not repeated here: worker kill -9 while serving (idle), TP=2
rank kill -9 (test_attach.py), engine process-group kill -9 while serving (idle)
(test_attach.py::test_engine_death_returns_workers), daemon SIGTERM with an instance
(test_daemon_lifecycle.py). The daemon kill -9 cell is at the end (its own daemon).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import tempfile
import threading
import time

import httpx
import pytest

from tests import helpers

SLOT = 0 if helpers.GPUS else 1
DEVICE = "cuda:0" if helpers.GPUS else f"cpu:{SLOT}"
K9, TERM = signal.SIGKILL, signal.SIGTERM

# (process kind, signal, phase) -> the expected outcome is asserted in check_outcome.
CELLS = [
    ("worker", K9, "attaching-before-ready"),
    ("api_server", K9, "attaching-after-ready"),
    ("worker", K9, "serving-mid-stream"),
    ("engine_core", K9, "serving-mid-stream"),
    ("api_server", TERM, "serving-mid-stream"),
    ("worker", TERM, "detaching"),
]


def _ids(c):
    return f"{c[0]}-{signal.Signals(c[1]).name}-{c[2]}"


def _engine_core(engine_pid: int) -> int | None:
    return next((pid for pid, a in helpers.process_tree(engine_pid).items()
                 if "EngineCore" in a), None)


def _target(pool, kind: str, inst: dict | None) -> int | None:
    if kind == "worker":
        return pool.workers()[SLOT]["pid"]
    if inst is None or inst.get("engine_pid") is None:
        return None
    if kind == "api_server":
        return inst["engine_pid"]
    return _engine_core(inst["engine_pid"])


def _poll(pred, timeout: float, what: str, every: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(what)


def _run_dir(pool) -> str:
    dirs = glob.glob(os.path.join(tempfile.gettempdir(), f"vllm-pool-{pool.port}-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _group_members(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True,
                         text=True).stdout
    return [ln for ln in out.splitlines() if ln.split(None, 2)[1:2] == [str(pgid)]]


@pytest.mark.parametrize("kind,sig,phase", CELLS, ids=[_ids(c) for c in CELLS])
def test_fault_cell(idle_pool, model_a, reference, kind, sig, phase):
    pool = idle_pool
    pids_before = [w["pid"] for w in pool.workers()]
    shm_before = set(os.listdir("/dev/shm"))
    gpu_before = helpers.gpu_memory_used_mib() if helpers.GPUS else 0
    name = f"fault-{kind}-{phase}".replace("_", "-")
    attach_result: dict = {}

    def do_attach():
        attach_result["r"] = pool.attach(model_a, name=name, devices=[DEVICE])

    t = threading.Thread(target=do_attach)
    t.start()
    inst = victim = engine_pid = core_pid = None
    stream_end = None
    detach_result: dict = {}
    if phase.startswith("attaching"):
        want = "attaching" if phase == "attaching-before-ready" else "serving"

        def reached():
            w = pool.workers()[SLOT]
            if w["state"] == want:
                got = pool.client.get(f"/instances/{name}")
                if got.status_code == 200 and got.json()["state"] == "attaching":
                    return got.json()
            return None

        inst = _poll(reached, 300, f"worker {SLOT} never {want} during the attach")
        victim = _target(pool, kind, inst)
        engine_pid = inst["engine_pid"]
        core_pid = _engine_core(engine_pid) if engine_pid else None
        assert victim, (kind, inst)
        os.kill(victim, sig)
        t.join(300)
        r = attach_result["r"]
        # The attach fails with the reason; the instance is gone (the pool as it was).
        assert r.status_code >= 400 and r.json()["detail"], r.text
        assert pool.client.get(f"/instances/{name}").status_code == 404
    else:
        t.join(300)
        r = attach_result["r"]
        assert r.status_code == 201, r.text
        inst = r.json()
        engine_pid = inst["engine_pid"]
        core_pid = _engine_core(engine_pid)
        assert core_pid, helpers.process_tree(engine_pid)
        if phase == "serving-mid-stream":
            victim = _target(pool, kind, inst)
            stream_end = _kill_mid_stream(inst, model_a, victim, sig,
                                          stall_ok=(kind, sig) == ("api_server", TERM))
            # The instance is listed as failed with the reason until it is detached.
            failed = _poll(lambda: (pool.client.get(f"/instances/{name}").json()["state"]
                                    == "failed"), 120, "instance never marked failed")
            assert failed
            assert pool.client.get(f"/instances/{name}").json()["error"]
            assert pool.detach(name).status_code == 200
        else:  # detaching: kill the worker while it tears down
            def do_detach():
                detach_result["r"] = pool.detach(name)

            td = threading.Thread(target=do_detach)
            td.start()
            _poll(lambda: pool.workers()[SLOT]["state"] == "detaching", 120,
                  "worker never reported detaching")
            victim = _target(pool, kind, inst)
            os.kill(victim, sig)
            td.join(300)
            # The detach completes (the pool does not depend on the worker's answer).
            assert detach_result["r"].status_code == 200, detach_result["r"].text

    # Back to idle: the killed worker respawned, the others (and the slot, if it was not
    # the victim) reclaimed with the same PID.
    ws = pool.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 300)
    pids_after = [w["pid"] for w in ws]
    if kind == "worker":
        assert pids_after[SLOT] != pids_before[SLOT]
        assert [p for i, p in enumerate(pids_after) if i != SLOT] == \
            [p for i, p in enumerate(pids_before) if i != SLOT]
    elif kind != "worker" and phase != "attaching-before-ready":
        assert pids_after == pids_before, "the worker should be reclaimed, not respawned"
    assert pool.instances() == []
    _assert_nothing_left(pool, victim, engine_pid, core_pid, shm_before)
    if helpers.GPUS:
        # Only the pool's workers hold the GPU, and its memory is back at the idle pool's
        # (a respawned worker's fresh context is smaller; a reused one is back within the
        # allocator slack).
        assert helpers.gpu_pids() <= {w["pid"] for w in ws}, (helpers.gpu_pids(), ws)
        after = helpers.gpu_memory_used_mib()
        print(f"GPU memory: {gpu_before} MiB before the cell, {after} MiB after")
        assert after <= gpu_before + 256, (gpu_before, after)
    if stream_end is not None:
        assert stream_end != "completed", "the stream finished despite the kill"
    # The pool attaches again on that slot and answers as plain vLLM does.
    again = pool.attach(model_a, name=f"{name}-again", devices=[DEVICE])
    assert again.status_code == 201, again.text
    assert helpers.greedy(again.json()["url"], model_a) == reference(model_a, 1)


def _kill_mid_stream(inst: dict, model: str, victim: int, sig: int,
                     stall_ok: bool = False) -> str:
    """Start a long streamed completion, kill `victim` after the first chunk, read to the
    end. The stream must end (an error or a cut), never hang: returns how it ended.

    `stall_ok`: SIGTERM to vLLM's API server stops its engine at once but uvicorn then
    waits for open connections to close, so the stream goes silent instead of failing
    (plain vLLM does the same). The client gives up after 20 s without data; the server
    exits when the connection closes, which the test then checks."""
    pieces = 0
    ended = "completed"
    try:
        with httpx.stream("POST", inst["url"] + "/v1/completions",
                          timeout=20 if stall_ok else 120, json={
                "model": model, "prompt": "def main(", "max_tokens": 480, "temperature": 0,
                "ignore_eos": True, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    body = json.loads(line[6:])
                    if "error" in body:
                        ended = "error event"
                        break
                    pieces += 1
                    if pieces == 1:
                        os.kill(victim, sig)
            else:
                if pieces < 480:
                    ended = f"cut after {pieces} chunks"
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        ended = f"connection error: {type(e).__name__}"
    except httpx.ReadTimeout:
        if not stall_ok:
            raise
        ended = "stalled; closed by the client"
    assert pieces >= 1
    return ended


def _assert_nothing_left(pool, victim, engine_pid, core_pid, shm_before) -> None:
    def gone():
        alive = [p for p in (victim, engine_pid, core_pid)
                 if p and os.path.exists(f"/proc/{p}")
                 and not open(f"/proc/{p}/stat").read().split(")")[-1].split()[0] == "Z"]
        members = _group_members(engine_pid) if engine_pid else []
        return not alive and not members
    _poll(gone, 60, "a process of the cell outlived it", every=0.2)
    assert helpers.running_engines(pool.proc.pid) == []
    assert helpers.leaked_shm(shm_before) == set()
    left = [n for n in os.listdir(_run_dir(pool)) if n.startswith("inst-")]
    assert left == [], f"instance run dirs (ipc sockets) left: {left}"


def test_daemon_kill9_while_serving_leaves_no_process(logs, model_a):
    """kill -9 of the daemon with an instance serving: every worker exits on EOF of its
    command pipe, the engine's guard ends its whole process group, the spare host exits
    on EOF of its command pipe, and the reaper (daemon/reaper.py) removes the shared
    memory and the run directory. Nothing the daemon started may outlive it, and with no
    state file there is no next daemon to do it instead."""
    shm_before = set(os.listdir("/dev/shm"))
    d = helpers.Daemon(1, os.path.join(logs, "kill9-pool"), ["--state-file", "none"])
    try:
        d.wait_ready()
        r = d.attach(model_a, name="x")
        assert r.status_code == 201, r.text
        inst = r.json()
        tree = helpers.process_tree(d.proc.pid)
        assert any("EngineCore" in a for a in tree.values()), tree
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        _assert_daemon_left_nothing(d, tree, inst, shm_before)
    finally:
        d.stop()


def test_daemon_kill9_during_its_stop_leaves_nothing(logs, model_a):
    """SIGTERM to the daemon after an attach, a request, a park and a wake, then kill -9
    3 s into its stop (an impatient supervisor): what it had not stopped yet the reaper
    stops and removes, shared memory included."""
    shm_before = set(os.listdir("/dev/shm"))
    d = helpers.Daemon(1, os.path.join(logs, "kill9-stop-pool"),
                       ["--state-file", "none", "--enable-parking"])
    try:
        d.wait_ready()
        r = d.attach(model_a, name="x")
        assert r.status_code == 201, r.text
        assert helpers.greedy(r.json()["url"], model_a, helpers.PROMPTS[:1])
        assert d.client.delete("/instances/x", params={"park": "true"}).status_code == 200
        r = d.attach(model_a, name="x")
        assert r.status_code == 200 and r.json()["woken"], r.text
        inst = r.json()
        assert helpers.greedy(inst["url"], model_a, helpers.PROMPTS[:1])
        tree = helpers.process_tree(d.proc.pid)
        assert helpers.reaper_pid(d.proc.pid) in tree, tree
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(3)
            print("the daemon's stop ended within 3 s: the clean stop is what is checked")
        except subprocess.TimeoutExpired:
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
        _assert_daemon_left_nothing(d, tree, inst, shm_before)
    finally:
        d.stop()


def _assert_daemon_left_nothing(d, tree: dict, inst: dict, shm_before: set) -> None:
    # The reaper waits up to its grace (10 s) for processes to end themselves.
    _poll(lambda: not [p for p in tree if os.path.exists(f"/proc/{p}")], 90,
          f"processes outlived the daemon: {tree}", every=0.2)
    assert _group_members(inst["engine_pid"]) == []
    if helpers.GPUS:  # no process left holding a GPU (the whole device is this pool's)
        _poll(lambda: not (helpers.gpu_pids() & set(tree)), 30,
              f"processes still hold the GPU: {helpers.gpu_pids()}", every=0.2)
    leftovers = helpers.pool_leftovers(d.port)
    assert leftovers["processes"] == []
    assert leftovers["run_dirs"] == [], leftovers
    assert helpers.leaked_shm(shm_before) == set()
