"""`vllm-pool serve`: start the workers, serve the control API, stop everything on exit."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from vllm_pool import access
from vllm_pool.daemon import kernel_warmup

logger = logging.getLogger("vllm_pool.daemon")


def parse_gpus(spec: str) -> list[str]:
    """'0-3', '0,2,5', 'all' -> physical GPU ids as strings."""
    if spec == "all":
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 check=True).stdout
            n = sum(1 for ln in out.splitlines() if ln.startswith("GPU "))
        except (OSError, subprocess.CalledProcessError):
            n = 0
        if n == 0:
            raise SystemExit("--gpus all: no GPU found (nvidia-smi -L)")
        return [str(i) for i in range(n)]
    ids: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()) or int(a) > int(b):
                raise SystemExit(f"--gpus: bad range {part!r}")
            ids += [str(i) for i in range(int(a), int(b) + 1)]
        elif part.isdigit():
            ids.append(part)
        else:
            raise SystemExit(f"--gpus: bad GPU id {part!r}")
    if len(set(ids)) != len(ids):
        raise SystemExit(f"--gpus: GPU listed twice in {spec!r}")
    return ids


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gpus", help="GPUs the pool owns: 0-7, 0,1 or all")
    g.add_argument("--cpu-slots", type=int, help="CPU pool: number of workers, one core each")
    p.add_argument("--host", default="127.0.0.1", help="control API address (loopback default)")
    p.add_argument("--port", type=int, default=8100, help="control API port")
    p.add_argument("--api-key", default=None,
                   help=f"key required on every control call (or ${access.API_KEY_ENV}); "
                        "mandatory when --host is not a loopback address")
    p.add_argument("--engine-host", default="127.0.0.1", help="address attached engines bind")
    p.add_argument("--log-dir", default=None, help="worker and engine logs "
                                                   "(default: ~/.cache/vllm-pool/logs)")
    p.add_argument("--engine-hosts", choices=["fork", "fresh"], default="fork",
                   help="fork: each attach's engine is forked in milliseconds from one warm "
                        "process with vLLM imported (no CUDA context); fresh: a new "
                        "interpreter per attach, which imports vLLM first")
    p.add_argument("--engine-spares", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--state-file", default=None,
                   help="where the daemon records its processes and instances, so a daemon "
                        "started after a crash stops and removes what the dead one left "
                        "(default: ~/.cache/vllm-pool/pool-<port>.state.json; 'none' disables)")
    p.add_argument("--kernel-warmup", choices=kernel_warmup.MODES,
                   default="auto",
                   help="each new worker first attaches a built-in tiny model once, so the "
                        "first real attach does not pay for compiling vLLM's Triton kernels "
                        "and loading CUDA modules (`compiled` also pays Inductor's first use); "
                        "auto: compiled on GPUs, off on CPU")
    k = p.add_argument_group("parking", "parked models: asleep, re-attached in about a second "
                             "(docs/parking.md)")
    k.add_argument("--enable-parking", action="store_true",
                   help="engines start able to sleep (GPU: --enable-sleep-mode and vLLM's dev "
                        "endpoints on the engine's port); `detach --park` keeps a model asleep")
    k.add_argument("--park-budget-gb", type=float, default=None,
                   help="host memory for parked models (default: half the RAM); least "
                        "recently used parked models are detached beyond it")
    k.add_argument("--park-on-detach", action="store_true",
                   help="a plain detach parks (`detach --no-park` still detaches)")
    k.add_argument("--wake-evicts", choices=["park", "detach"], default="park",
                   help="what a wake does to a serving model on the devices it needs")
    p.add_argument("--memory-slack-mib", type=int, default=256,
                   help="memory PyTorch may still hold in a detached worker (more: the "
                        "worker is respawned)")
    p.add_argument("--context-memory-mib", type=int, default=1024,
                   help="GPU: CUDA-context memory (loaded kernels, library handles) a "
                        "detached worker may keep above its idle baseline for the next "
                        "attach; only process exit frees it; more: the worker is respawned")
    p.add_argument("--pack-margin-mib", type=int, default=1024,
                   help="GPU: memory kept free beyond an attach's --gpu-memory-utilization "
                        "share when models are packed on one device (docs/packing.md)")


class Companion(Protocol):
    """Something that runs beside the pool in the daemon's process (the gateway of
    `serve --models`). The daemon knows only this: the CLI, above it, composes the two."""

    def prepare(self, api_key: str | None, devices: list[str]) -> None:
        """Check settings and take resources before the pool starts (SystemExit refuses)."""

    def start(self, pool) -> None:
        """The pool is ready."""

    def stop(self) -> None:
        """The daemon is stopping (also when `start` never ran)."""


def serve(args: argparse.Namespace, companions: Sequence[Companion] = ()) -> int:
    from vllm_pool.logs import configure_logging

    configure_logging("PoolDaemon")
    from vllm_pool import compat

    try:
        logger.info("vLLM %s (supported: %s)", compat.check_vllm_version(), compat.SUPPORTED_STR)
    except compat.UnsupportedVLLM as e:
        raise SystemExit(str(e)) from None
    api_key = access.api_key(args.api_key)
    access.require_key_off_loopback(args.host, api_key, "--host")
    import uvicorn

    from vllm_pool.daemon.api import build_app
    from vllm_pool.daemon.pool import Pool, PoolConfig

    if args.gpus is not None:
        gpus = parse_gpus(args.gpus)
        devices = [f"cuda:{i}" for i in range(len(gpus))]
        visible = ",".join(gpus)
    else:
        if args.cpu_slots < 1 or args.cpu_slots > (os.cpu_count() or 1):
            raise SystemExit(f"--cpu-slots must be 1..{os.cpu_count()}")
        devices = [f"cpu:{i}" for i in range(args.cpu_slots)]
        visible = None
    prepared: list[Companion] = []
    try:
        for c in companions:
            c.prepare(api_key, devices)
            prepared.append(c)
    except BaseException:
        for c in prepared:
            c.stop()
        raise
    from vllm_pool.daemon import state_file

    state_path = None if args.state_file == "none" else (
        args.state_file or state_file.default_path(args.port))
    if state_path:
        os.makedirs(os.path.dirname(os.path.abspath(state_path)), exist_ok=True)
        try:
            for line in state_file.reclaim(state_path):
                logger.warning("reclaimed after an earlier daemon's crash: %s", line)
        except state_file.DaemonAlive as e:
            raise SystemExit(str(e)) from None
    run_dir = tempfile.mkdtemp(prefix=f"vllm-pool-{args.port}-")
    log_dir = args.log_dir or os.path.join(os.path.expanduser("~"), ".cache", "vllm-pool", "logs")
    pool = Pool(PoolConfig(devices=devices, visible_devices=visible, run_dir=run_dir,
                           log_dir=log_dir, engine_host=args.engine_host,
                           memory_slack_mib=args.memory_slack_mib,
                           context_memory_mib=args.context_memory_mib,
                           pack_margin_mib=args.pack_margin_mib,
                           engine_fork=args.engine_hosts == "fork"
                           and args.engine_spares != 0,  # the old flag's 0: fresh hosts
                           state_path=state_path, control_port=args.port,
                           parking=args.enable_parking,
                           park_budget_bytes=0 if args.park_budget_gb is None
                           else max(1, int(args.park_budget_gb * 2**30)),
                           park_on_detach=args.park_on_detach, wake_evicts=args.wake_evicts,
                           kernel_warmup=kernel_warmup.resolve_mode(args.kernel_warmup,
                                                                    args.gpus is not None)))
    app = build_app(pool)
    if api_key:
        _require_key(app, api_key)
    t0 = time.perf_counter()
    failed: list[str] = []
    logger.info("starting %d pool workers on %s (logs in %s)", len(devices),
                f"GPUs {visible}" if visible else "CPU cores", log_dir)
    try:
        pool.start()
        _Server = _server_class()
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        server = _Server(config)

        def announce():
            try:
                pool.wait_ready()
                logger.info("pool ready: %d workers in %.1fs; control API at http://%s:%d",
                            len(devices), time.perf_counter() - t0, args.host, args.port)
                for c in prepared:
                    c.start(pool)  # after the workers are ready: a gateway's preloads attach
            except RuntimeError as e:
                # A pool that cannot start its workers (unsupported vLLM, no device) stops
                # with the reason instead of serving a broken pool.
                logger.error("%s", e)
                failed.append(str(e))
                server.should_exit = True

        threading.Thread(target=announce, daemon=True).start()
        server.run()
    finally:
        # A second signal must not cut the clean-up short; each step has its own timeout.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for c in prepared:
            c.stop()
        logger.info("stopping pool: detaching %d instances, stopping workers",
                    len(pool.instances))
        pool.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("pool stopped")
    return 1 if failed else 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM/SIGINT after its own shutdown, which would kill the
            # daemon before it stops its engines and workers. Take the signal, return.
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


def _require_key(app, key: str) -> None:
    from fastapi.responses import JSONResponse

    expected = access.bearer(key)

    @app.middleware("http")
    async def check_key(request, call_next):
        if not access.authorized(request.headers.get("authorization", "").encode(), expected):
            return JSONResponse({"detail": "missing or wrong API key"}, status_code=401)
        return await call_next(request)
