"""Per-process device memory and the kernel warm-up's retries (issue 19, items 1 and 2).

The accounting and the retry policy are pure functions of recorded readings, checked here
on the CPU; the readings below are those of the issue's H200 run (worker A idle at 805 MiB,
model B holding 133351 MiB of the same GPU). The GPU sequence itself is
tests/test_gpu_sharing.py. One end-to-end check on the shared CPU pool: what GET /workers
and `ls` show on CPU workers.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from vllm_pool import device_memory as dm
from vllm_pool import messages
from vllm_pool.daemon import kernel_warmup as kw
from vllm_pool.daemon import parking
from vllm_pool.states import WorkerState
from vllm_pool.worker import reset

MiB, GiB = 2**20, 2**30
H200 = 143771 * MiB  # total memory NVML gives for one H200
A, B, OTHER = 4101, 4202, 4303


def _reading(*procs: tuple[int, int | None], free: int = 8 * GiB) -> dm.DeviceReading:
    return dm.DeviceReading("GPU-7e1f", H200, free,
                            tuple(dm.ProcessUse(pid, used) for pid, used in procs))


# ---- the accounting -------------------------------------------------------------------
def test_own_bytes_is_the_pids_entry_not_the_device():
    r = _reading((A, 805 * MiB), (B, 133351 * MiB))
    assert dm.own_bytes(r, A) == 805 * MiB
    assert dm.own_bytes(r, B) == 133351 * MiB
    assert dm.others_bytes(r, A) == 133351 * MiB
    # One entry per context of the process: they add up.
    assert dm.own_bytes(_reading((A, 500 * MiB), (A, 300 * MiB)), A) == 800 * MiB


def test_own_bytes_unknown_without_an_entry_or_a_figure():
    # No entry: another PID namespace than the driver's, or no context: not a zero.
    assert dm.own_bytes(_reading((B, 133351 * MiB)), A) is None
    # MIG and some containers: NVML_VALUE_NOT_AVAILABLE (pynvml gives None).
    r = _reading((A, None), (B, 1 * GiB))
    assert dm.own_bytes(r, A) is None and dm.others_bytes(r, B) is None
    assert dm.own_bytes(None, A) is None
    assert dm.own_bytes(_reading(), A) is None


def test_gpu_figures_from_recorded_readings():
    r = _reading((A, 805 * MiB), (B, 133351 * MiB), free=8710 * MiB)
    f = reset.gpu_figures(r, A, 2 * MiB, 8710 * MiB, H200)
    assert (f.own_bytes, f.source, f.device_uuid) == (805 * MiB, "nvml", "GPU-7e1f")
    assert (f.device_free_bytes, f.device_total_bytes) == (8710 * MiB, H200)
    # No per-process figure: PyTorch's reserved memory, labelled as such; the device's
    # free and total stay.
    f = reset.gpu_figures(_reading((A, None), (B, 1 * GiB)), A, 2 * MiB, 8710 * MiB, H200)
    assert (f.own_bytes, f.source, f.device_free_bytes) == (2 * MiB, "torch", 8710 * MiB)
    f = reset.gpu_figures(None, A, 0, 8710 * MiB, H200)
    assert (f.source, f.device_uuid) == ("torch", "")


def test_cpu_worker_keeps_rss():
    f = reset.memory_figures(torch.device("cpu"))
    assert f.source == "rss" and f.own_bytes > 0
    assert (f.device_free_bytes, f.device_total_bytes, f.device_uuid) == (0, 0, "")
    base = reset.IdleBaseline.measure(torch.device("cpu"))
    assert base.source == "rss"
    assert reset.clean_check(torch.device("cpu"), base, 256 * MiB, 1024 * MiB) is None


SLACK, CTX = 256 * MiB, 1024 * MiB


def _base(own: int, source: str = "nvml", torch_bytes: int = 2 * MiB) -> reset.IdleBaseline:
    return reset.IdleBaseline(device_bytes=own, torch_bytes=torch_bytes, source=source)


def _figs(own: int, source: str = "nvml") -> reset.MemoryFigures:
    return reset.MemoryFigures(own, source, 8 * GiB, H200, "GPU-7e1f")


def test_clean_check_compares_own_figure_with_own_idle_figure():
    """The issue's detach of A: B held 133351 MiB of the device; A's own memory was back
    at its idle figure plus the CUDA context's growth: clean."""
    base = _base(805 * MiB)
    r = _reading((A, 805 * MiB + 310 * MiB), (B, 133351 * MiB))
    figs = reset.gpu_figures(r, A, 2 * MiB, 8 * GiB, H200)
    assert reset.device_memory_verdict(base, 2 * MiB, figs, SLACK, CTX) is None
    # The same allowances as before: slack + context, on this process's own growth.
    assert reset.device_memory_verdict(base, 2 * MiB, _figs(805 * MiB + SLACK + CTX),
                                       SLACK, CTX) is None
    err = reset.device_memory_verdict(base, 2 * MiB, _figs(805 * MiB + SLACK + CTX + MiB),
                                      SLACK, CTX)
    assert err and "this worker's device memory is 1281 MiB above its idle baseline 805" in err
    # --context-memory-mib 0: the strict check.
    assert reset.device_memory_verdict(base, 2 * MiB, _figs(805 * MiB + 300 * MiB), SLACK, 0)


