"""Engine hosts: which process an attach's engine runs in, and what it is told.

The pool keeps one engine fork server (engine/forkserver.py): vLLM imported, no CUDA
context. Each attach gets a host forked from it in milliseconds, so back-to-back attaches
never wait for an interpreter. An attach that sets environment vLLM reads at import time
(logging, plugins, devices) gets a fresh interpreter instead, since a fork would carry the
server's imports made under other settings. A server that dies is started again; attaches
meanwhile wait for it (it is closer to ready than a fresh interpreter).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable

from vllm_pool import compat, messages
from vllm_pool.daemon import parking
from vllm_pool.engine.launch import EngineProcess, ForkServer, SpawnedHost, engine_argv

logger = logging.getLogger("vllm_pool.daemon")

# Environment an engine reads at import time: attaches that set it get a fresh process.
_IMPORT_TIME_ENV = ("VLLM_LOGGING", "VLLM_CONFIGURE_LOGGING", "VLLM_PLUGINS", "CUDA_",
                    "PYTHON", "LD_", "OMP_", "TORCH", "TRITON", "VLLM_USE_V1", "VLLM_TARGET")
# ...except cache locations, which torch and Triton read each time they use the cache.
_LAZY_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def needs_fresh_interpreter(env: dict[str, str]) -> bool:
    return any(k.startswith(_IMPORT_TIME_ENV) and k not in _LAZY_ENV for k in env)


class EngineHosts:
    def __init__(self, base_env: Callable[[], dict[str, str]], log_dir: str, forked: bool):
        self._base_env = base_env
        self._log_dir = log_dir
        self.forked = forked              # False: every attach starts a fresh interpreter
        self._lock = threading.Lock()
        self._server: ForkServer | None = None
        self._stopping = False

    def start(self) -> None:
        if self.forked:
            with self._lock:
                self._ensure_server()

    def _ensure_server(self) -> ForkServer:
        """The live fork server, started (again) if needed; under the lock."""
        if self._server is None or not self._server.alive():
            if self._server is not None:
                logger.warning("engine fork server (pid %d) exited; starting another",
                               self._server.pid)
            log = os.path.join(self._log_dir, f"engine-forkserver-{uuid.uuid4().hex[:8]}.log")
            self._server = ForkServer(self._base_env(), log)
        return self._server

    def ready(self) -> bool:
        """True when an attach would get its host at once (a fork, or a fresh spawn); a
        fork server found dead is started again here."""
        if not self.forked:
            return True
        with self._lock:
            if self._stopping:
                return False
            server = self._ensure_server()
        return server.ready()

    def wait_ready(self, timeout: float) -> bool:
        """Until the fork server is warm (True at once without one)."""
        if not self.forked:
            return True
        with self._lock:
            server = self._ensure_server()
        return server.ready(timeout)

    def pids(self) -> list[int]:
        s = self._server
        return [s.pid] if s is not None and s.alive() else []

    def host_for(self, env: dict[str, str], log_path: str, timeout: float) -> EngineProcess:
        """A host for one attach, waiting for its order: forked unless `env` needs a fresh
        interpreter, or the pool runs without a fork server."""
        if self.forked and not needs_fresh_interpreter(env):
            with self._lock:
                if self._stopping:
                    raise OSError("the pool is shutting down")
                server = self._ensure_server()
            if server.ready(timeout):
                try:
                    return server.fork(log_path)
                except OSError as e:
                    logger.warning("engine fork server could not fork (%s): a fresh host", e)
        return SpawnedHost(self._base_env(), log_path)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            server, self._server = self._server, None
        if server is not None:
            server.stop()


def engine_order(pool, inst, workers) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` arguments and the environment of an instance's engine (pool is the
    daemon's Pool, inst its Instance, workers the leased WorkerHandles in rank order)."""
    lease = messages.LeaseInfo(
        instance_id=inst.id, token=inst.token, authkey=pool.authkey,
        workers=[messages.WorkerAddress(w.slot, w.device, w.socket_path) for w in workers])
    env = pool._engine_base_env()
    # EngineCore forks from the warm host (which has no CUDA context) unless this attach
    # asks otherwise. Not the daemon's own value: the `vllm` CLI sets `spawn` in its
    # process (cli_env_setup), and a spawned EngineCore imports vLLM again (16 s on the H100).
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    env.update(compat.engine_env_defaults())
    if pool.cfg.parking:
        env.update(parking.engine_env())
    env.update(inst.env)
    env[messages.LEASE_ENV] = lease.to_json()
    env[messages.RUN_DIR_ENV] = inst.run_dir
    env["VLLM_RPC_BASE_PATH"] = inst.run_dir   # zmq ipc sockets die with the instance
    device_ids = None
    if pool.cfg.visible_devices is not None:
        device_ids = [int(w.device.split(":")[1]) for w in workers]
    extra = parking.engine_args(inst.args, pool.on_gpu(inst)) if pool.cfg.parking \
        else inst.args
    return engine_argv(inst.model, inst.host, inst.port, inst.tp, inst.pp, extra,
                       device_ids), env
