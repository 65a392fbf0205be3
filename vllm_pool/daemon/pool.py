"""The pool: workers, instances, attach and detach. The HTTP layer only calls into here.

Invariants kept under `self.lock`:
- a worker is leased to at most one instance (the allocator only hands out IDLE ones,
  and RESERVED is set in the same critical section);
- every exit path of an attach (success, bad input, engine crash, worker crash,
  timeout) leaves each of its workers IDLE again or respawning, the engine's process
  group gone, and its shared memory and run directory removed.
"""

from __future__ import annotations

import glob
import logging
import os
import secrets
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import msgspec

from vllm_pool import compat, messages
from vllm_pool.daemon import allocator, kernel_warmup, parking, state_file
from vllm_pool.daemon.workers import WorkerHandle
from vllm_pool.engine.launch import EngineProcess, engine_argv, failure_reason, health_ok
from vllm_pool.states import ATTACH_PHASES, LIVE_INSTANCE_STATES, InstanceState, WorkerState

logger = logging.getLogger("vllm_pool.daemon")

# Environment an engine reads at import time: attaches that set it get a fresh process.
_IMPORT_TIME_ENV = ("VLLM_LOGGING", "VLLM_CONFIGURE_LOGGING", "VLLM_PLUGINS", "CUDA_",
                    "PYTHON", "LD_", "OMP_", "TORCH", "TRITON", "VLLM_USE_V1", "VLLM_TARGET")
# ...except cache locations, which torch and Triton read each time they use the cache.
_LAZY_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


class AttachError(Exception):
    """The attach failed; the pool is as it was. `status` is the HTTP status."""

    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


@dataclass
class PoolConfig:
    devices: list[str]                      # "cuda:<visible idx>" or "cpu:<core>"
    visible_devices: str | None             # CUDA_VISIBLE_DEVICES for workers and engines
    run_dir: str
    log_dir: str
    engine_host: str = "127.0.0.1"
    memory_slack_mib: int = 256
    context_memory_mib: int = 1024
    worker_start_timeout: float = 300.0
    engine_spares: int = 1                  # pre-warmed engine hosts kept ready
    state_path: str | None = None           # state file for reclaim after a crash
    control_port: int = 0
    parking: bool = False                   # engines start able to sleep; detach may park
    park_budget_bytes: int = 0              # host memory for parked instances (0: default)
    park_on_detach: bool = False            # a plain detach parks
    wake_evicts: str = "park"               # what waking does to an occupant: park|detach
    kernel_warmup: str = "off"              # off|eager|compiled: see kernel_warmup.py