def test_clean_check_torch_part_and_no_per_process_figure():
    base = _base(805 * MiB, torch_bytes=2 * MiB)
    err = reset.device_memory_verdict(base, 2 * MiB + SLACK + MiB, _figs(805 * MiB), SLACK, CTX)
    assert err and err.startswith("PyTorch still holds 257 MiB")
    # Without NVML's figure (now or at idle) only PyTorch's allocator is checked: a
    # whole-device figure would be other processes' models.
    assert reset.device_memory_verdict(base, 2 * MiB, _figs(140 * GiB, "torch"), SLACK, CTX) \
        is None
    assert reset.device_memory_verdict(_base(2 * MiB, "torch"), 2 * MiB, _figs(140 * GiB),
                                       SLACK, CTX) is None


def test_nvml_ref_follows_cuda_visible_devices():
    assert dm.nvml_ref(None, 1) == ("index", 1)
    assert dm.nvml_ref("4,6", 1) == ("index", 6)
    assert dm.nvml_ref("GPU-aa,GPU-bb", 1) == ("uuid", "GPU-bb")
    assert dm.nvml_ref("MIG-cc", 0) == ("uuid", "MIG-cc")
    assert dm.nvml_ref("4,6", 2) is None
    assert dm.nvml_ref("", 0) is None
    assert dm.nvml_ref("3,x,5", 1) is None  # CUDA stops at the first invalid entry
    assert dm.uuid_candidates("7e1f-00") == ["GPU-7e1f-00", "MIG-7e1f-00"]
    assert dm.uuid_candidates("GPU-7e1f") == ["GPU-7e1f"]


def test_without_nvml_everything_is_none():
    try:
        import pynvml  # noqa: F401
        pytest.skip("pynvml is installed here")
    except ImportError:
        pass
    assert dm.read_device("GPU-7e1f") is None
    assert dm.handle_uuid("7e1f", "0", 0) is None
    assert dm.process_bytes(A, "GPU-7e1f") is None
    assert "ModuleNotFoundError" in dm.unavailable_reason()


def _handle(device="cuda:0", source="nvml", own=805 * MiB, free=8 * GiB, total=H200):
    from vllm_pool.daemon.workers import WorkerHandle

    w = WorkerHandle(0, device, "/nonexistent.sock", "00", {}, lambda *a: None,
                     lambda *a: None, "/dev/null")
    w.memory_bytes, w.memory_source = own, source
    w.device_free_bytes, w.device_total_bytes = free, total
    return w


def test_daemon_side_figures_fall_back_to_the_workers_report():
    # No process behind the handle (and no NVML here): what the worker last reported.
    w = _handle()
    assert w.memory_now() == (805 * MiB, 8 * GiB, H200)
    assert parking.device_bytes([w, _handle(own=700 * MiB)]) == 1505 * MiB
    assert parking.device_bytes([_handle(source="torch")]) is None
    assert parking.device_bytes([_handle("cpu:0", "rss", free=0, total=0)]) is None
    assert parking.device_bytes([]) is None


def test_worker_events_carry_the_figures():
    ev = messages.Idle(pid=A, memory_bytes=805 * MiB, baseline_bytes=805 * MiB,
                       memory_source="nvml", device_free_bytes=8 * GiB,
                       device_total_bytes=H200, device_uuid="GPU-7e1f")
    assert messages.decode_event(messages.encode(ev)) == ev
    # An event without them still decodes.
    old = messages.decode_event(b'{"type":"Idle","pid":1}')
    assert old.memory_source == "" and old.device_total_bytes == 0


# ---- the kernel warm-up on a busy device ------------------------------------------------
def _vllm_accepts(args: list[str], free: int, total: int) -> bool:
    """vLLM's start-up check (request_memory, 0.26-0.32): free >= ceil(util x total)."""
    import math

    util = float(args[args.index("--gpu-memory-utilization") + 1])
    return 0 < util <= 1 and free >= math.ceil(total * util)


