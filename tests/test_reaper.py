"""The daemon's reaper (daemon/reaper.py) on real processes, without vLLM: what it does when
its daemon dies before `done`, and that it does nothing after `done`."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import msgspec

from vllm_pool.daemon import reaper, state_file


def _setup(tmp_path):
    shm = f"vllm_pool_reaper_test_{uuid.uuid4().hex[:8]}"
    with open(os.path.join("/dev/shm", shm), "wb") as f:
        f.write(b"x" * 4096)
    run_dir = tmp_path / "run"
    (run_dir / "inst-1").mkdir(parents=True)
    # A process that does not end itself on its daemon's death (as if hung).
    hung = subprocess.Popen(["sleep", "600"], start_new_session=True)
    rec = state_file.StateRecord(
        daemon_pid=os.getpid(), daemon_start_time=state_file.proc_start_time(os.getpid()),
        control_port=1, run_dir=str(run_dir),
        processes=[state_file.ProcRecord(hung.pid, state_file.proc_start_time(hung.pid),
                                         "worker-0")],
        instances=[state_file.InstanceRecord(id="1", name="x", model="m", slots=[0], port=2,
                                             shm_names=[shm], run_dir=str(run_dir / "inst-1"))])
    return shm, run_dir, hung, rec


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_reaper_removes_what_a_dead_daemon_left(tmp_path):
    shm, run_dir, hung, rec = _setup(tmp_path)
    state = tmp_path / "pool.state.json"
    state_file.save(str(state), rec)
    r = reaper.Reaper(str(tmp_path / "reaper.log"), str(state), grace=0.5)
    try:
        r.record(msgspec.json.encode(rec))
        r._close()  # EOF without `done`: the daemon died
        assert r.proc.wait(30) == 0
        assert hung.wait(10) is not None  # killed: it would have slept 600 s
        assert not os.path.exists(os.path.join("/dev/shm", shm))
        assert not run_dir.exists()
        assert not state.exists()
        log = (tmp_path / "reaper.log").read_text()
        assert f"killed worker-0 (pid {hung.pid})" in log, log
    finally:
        hung.kill()
        if os.path.exists(os.path.join("/dev/shm", shm)):
            os.unlink(os.path.join("/dev/shm", shm))


def test_reaper_does_nothing_after_a_clean_stop(tmp_path):
    shm, run_dir, hung, rec = _setup(tmp_path)
    r = reaper.Reaper(str(tmp_path / "reaper.log"), None, grace=0.5)
    try:
        r.record(msgspec.json.encode(rec))
        r.done()
        assert r.proc.returncode == 0
        assert hung.poll() is None
        assert os.path.exists(os.path.join("/dev/shm", shm)) and run_dir.exists()
    finally:
        hung.kill()
        os.unlink(os.path.join("/dev/shm", shm))