@dataclass
class Instance:
    id: str
    name: str
    model: str
    tp: int
    pp: int
    port: int
    host: str
    args: list[str]
    env: dict[str, str]
    slots: list[int]
    token: str
    run_dir: str
    log_path: str
    state: InstanceState = InstanceState.ATTACHING
    created_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    engine: EngineProcess | None = None
    engine_host: str = ""                   # "spare" (pre-warmed) or "fresh"
    shm_names: set[str] = field(default_factory=set)
    dist_idents: set[str] = field(default_factory=set)
    settings: str = ""                      # parking.settings_key: what a re-attach must match
    devices: list[str] = field(default_factory=list)
    last_used: float = field(default_factory=time.time)
    parked_at: float | None = None
    host_bytes: int = 0                     # parked: host memory held (RSS over idle)
    woken: bool = False                     # the last attach request woke it

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Pool:
    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self.lock = threading.RLock()
        self.authkey = secrets.token_hex(32)
        self.instances: dict[str, Instance] = {}
        self.spares: list[EngineProcess] = []
        self.stopping = False
        # Slots whose process has not yet run its kernel warm-up attach: not free, and
        # shown as WARMING once the process itself is up.
        self.warming: set[int] = set()
        self._warmup_running: set[tuple[int, int | None]] = set()  # (slot, pid)
        self._warmup_model_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
        os.makedirs(cfg.log_dir, exist_ok=True)
        self.workers: dict[int, WorkerHandle] = {}
        for dev in cfg.devices:
            self._new_worker(dev)
        if not cfg.park_budget_bytes:
            cfg.park_budget_bytes = parking.default_budget_bytes()

    def _new_worker(self, dev: str) -> WorkerHandle:
        slot = max(self.workers, default=-1) + 1
        w = WorkerHandle(
            slot, dev, os.path.join(self.cfg.run_dir, f"worker-{slot}.sock"), self.authkey,
            self._spawn_env(slot, dev), self._on_event, self._on_worker_exit,
            os.path.join(self.cfg.log_dir, f"worker-{slot}.log"), self.cfg.memory_slack_mib,
            self.cfg.context_memory_mib)
        w.extra = slot >= len(self.cfg.devices)
        self.workers[slot] = w
        return w

    # ---- start and stop -------------------------------------------------------------
    def _spawn_env(self, slot: int, device: str) -> dict[str, str]:
        env = compat.worker_cache_env()
        if device.startswith("cpu:"):
            env.update(compat.cpu_worker_spawn_env(int(device.split(":")[1])))
        else:
            # See all pool GPUs (P2P checks and custom all-reduce need the peers), make a
            # context on one.
            env["CUDA_VISIBLE_DEVICES"] = self.cfg.visible_devices or ""
        return env

    def _spawn(self, w: WorkerHandle) -> None:
        """Start (or restart) a worker; a new process runs the kernel warm-up before it
        is free, except the extra ones started beside parked workers (their device runs
        a model)."""
        if self.cfg.kernel_warmup != "off" and not w.extra:
            with self.lock:
                self.warming.add(w.slot)
        w.spawn()

    def worker_state(self, w: WorkerHandle) -> WorkerState:
        """The pool's view of a worker: WARMING while its kernel warm-up is due or runs."""
        if w.slot in self.warming and w.state not in (WorkerState.STARTING, WorkerState.FAILED,
                                                      WorkerState.STOPPED):
            return WorkerState.WARMING
        return w.state

    def alloc_states(self) -> dict[int, WorkerState]:
        """Worker states as the allocator sees them: a warming worker is still starting
        (not free, but worth waiting for)."""
        return {s: WorkerState.STARTING if s in self.warming else w.state
                for s, w in list(self.workers.items())}  # callers off the lock too (gateway)

    def start(self) -> None:
        for w in self.workers.values():
            self._spawn(w)
        self._replenish_spares()
        if self.cfg.state_path:
            self._writer = threading.Thread(target=self._persist_loop, daemon=True,
                                            name="PoolStateWriter")
            self._writer.start()

    # ---- state on disk (see state_file) ------------------------------------------------
    def state_record(self) -> state_file.StateRecord:
        procs: list[state_file.ProcRecord] = []

        def add(pid: int | None, role: str) -> None:
            st = state_file.proc_start_time(pid) if pid else None
            if st is not None:
                procs.append(state_file.ProcRecord(pid=pid, start_time=st, role=role))

        with self.lock:
            for w in self.workers.values():
                add(w.pid, f"worker-{w.slot}")
            for e in self.spares:
                add(e.pid, "spare")
            insts = []
            for i in self.instances.values():
                if i.engine is not None:
                    add(i.engine.pid, f"engine-{i.id}")
                insts.append(state_file.InstanceRecord(
                    id=i.id, name=i.name, model=i.model, slots=list(i.slots), port=i.port,
                    shm_names=sorted(i.shm_names), run_dir=i.run_dir,
                    shm_globs=[f"*{compat.dist_ident(i.id)}*"]
                    + [f"{ident}-*-cpushm*" for ident in sorted(i.dist_idents)]))
        return state_file.StateRecord(
            daemon_pid=os.getpid(), daemon_start_time=state_file.proc_start_time(os.getpid()) or 0,
            control_port=self.cfg.control_port, run_dir=self.cfg.run_dir, processes=procs,
            instances=insts)

    def _persist_loop(self) -> None:
        """Rewrite the state file when it changes (polled: every change of a PID or an
        instance is caught within 0.2 s, without a hook on each code path)."""
        last = b""
        while not self.stopping:
            try:
                rec = self.state_record()
                enc = msgspec.json.encode(rec)
                if enc != last:
                    state_file.save(self.cfg.state_path, rec)
                    last = enc
            except Exception:  # noqa: BLE001 - never let the writer die silently
                logger.exception("could not write the pool state file %s", self.cfg.state_path)
            time.sleep(0.2)

    # ---- engine hosts ------------------------------------------------------------------
    def _engine_base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.cfg.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cfg.visible_devices
        return env

    def _replenish_spares(self) -> None:
        with self.lock:
            self.spares = [e for e in self.spares if e.alive()]
            while not self.stopping and len(self.spares) < self.cfg.engine_spares:
                log = os.path.join(self.cfg.log_dir, f"engine-spare-{uuid.uuid4().hex[:8]}.log")
                self.spares.append(EngineProcess(self._engine_base_env(), log))

    def _take_spare(self, inst: Instance) -> EngineProcess | None:
        """A pre-warmed host, unless this attach sets environment that vLLM reads at
        import time (logging, plugins, devices): such an engine needs a fresh process."""
        if any(k.startswith(_IMPORT_TIME_ENV) and k not in _LAZY_ENV for k in inst.env):
            return None
        with self.lock:
            live = [e for e in self.spares if e.alive()]
            # Ready ones first; one still importing is still ahead of a fresh process.
            live.sort(key=lambda e: not e.ready())
            spare = live[0] if live else None
            self.spares = [e for e in live if e is not spare]
        return spare

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until every worker is idle: started, and its kernel warm-up done."""
        deadline = time.monotonic() + (timeout or self.cfg.worker_start_timeout)
        for w in list(self.workers.values()):
            w.wait_for(lambda w: w.state != WorkerState.STARTING,
                       max(0.0, deadline - time.monotonic()))
            while self.worker_state(w) in (WorkerState.STARTING, WorkerState.WARMING) \
                    and time.monotonic() < deadline and not self.stopping:
                time.sleep(0.05)
            if self.worker_state(w) != WorkerState.IDLE:
                raise RuntimeError(f"pool worker {w.slot} ({w.device}) did not start: "
                                   f"{w.error or self.worker_state(w).value}; see {w.log_path}")

    def shutdown(self) -> None:
        with self.lock:
            self.stopping = True
            instances = list(self.instances.values())
        for inst in instances:
            self._stop_engine(inst)
        with self.lock:
            spares, self.spares = self.spares, []
        for e in spares:
            e.stop(timeout=5)
        for w in self.workers.values():
            w.stop()
        for inst in instances:
            self._reclaim(inst)
        shutil.rmtree(self.cfg.run_dir, ignore_errors=True)
        if self._writer is not None:
            self._writer.join(timeout=5)
        if self.cfg.state_path:
            # Everything recorded is stopped and removed: nothing for a next daemon to do.
            try:
                os.unlink(self.cfg.state_path)
            except FileNotFoundError:
                pass

    # ---- events from workers ----------------------------------------------------------
    def _on_event(self, w: WorkerHandle, ev: messages.Event) -> None:
        inst = self.instances.get(ev.instance_id) if ev.instance_id else None
        if inst is not None and ev.shm_names:
            inst.shm_names.update(ev.shm_names)
        if inst is not None and ev.dist_ident:
            inst.dist_idents.add(ev.dist_ident)
        if ev.state == WorkerState.FAILED and inst is not None:
            self._fail_instance(inst, f"worker {w.slot} failed: {ev.error}")
        if ev.state == WorkerState.IDLE and not self.stopping:
            with self.lock:
                start = w.slot in self.warming and (w.slot, w.pid) not in self._warmup_running
                if start:
                    self._warmup_running.add((w.slot, w.pid))
            if start:
                threading.Thread(target=self._kernel_warmup, args=(w,), daemon=True,
                                 name=f"PoolKernelWarmup-{w.slot}").start()
        if ev.state == WorkerState.IDLE and w.extra and not self.stopping:
            # Warmed up after its device got an idle worker back: one of them can go.
            threading.Thread(target=self._trim_idle_workers, args=([w.device],),
                             daemon=True).start()

    def _on_worker_exit(self, w: WorkerHandle, rc: int) -> None:
        if self.stopping or w.retired:
            return
        with self.lock:
            inst = next((i for i in self.instances.values() if w.slot in i.slots
                         and i.state in LIVE_INSTANCE_STATES), None)
        if inst is not None:
            self._fail_instance(inst, f"worker {w.slot} (pid {w.pid}) died with exit code {rc}")
        if not w.ever_idle:
            # It died before it was ever ready: respawning would only loop.
            logger.error("pool worker %d failed to start (%s); not respawning it; see %s",
                         w.slot, w.error, w.log_path)
            w.set_state(WorkerState.FAILED, given_up=True)
            return
        logger.warning("pool worker %d (pid %s) exited with %s; respawning", w.slot, w.pid, rc)
        self._spawn(w)

    def _fail_instance(self, inst: Instance, reason: str) -> None:
        """A serving instance lost a process: stop what is left, reclaim, keep it listed."""
        with self.lock:
            if inst.state not in LIVE_INSTANCE_STATES:
                return
            # An attach or a wake in progress sees FAILED and cleans up itself.
            attaching = inst.state in (InstanceState.ATTACHING, InstanceState.WAKING)
            inst.state = InstanceState.FAILED
            inst.error = reason
        logger.error("instance %s (%s) failed: %s", inst.name, inst.id, reason)
        if attaching:
            return
        threading.Thread(target=self._cleanup_failed, args=(inst,), daemon=True).start()

    def _cleanup_failed(self, inst: Instance) -> None:
        self._stop_engine(inst)
        self._reclaim(inst)
        self._trim_idle_workers(inst.devices)

    # ---- attach --------------------------------------------------------------------------
    def attach(self, model: str, tp: int = 1, pp: int = 1, name: str | None = None,
               port: int | None = None, devices: list[str] | None = None,
               args: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 900.0) -> Instance:
        t0 = time.perf_counter()
        args = list(args or [])
        env = dict(env or {})
        _check_args(args, env)
        settings = parking.settings_key(model, tp, pp, args, env, devices)
        with self.lock:
            parked = next((i for i in self.instances.values()
                           if i.settings == settings and i.state in
                           (InstanceState.PARKED, InstanceState.WAKING)
                           and name in (None, i.name) and port in (None, i.port)), None)
        if parked is not None:
            # Re-attach of a parked model with the same settings: wake it, don't build it.
            return self.wake(parked, timeout)
        n = tp * pp
        iid = uuid.uuid4().hex[:12]
        self._wait_for_starting_workers(n, devices, timeout)
        with self.lock:
            if self.stopping:
                raise AttachError("the pool is shutting down", 503)
            name = name or iid
            if any(i.name == name for i in self.instances.values()):
                raise AttachError(f"an instance named {name!r} already exists", 409)
            if port is not None and (any(i.port == port for i in self.instances.values())
                                     or not _port_free(self.cfg.engine_host, port)):
                raise AttachError(f"port {port} is in use", 409)
            states = self.alloc_states()
            devs = {s: w.device for s, w in self.workers.items()}
            try:
                slots = allocator.reserve(states, devs, n, devices)
            except allocator.NoCapacity as e:
                raise AttachError(str(e), 409) from None
            inst = self._lease(iid, name, model, tp, pp, port, args, env, slots, settings)
        inst.phases["reserve"] = time.perf_counter() - t0
        logger.info("attaching %s as %s (TP=%d PP=%d) on workers %s, port %d",
                    model, name, tp, pp, slots, inst.port)
        try:
            self._launch_and_wait(inst, timeout)
        except AttachError as e:
            self._abort_attach(inst, str(e))
            raise
        except BaseException as e:
            self._abort_attach(inst, f"{type(e).__name__}: {e}")
            raise
        finally:
            # After, not during, the attach: a warming spare would compete for the CPU.
            threading.Thread(target=self._replenish_spares, daemon=True).start()
        if self.cfg.parking:
            # A park must leave its devices an idle worker at once, not one still importing:
            # start it now, beside the serving one.
            with self.lock:
                fresh = self._workers_to_add(inst.devices)
            for w in fresh:
                w.spawn()
        return inst

    def _lease(self, iid: str, name: str, model: str, tp: int, pp: int, port: int | None,
               args: list[str], env: dict[str, str], slots: list[int], settings: str,
               warmup: bool = False) -> Instance:
        """Register the instance and lease it its workers (under the lock)."""
        port = port or _free_port(self.cfg.engine_host, {i.port for i in self.instances.values()})
        inst = Instance(id=iid, name=name, model=model, tp=tp, pp=pp, port=port,
                        host=self.cfg.engine_host, args=args, env=env, slots=slots,
                        token=secrets.token_hex(16),
                        run_dir=os.path.join(self.cfg.run_dir, f"inst-{iid}"),
                        log_path=os.path.join(self.cfg.log_dir, f"engine-{iid}.log"),
                        settings=settings, devices=[self.workers[s].device for s in slots])
        for s in slots:
            self.workers[s].set_state(WorkerState.RESERVED, instance_id=iid)
            self.workers[s].send(messages.Lease(instance_id=iid, token=inst.token,
                                                warmup=warmup))
        self.instances[iid] = inst
        return inst

    def _kernel_warmup(self, w: WorkerHandle) -> None:
        """The kernel warm-up of a new worker process, retried for this worker alone until
        it is done (kernel_warmup.run: room on a busy device, backoff, status on `w`)."""
        pid = w.pid

        def release() -> None:  # free while a retry is pending
            with self.lock:
                if w.pid == pid:
                    self.warming.discard(w.slot)

        try:
            kernel_warmup.run(w, lambda memory: self._kernel_warmup_once(w, pid, memory),
                              release, lambda: self.stopping)
        finally:
            release()
            with self.lock:
                self._warmup_running.discard((w.slot, pid))

    def _kernel_warmup_once(self, w: WorkerHandle, pid: int | None, memory: list[str]) -> bool:
        """Attach the built-in warm-up model to this worker alone, then detach it; the
        worker measures its idle footprint again afterwards (kernel_warmup.py says why).
        False when the worker is not idle; raises when the warm-up failed."""
        t0 = time.perf_counter()
        mode = self.cfg.kernel_warmup
        with self._warmup_model_lock:  # one build, however many workers start at once
            model = kernel_warmup.ensure_model()
        on_gpu = w.device.startswith("cuda")
        iid = uuid.uuid4().hex[:12]
        with self.lock:
            if self.stopping or w.pid != pid or w.state != WorkerState.IDLE \
                    or w.instance_id is not None:
                return False
            self.warming.add(w.slot)  # a retry: attaches wait for it rather than get 409
            inst = self._lease(iid, f"{kernel_warmup.NAME_PREFIX}{w.slot}", model, 1, 1,
                               None, kernel_warmup.engine_args(mode, on_gpu, memory), {},
                               [w.slot], "", warmup=True)
        logger.info("worker %d: kernel warm-up attach (%s) of the built-in model%s", w.slot,
                    mode, f" ({' '.join(memory)})" if memory else "")
        try:
            self._launch_and_wait(inst, self.cfg.worker_start_timeout)
        except BaseException as e:
            self._abort_attach(inst, f"kernel warm-up failed: {e}")
            raise
        finally:
            threading.Thread(target=self._replenish_spares, daemon=True).start()
        self.detach(inst.id, park=False)
        w.kernel_warmup_s = time.perf_counter() - t0
        logger.info("worker %d: kernel warm-up done in %.1fs (attach %.1fs)", w.slot,
                    w.kernel_warmup_s, inst.phases.get("total", 0.0))
        return True

    def _wait_for_starting_workers(self, n: int, devices: list[str] | None,
                                   timeout: float) -> None:
        """An attach that only lacks workers still starting waits for them rather than
        getting 409; anything else is decided (and refused) by the allocator right after."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            with self.lock:
                states = self.alloc_states()
                devs = {s: w.device for s, w in self.workers.items()}
                try:
                    allocator.reserve(states, devs, n, devices)
                    return
                except (allocator.NoCapacity, ValueError):
                    if not allocator.fits_once_started(states, devs, n, devices):
                        return
            time.sleep(0.1)

    def _launch_and_wait(self, inst: Instance, timeout: float) -> None:
        os.makedirs(inst.run_dir, mode=0o700, exist_ok=True)
        workers = [self.workers[s] for s in inst.slots]
        lease = messages.LeaseInfo(
            instance_id=inst.id, token=inst.token, authkey=self.authkey,
            workers=[messages.WorkerAddress(w.slot, w.device, w.socket_path) for w in workers])
        env = self._engine_base_env()
        # EngineCore forks from the warm host (which has no CUDA context) unless this
        # attach asks otherwise. Not the daemon's own value: the `vllm` CLI sets `spawn`
        # in its process (cli_env_setup), and a spawned EngineCore imports vLLM again
        # (16 s on the H100).
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
        env.update(compat.engine_env_defaults())
        if self.cfg.parking:
            env.update(parking.engine_env())
        env.update(inst.env)
        env[messages.LEASE_ENV] = lease.to_json()
        env[messages.RUN_DIR_ENV] = inst.run_dir
        env["VLLM_RPC_BASE_PATH"] = inst.run_dir   # zmq ipc sockets die with the instance
        device_ids = None
        if self.cfg.visible_devices is not None:
            device_ids = [int(w.device.split(":")[1]) for w in workers]
        extra = parking.engine_args(inst.args, self._on_gpu(inst)) if self.cfg.parking \
            else inst.args
        argv = engine_argv(inst.model, inst.host, inst.port, inst.tp, inst.pp, extra,
                           device_ids)
        t_launch = time.perf_counter()
        spare = self._take_spare(inst)
        inst.engine_host = "spare" if spare is not None else "fresh"
        inst.engine = spare or EngineProcess(self._engine_base_env(), inst.log_path)
        inst.engine.start(argv, env, inst.log_path)
        deadline = time.monotonic() + timeout
        t_reached = t_served = None
        while True:
            if inst.state == InstanceState.FAILED:
                raise AttachError(f"attach failed: {inst.error}", 500)
            if not inst.engine.alive():
                raise AttachError("engine exited during start-up: "
                                  + failure_reason(inst.engine.log_tail()), 400)
            if t_reached is None and any(w.state in (WorkerState.ATTACHING, WorkerState.SERVING)
                                         for w in workers):
                t_reached = time.perf_counter()
            if t_served is None and all(w.state == WorkerState.SERVING for w in workers):
                t_served = time.perf_counter()
            if t_served is not None and health_ok(inst.url):
                break
            if time.monotonic() > deadline:
                raise AttachError(f"engine not ready after {timeout:.0f}s; see {inst.log_path}",
                                  504)
            time.sleep(0.02)
        now = time.perf_counter()
        rank0 = workers[0].phases
        inst.phases.update({k: 0.0 for k in ATTACH_PHASES if k not in inst.phases})
        inst.phases.update({k: round(v, 4) for k, v in rank0.items()})
        inst.phases["engine_start"] = (t_reached or t_served) - t_launch
        inst.phases["ready"] = now - t_served
        inst.phases["total"] = now - t_launch + inst.phases["reserve"]
        with self.lock:
            if inst.state != InstanceState.ATTACHING:
                raise AttachError(f"attach failed: {inst.error}", 500)
            inst.state = InstanceState.SERVING
            inst.ready_at = time.time()
        threading.Thread(target=self._watch_engine, args=(inst,), daemon=True,
                         name=f"PoolEngineWatch-{inst.id}").start()
        logger.info("instance %s serving at %s after %.2fs", inst.name, inst.url,
                    inst.phases["total"])

    def _abort_attach(self, inst: Instance, reason: str) -> None:
        """Undo a failed attach completely: the pool is left as it was."""
        logger.error("attach of %s failed: %s", inst.model, reason)
        with self.lock:
            inst.state = InstanceState.FAILED
            inst.error = reason
        self._stop_engine(inst)
        self._reclaim(inst)
        with self.lock:
            self.instances.pop(inst.id, None)

    def _watch_engine(self, inst: Instance) -> None:
        rc = inst.engine.proc.wait()
        if inst.state in LIVE_INSTANCE_STATES and inst.state != InstanceState.ATTACHING \
                and not self.stopping:
            self._fail_instance(inst, f"engine exited with code {rc}: "
                                      + failure_reason(inst.engine.log_tail()))

    # ---- detach --------------------------------------------------------------------------
    def detach(self, ref: str, park: bool | None = None) -> Instance:
        """Stop the instance and return its workers; or park it (`park`, or by the pool's
        default for a serving instance when `park` is None)."""
        with self.lock:
            inst = self.find(ref)
            if inst is None:
                raise KeyError(ref)
            if park is None:
                park = self.cfg.parking and self.cfg.park_on_detach \
                    and inst.state == InstanceState.SERVING
        if park:
            return self.park(ref)
        with self.lock:
            if inst.state in (InstanceState.DETACHING, InstanceState.ATTACHING,
                              InstanceState.PARKING, InstanceState.WAKING):
                raise AttachError(f"instance {inst.name} is {inst.state.value}", 409)
            was_failed = inst.state == InstanceState.FAILED
            inst.state = InstanceState.DETACHING
        t0 = time.perf_counter()
        self._stop_engine(inst)
        self._reclaim(inst)
        with self.lock:
            self.instances.pop(inst.id, None)
            inst.state = InstanceState.FAILED if was_failed else InstanceState.DETACHED
        self._trim_idle_workers(inst.devices)
        inst.phases["detach"] = time.perf_counter() - t0
        logger.info("instance %s detached in %.2fs", inst.name, inst.phases["detach"])
        return inst

    def _stop_engine(self, inst: Instance) -> None:
        if inst.engine is not None:
            inst.engine.stop()

    def _reclaim(self, inst: Instance, timeout: float = 60.0) -> None:
        """Return the instance's workers to IDLE (or respawn them) and remove its
        shared memory and sockets. Called after the engine's process group is gone."""
        for s in inst.slots:
            w = self.workers[s]
            if w.instance_id != inst.id:
                continue  # already back, or leased to another instance since
            if w.state == WorkerState.RESERVED:
                w.send(messages.Release(instance_id=inst.id))
                w.set_state(WorkerState.IDLE, instance_id=None)
            elif w.state in (WorkerState.ATTACHING, WorkerState.SERVING, WorkerState.DETACHING,
                             WorkerState.PARKED):
                # The engine is gone, so the worker saw EOF; Abort is the backstop.
                w.send(messages.Abort(instance_id=inst.id))
        for s in inst.slots:
            w = self.workers[s]
            ok = w.wait_for(lambda w: w.instance_id != inst.id or w.state in
                            (WorkerState.IDLE, WorkerState.FAILED, WorkerState.STARTING,
                             WorkerState.STOPPED), timeout)
            if not ok and not self.stopping:
                logger.error("worker %d did not return from %s; killing it", s, inst.id)
                w.kill()
            if not self.stopping:
                # A worker that failed its clean check is being respawned: the workers
                # go back to the pool only when they can take the next attach.
                w.wait_for(lambda w: w.state in (WorkerState.IDLE, WorkerState.STOPPED)
                           or w.given_up or w.instance_id not in (None, inst.id),
                           self.cfg.worker_start_timeout)
        names = set(inst.shm_names)
        # vLLM's CPU TP communicator names its segments `<VLLM_DIST_IDENT>-...`: the
        # rendezvous file's name on 0.32 (known here), the tcp port before (reported by
        # the workers once initialised).
        names.update(os.path.basename(p)
                     for p in glob.glob(f"/dev/shm/*{compat.dist_ident(inst.id)}*"))
        for ident in inst.dist_idents:
            names.update(compat.cpu_tp_shm_names(ident))
        for name in names:
            _unlink_shm(name)
        shutil.rmtree(inst.run_dir, ignore_errors=True)

    # ---- parking (see parking.py) ----------------------------------------------------------
    def _on_gpu(self, inst: Instance) -> bool:
        return any(self.workers[s].device.startswith("cuda") for s in inst.slots)

    def park(self, ref: str) -> Instance:
        t0 = time.perf_counter()
        with self.lock:
            inst = self.find(ref)
            if inst is None:
                raise KeyError(ref)
            if not self.cfg.parking:
                raise AttachError("parking is off: start the pool with --enable-parking", 409)
            if inst.state != InstanceState.SERVING:
                raise AttachError(f"instance {inst.name} is {inst.state.value}; only a serving "
                                  "instance can be parked", 409)
            inst.state = InstanceState.PARKING
        try:
            if self._on_gpu(inst):
                parking.engine_sleep(inst.url)
        except parking.ParkError as e:
            with self.lock:
                if inst.state == InstanceState.PARKING:
                    inst.state = InstanceState.SERVING
            raise AttachError(f"park of {inst.name} failed, it keeps serving: {e}", 500) from None
        host = sum(max(0, parking.process_rss(self.workers[s].pid) - self.workers[s].idle_rss)
                   for s in inst.slots)
        with self.lock:
            if inst.state != InstanceState.PARKING:
                raise AttachError(f"park of {inst.name} failed: {inst.error}", 500)
            inst.state = InstanceState.PARKED
            inst.parked_at = time.time()
            inst.host_bytes = host
            for s in inst.slots:
                self.workers[s].set_state(WorkerState.PARKED)
            fresh = self._workers_to_add(inst.devices)
        for w in fresh:
            w.spawn()
        inst.phases["park"] = time.perf_counter() - t0
        logger.info("instance %s parked in %.2fs (%.0f MiB host memory); %d workers started "
                    "beside it", inst.name, inst.phases["park"], host / 2**20, len(fresh))
        self._enforce_park_budget()
        return inst

    def _workers_to_add(self, devices: list[str]) -> list[WorkerHandle]:
        """New handles (not yet spawned) so each device keeps one idle or starting worker."""
        out = []
        for d in dict.fromkeys(devices):
            if not any(w.device == d and w.state in (WorkerState.IDLE, WorkerState.STARTING)
                       for w in self.workers.values()):
                out.append(self._new_worker(d))
        return out

    def _trim_idle_workers(self, devices: list[str]) -> None:
        """Keep one idle worker per device: the ones started beside parked workers go once
        their device has an idle worker again."""
        stop = []
        with self.lock:
            for d in dict.fromkeys(devices):
                idle = sorted(s for s, w in self.workers.items()
                              if w.device == d and w.state == WorkerState.IDLE)
                for s in idle[1:]:
                    stop.append(self.workers.pop(s))
        for w in stop:
            logger.info("stopping extra worker %d on %s", w.slot, w.device)
            w.retired = True
            w.stop()

    def _enforce_park_budget(self) -> None:
        with self.lock:
            parked = [parking.Parked(i.id, i.host_bytes, i.last_used)
                      for i in self.instances.values() if i.state == InstanceState.PARKED]
        for iid in parking.over_budget(parked, self.cfg.park_budget_bytes):
            logger.info("park budget of %.1f GiB exceeded: detaching parked instance %s",
                        self.cfg.park_budget_bytes / 2**30, iid)
            try:
                self.detach(iid, park=False)
            except (KeyError, AttachError) as e:
                logger.warning("could not detach parked instance %s: %s", iid, e)

    def wake(self, inst: Instance, timeout: float = 900.0) -> Instance:
        """Wake a parked instance for a re-attach; make room on its devices first."""
        t0 = time.perf_counter()
        with self.lock:
            if inst.state == InstanceState.WAKING:
                waiting = True
            elif inst.state == InstanceState.PARKED:
                waiting = False
                inst.state = InstanceState.WAKING
            else:
                raise AttachError(f"instance {inst.name} is {inst.state.value}", 409)
            occupants = [i for i in self.instances.values() if i is not inst
                         and i.state == InstanceState.SERVING
                         and set(i.devices) & set(inst.devices)]
        if waiting:  # another request is waking it: answer with its outcome
            deadline = time.monotonic() + timeout
            while inst.state == InstanceState.WAKING and time.monotonic() < deadline:
                time.sleep(0.05)
            if inst.state != InstanceState.SERVING:
                raise AttachError(f"wake of {inst.name} failed: {inst.error}", 500)
            return inst
        for occ in occupants:
            how = self.cfg.wake_evicts
            logger.info("waking %s: %s %s, which holds %s", inst.name,
                        "parking" if how == "park" else "detaching", occ.name, occ.devices)
            try:
                self.detach(occ.id, park=how == "park")
            except (KeyError, AttachError) as e:
                logger.warning("could not %s %s (%s); detaching it", how, occ.name, e)
                try:
                    self.detach(occ.id, park=False)
                except (KeyError, AttachError):
                    pass
        t_evicted = time.perf_counter()
        try:
            if self._on_gpu(inst):
                parking.engine_wake(inst.url, timeout)
            if not health_ok(inst.url, timeout=10):
                raise parking.ParkError("the engine does not answer /health")
        except parking.ParkError as e:
            with self.lock:
                inst.state = InstanceState.SERVING  # so that detach takes it
            self.detach(inst.id, park=False)
            raise AttachError(f"wake of {inst.name} failed, detached it: {e}", 500) from None
        with self.lock:
            failed = inst.state != InstanceState.WAKING
            if not failed:
                inst.state = InstanceState.SERVING
        if failed:  # a process died while waking: clean up as a failed attach does
            reason = f"wake of {inst.name} failed: {inst.error}"
            self._abort_attach(inst, reason)
            self._trim_idle_workers(inst.devices)
            raise AttachError(reason, 500)
        with self.lock:
            for s in inst.slots:
                self.workers[s].set_state(WorkerState.SERVING)
            inst.parked_at = None
            inst.host_bytes = 0
            inst.last_used = time.time()
            inst.woken = True
        now = time.perf_counter()
        inst.phases.update(evict=t_evicted - t0, wake=now - t_evicted, wake_total=now - t0)
        logger.info("instance %s woken in %.2fs (evicting took %.2fs)", inst.name, now - t0,
                    t_evicted - t0)
        return inst

    # ---- queries ---------------------------------------------------------------------------
    def find(self, ref: str) -> Instance | None:
        with self.lock:
            if ref in self.instances:
                return self.instances[ref]
            return next((i for i in self.instances.values() if i.name == ref), None)