def test_memory_args_ask_for_what_is_free():
    # The case: B holds 133351 MiB; what is left is enough for the tiny model.
    free = H200 - 133351 * MiB - 805 * MiB
    args, wait = kw.memory_args(free, H200)
    assert wait is None and _vllm_accepts(args, free, H200)
    assert _vllm_accepts(args, free - kw.MARGIN_BYTES + MiB, H200)  # margin for drift
    # An empty device: no more than vLLM's usual share.
    args, _ = kw.memory_args(H200 - 600 * MiB, H200)
    assert args == ["--gpu-memory-utilization", "0.9000"]
    # Just enough, on a larger device than any today: still a valid, accepted share.
    args, wait = kw.memory_args(kw.NEED_BYTES, 1024 * GiB)
    assert wait is None and _vllm_accepts(args, kw.NEED_BYTES, 1024 * GiB)
    # Too little: wait, with the figures in the reason.
    args, wait = kw.memory_args(2 * GiB, H200)
    assert args == [] and "2048 MiB free on the device" in wait and "3072 MiB" in wait
    # No reading (CPU): vLLM's own defaults, as before.
    assert kw.memory_args(0, 0) == ([], None)
    full = kw.engine_args("compiled", True, ["--gpu-memory-utilization", "0.0500"])
    assert full[-2:] == ["--gpu-memory-utilization", "0.0500"] and "--kv-cache-memory-bytes" in full


def test_retry_policy():
    assert [kw.retry_delay(n) for n in range(1, 8)] == [15, 30, 60, 120, 240, 480, 600]
    st = kw.WarmupStatus()
    kw.note_wait(st, "no room", 100.0)
    assert (st.state, st.failures, st.retry_at) == ("waiting", 0, 100.0 + kw.ROOM_POLL_S)
    for i in range(1, kw.MAX_FAILURES):
        kw.note_failure(st, f"boom {i}", 1000.0)
        assert st.state == "retrying" and st.retry_at == 1000.0 + kw.retry_delay(i)
    kw.note_failure(st, "boom last", 1000.0)
    assert (st.state, st.retry_at, st.error) == ("failed", None, "boom last")


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _worker(slot: int, pid: int, free: int) -> SimpleNamespace:
    w = SimpleNamespace(slot=slot, pid=pid, device="cuda:0", state=WorkerState.IDLE,
                        instance_id=None, warmup_status=kw.WarmupStatus(),
                        free=free, device_uuid="GPU-7e1f")
    w.memory_now = lambda: (805 * MiB, w.free, H200)
    return w


def test_warmup_waits_for_room_then_retries_a_failure_then_succeeds():
    clock, calls, released = _Clock(), [], []
    w = _worker(0, A, free=1 * GiB)  # another model holds the device

    def attempt(memory):
        calls.append((clock.t, list(memory)))
        if len(calls) == 1:
            raise RuntimeError("engine exited during start-up: out of memory")
        return True

    def room_appears(s):  # the other model parks 20 s later
        clock.sleep(s)
        if clock.t >= 1020.0:
            w.free = 60 * GiB

    kw.retry_loop(w, attempt, lambda: released.append(clock.t), lambda: False, clock.now, room_appears)
    st = w.warmup_status
    assert st.state == "done" and st.error is None
    assert (st.attempts, st.failures) == (2, 1)
    # Free while it waited (not warming: /health and other attaches need not wait).
    assert released and released[0] == 1000.0 and st.released
    first, second = calls
    assert first[0] >= 1020.0 and _vllm_accepts(first[1], 60 * GiB, H200)
    assert second[0] - first[0] >= kw.retry_delay(1)


def test_warmup_failure_is_this_workers_alone_and_stops_with_its_process():
    clock = _Clock()
    bad, good = _worker(0, A, 60 * GiB), _worker(1, B, 60 * GiB)

    def fail(memory):
        raise RuntimeError("CUDA error: an illegal memory access")

    kw.retry_loop(bad, fail, lambda: None, lambda: False, clock.now, clock.sleep)
    assert bad.warmup_status.state == "failed"
    assert bad.warmup_status.failures == kw.MAX_FAILURES
    assert "illegal memory access" in bad.warmup_status.error
    # The next worker still runs its own warm-up (nothing was turned off for the pool).
    ran = []
    kw.retry_loop(good, lambda m: ran.append(m) or True, lambda: None, lambda: False, clock.now,
           clock.sleep)
    assert ran and good.warmup_status.state == "done"

    # A busy worker is waited for; a respawned process (new PID) ends the old loop.
    w = _worker(2, OTHER, 60 * GiB)
    w.state = WorkerState.SERVING

    def sleep(s):
        clock.sleep(s)
        w.pid = OTHER + 1

    kw.retry_loop(w, lambda m: pytest.fail("must not attach to a busy worker"), lambda: None,
           lambda: False, clock.now, sleep)
    assert w.warmup_status.attempts == 0