def _check_args(args: list[str], env: dict[str, str]) -> None:
    """Arguments the pool owns: reject them with a clear reason instead of a broken engine."""
    owned = {"--distributed-executor-backend": "the pool always uses its own executor",
             "--port": "use the attach `port` field", "--host": "engines bind to the pool's host",
             "--model": "use the attach `model` field",
             "--tensor-parallel-size": "use `tp`", "-tp": "use `tp`",
             "--pipeline-parallel-size": "use `pp`", "-pp": "use `pp`",
             "--device-ids": "use `devices`", "--data-parallel-size": "not supported by the pool",
             "-dp": "not supported by the pool"}
    for a in args:
        key = a.split("=", 1)[0]
        if key in owned:
            raise AttachError(f"argument {key} is not allowed here: {owned[key]}", 422)
    for k in env:
        if k.startswith("VLLM_POOL_") or k in ("CUDA_VISIBLE_DEVICES", "VLLM_RPC_BASE_PATH") \
                or not k.replace("_", "").isalnum():
            raise AttachError(f"environment variable {k} cannot be set per attach", 422)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _free_port(host: str, taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            p = s.getsockname()[1]
        if p not in taken:
            return p


def _unlink_shm(name: str) -> None:
    """Remove a POSIX shared-memory segment by name (Linux keeps them in /dev/shm)."""
    try:
        os.unlink(os.path.join("/dev/shm", name.lstrip("/")))
    except (FileNotFoundError, OSError):
        pass