def test_warmup_without_a_live_reading_lets_vllm_decide():
    """No NVML in the daemon: the last reported free memory is stale, so waiting on it
    could last forever; the warm-up asks for what it needs and vLLM's check decides."""
    clock, calls = _Clock(), []
    w = _worker(0, A, free=1 * GiB)
    w.device_uuid = ""
    kw.retry_loop(w, lambda m: calls.append(m) or True, lambda: None, lambda: False, clock.now,
           clock.sleep)
    assert w.warmup_status.state == "done" and len(calls) == 1
    assert _vllm_accepts(calls[0], kw.NEED_BYTES + 16 * MiB, H200)  # (rounded up)
    assert not _vllm_accepts(calls[0], kw.NEED_BYTES - 64 * MiB, H200)


def test_soak_summary_names_the_memory_source():
    sys.path.insert(0, "benchmarks")
    try:
        import soak
    finally:
        sys.path.remove("benchmarks")
    row = {"cycle": 0, "model": "m", "tp": 1, "attach_s": 1.0, "detach_s": 1.0,
           "shm_entries": 0, "shm_unmapped_new": 0, "run_dir_files": 0,
           "workers": {"0": {"pid": A, "rss_bytes": 1, "memory_bytes": 805 * MiB,
                             "memory_source": "nvml", "threads": 1, "fds": 1, "shm_maps": 0,
                             "shm_map_bytes": 0, "rss_minus_shm_bytes": 1}}}
    res = soak.summarize([row, dict(row, cycle=1)], {"0": A}, 0, 1.0, [])
    assert res["memory_sources"] == {"0": ["nvml"]}


# ---- end to end, CPU: what the pool shows ------------------------------------------------
def test_cpu_workers_show_their_rss_and_no_device_figures(idle_pool):
    ws = idle_pool.workers()
    for w in ws:
        assert w["memory_source"] == "rss" and w["memory_bytes"] > 0
        assert w["baseline_bytes"] > 0
        assert w["device_free_bytes"] is None and w["device_total_bytes"] is None
        assert w["kernel_warmup"]["state"] == "off"  # auto is off on CPU
    out = subprocess.run([sys.executable, "-m", "vllm_pool", "ls", "--pool", idle_pool.url],
                         capture_output=True, text=True, timeout=60).stdout
    assert "DEVICE FREE" in out and "kernel warm-up" not in out, out


def test_failed_kernel_warmup_is_shown_and_retried_on_that_worker(logs, tmp_path, monkeypatch):
    """A warm-up that fails (here: the built-in model is missing its files) leaves the pool
    ready and the worker free, is shown on the worker with its reason, and is retried:
    once the model is whole again, the next try passes on the same process."""
    import json
    import os
    import shutil

    from tests import helpers

    cache = tmp_path / "cache"
    broken = kw.model_dir(str(cache))
    os.makedirs(broken)
    with open(os.path.join(broken, "vllm_pool_fixture.json"), "w") as f:
        json.dump(kw._STAMP, f)  # accepted as built, but it has no config or weights
    monkeypatch.setenv("VLLM_POOL_CACHE", str(cache))
    d = helpers.Daemon(1, os.path.join(logs, "warmup-retry-pool"),
                       ["--kernel-warmup", "eager", "--state-file", "none"])
    try:
        d.wait_ready(300)  # ready although the warm-up failed: the worker serves without it
        w = d.wait_workers(lambda ws: ws[0]["kernel_warmup"]["failures"] >= 1, 300)[0]
        wu = w["kernel_warmup"]
        assert w["state"] == "idle" and wu["state"] == "retrying", w
        assert wu["error"] and wu["retry_in_s"] > 0
        pid = w["pid"]
        out = subprocess.run([sys.executable, "-m", "vllm_pool", "ls", "--pool", d.url],
                             capture_output=True, text=True, timeout=60).stdout
        assert "kernel warm-up retrying (1 failed" in out, out
        shutil.rmtree(broken)  # the next try builds the model again
        w = d.wait_workers(lambda ws: ws[0]["kernel_warmup"]["state"] in ("done", "failed"),
                           300)[0]
        assert w["kernel_warmup"]["state"] == "done", w
        assert (w["kernel_warmup"]["failures"], w["kernel_warmup"]["attempts"]) == (1, 2), w
        assert w["pid"] == pid and w["restarts"] == 0 and w["kernel_warmup_s"] > 0, w
        assert d.instances() == []
    finally:
        assert d.stop() == 0
