"""The pool: workers, instances, attach and detach. The HTTP layer only calls into here.

Invariants kept under `self.lock`:
- a worker is leased to at most one instance (the allocator only hands out IDLE ones,
  and RESERVED is set in the same critical section);
- every exit path of an attach (success, bad input, engine crash, worker crash,
  timeout) leaves each of its workers IDLE again or respawning, the engine's process
  group gone, and its shared memory and run directory removed.

Every state change goes through states.transition. Beside this module: engines.py (which
process an engine runs in), park_wake.py (parking), kernel_warmup.py (a new worker's
warm-up attach), reclaim.py (shared memory and run directories), arg_policy.py,
placement.py (which GPUs a packed attach takes, and their locks).
Why about 530 lines: attach (lease, launch, wait) and the mapping of worker events to
states are one state machine over the same instance and worker records; split further
they would reach into each other's private state.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable

from vllm_pool import compat, messages
from vllm_pool.daemon import (allocator, kernel_warmup, packing, park_wake, parking,
                              placement, ports, reaper, reclaim, state_file)
from vllm_pool.daemon.arg_policy import check_args
from vllm_pool.daemon.background import start_thread
from vllm_pool.daemon.engines import EngineHosts, engine_order
from vllm_pool.daemon.errors import AttachError
from vllm_pool.daemon.instance import Instance, PoolConfig
from vllm_pool.daemon.workers import WorkerHandle
from vllm_pool.engine.launch import failure_reason, health_ok
from vllm_pool.states import (ATTACH_PHASES, LIVE_INSTANCE_STATES, InstanceState, WorkerState,
                              transition)

__all__ = ["AttachError", "Instance", "Pool", "PoolConfig"]

logger = logging.getLogger("vllm_pool.daemon")
_W, _I = WorkerState, InstanceState
# A worker back from an instance: ready for the next one, or out of the pool's hands.
_RETURNED = (_W.IDLE, _W.WARMING, _W.STOPPED, _W.BROKEN)


class Pool:
    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self.lock = threading.RLock()
        self.authkey = secrets.token_hex(32)
        self.instances: dict[str, Instance] = {}
        self.engines = EngineHosts(self._engine_base_env, cfg.log_dir, cfg.engine_fork)
        self.stopping = False
        self._writer: state_file.StateWriter | None = None
        os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
        os.makedirs(cfg.log_dir, exist_ok=True)
        self.workers: dict[int, WorkerHandle] = {}
        # One memory change (an attach's start) at a time per GPU, so the free figure
        # read for placing the next one is honest.
        self.device_locks = {d: threading.Lock() for d in cfg.devices}
        for dev in cfg.devices:
            self.new_worker(dev)
        if not cfg.park_budget_bytes:
            cfg.park_budget_bytes = parking.default_budget_bytes()

    def new_worker(self, dev: str, extra: bool = False) -> WorkerHandle:
        """A handle in the next slot (not yet spawned); `extra`: beside a parked worker."""
        slot = max(self.workers, default=-1) + 1
        env = compat.worker_cache_env()
        if dev.startswith("cpu:"):
            env.update(compat.cpu_worker_spawn_env(int(dev.split(":")[1])))
        else:
            # See all pool GPUs (P2P checks and custom all-reduce need the peers), make a
            # context on one.
            env["CUDA_VISIBLE_DEVICES"] = self.cfg.visible_devices or ""
        w = WorkerHandle(
            slot, dev, os.path.join(self.cfg.run_dir, f"worker-{slot}.sock"), self.authkey,
            env, self._on_event, self._on_worker_exit,
            os.path.join(self.cfg.log_dir, f"worker-{slot}.log"), self.cfg.memory_slack_mib,
            self.cfg.context_memory_mib, extra=extra)
        self.workers[slot] = w
        return w

    def alloc_states(self) -> dict[int, WorkerState]:
        # A copy first: the gateway calls this off the pool's lock.
        return {s: w.state for s, w in list(self.workers.items())}

    def start(self) -> None:
        self.engines.start()
        for w in self.workers.values():
            w.spawn()
        # The reaper removes what this daemon leaves if it dies, the state file is for the
        # next daemon's start: both get every snapshot until the clean stop is over.
        self._writer = state_file.StateWriter(
            self.cfg.state_path, lambda: state_file.snapshot(self),
            reaper.Reaper(os.path.join(self.cfg.log_dir, f"reaper-{self.cfg.control_port}.log"),
                          self.cfg.state_path))

    def _engine_base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.cfg.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cfg.visible_devices
        return env

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until every worker is idle (started, and its kernel warm-up done) and the engine
        fork server is warm: a pool that says ready attaches at full speed."""
        deadline = time.monotonic() + (timeout or self.cfg.worker_start_timeout)
        if not self.engines.wait_ready(max(0.0, deadline - time.monotonic())):
            raise RuntimeError("the engine fork server did not start; see "
                               f"{self.cfg.log_dir}/engine-forkserver-*.log")
        for w in list(self.workers.values()):
            w.wait_for(lambda w: w.state not in (_W.STARTING, _W.WARMING) or self.stopping,
                       max(0.0, deadline - time.monotonic()))
            if w.state != _W.IDLE:
                raise RuntimeError(f"pool worker {w.slot} ({w.device}) did not start: "
                                   f"{w.error or w.state.value}; see {w.log_path}")

    def shutdown(self) -> None:
        """Stop everything, in parallel where the steps are independent: a stop takes as
        long as its slowest engine or worker, not their sum."""
        with self.lock:
            self.stopping = True
            instances = list(self.instances.values())
        workers = list(self.workers.values())
        for w in workers:
            w.notify()  # waits on a worker re-check `stopping`
        _each(self._stop_engine, instances)
        self.engines.stop()
        _each(lambda w: w.stop(), workers)
        for inst in instances:
            self._reclaim(inst)
        shutil.rmtree(self.cfg.run_dir, ignore_errors=True)
        if self._writer is not None:
            self._writer.close()

    # ---- events from workers ----------------------------------------------------------
    def _on_event(self, w: WorkerHandle, ev: messages.Event) -> None:
        """The worker's own phase, mapped to its allocation state (the daemon's)."""
        inst = self.instances.get(ev.instance_id) if getattr(ev, "instance_id", None) else None
        if inst is not None:
            inst.shm_names.update(getattr(ev, "shm_names", ()))
            if getattr(ev, "dist_ident", None):
                inst.dist_idents.add(ev.dist_ident)
        if isinstance(ev, messages.Progress):
            # Rank 0's figures, as its Serving event's phases are the instance's.
            if inst is not None and inst.slots and inst.slots[0] == w.slot:
                inst.phase_done(ev.phase, ev.seconds)
            return  # the worker's own phase is unchanged
        if isinstance(ev, messages.Attaching) and inst is not None \
                and inst.launched_at is not None:
            # The engine reached its first worker: engine_start is over.
            inst.phase_done("engine_start", time.perf_counter() - inst.launched_at, once=True)
        w.phase = type(ev).__name__.lower()
        if isinstance(ev, messages.Idle):
            w.baseline_bytes, w.start_s = ev.baseline_bytes, ev.start_s
            w.idle_rss = parking.process_rss(w.pid)
            if w.state == _W.STARTING:
                due = self.cfg.kernel_warmup != "off" and not w.extra and not self.stopping
                transition(w, _W.WARMING if due else _W.IDLE, instance_id=None)
                if due:
                    start_thread(f"PoolKernelWarmup-{w.slot}", kernel_warmup.run, self, w)
            elif w.state in (_W.WARMING, _W.STOPPED):
                transition(w, w.state, instance_id=None)  # the warm-up's detach is done
            else:
                transition(w, _W.IDLE, instance_id=None)
            if w.extra and w.state == _W.IDLE and not self.stopping:
                # Idle (first start included: its device may have an idle worker again
                # since it was started): one of them can go.
                start_thread("PoolTrimWorkers", park_wake.trim_idle_workers, self,
                             [w.device])
        elif isinstance(ev, messages.Attaching):
            if w.state == _W.RESERVED:
                transition(w, _W.ATTACHING)
        elif isinstance(ev, messages.Serving):
            w.phases = dict(ev.phases)
            if w.state == _W.ATTACHING:
                transition(w, _W.SERVING)
        elif isinstance(ev, messages.Detaching):
            if w.state in (_W.ATTACHING, _W.SERVING, _W.PARKED):
                transition(w, _W.DETACHING, error=ev.error)
        elif isinstance(ev, messages.Failed):
            # Failed before it was ever ready: respawning would only loop.
            new = _W.BROKEN if w.state == _W.STARTING else _W.FAILED
            if w.state != _W.STOPPED:
                transition(w, new, error=ev.error)
            if inst is not None:
                self._fail_instance(inst, f"worker {w.slot} failed: {ev.error}")

    def _on_worker_exit(self, w: WorkerHandle, rc: int) -> None:
        if self.stopping or w.state == _W.STOPPED:
            return
        with self.lock:
            inst = next((i for i in self.instances.values() if w.slot in i.slots
                         and i.state in LIVE_INSTANCE_STATES), None)
        if inst is not None:
            self._fail_instance(inst, f"worker {w.slot} (pid {w.pid}) died with exit code {rc}")
        if w.state in (_W.STARTING, _W.BROKEN):
            transition(w, _W.BROKEN, error=w.error or f"worker process exited with {rc}")
            logger.error("pool worker %d failed to start (%s); not respawning it; see %s",
                         w.slot, w.error, w.log_path)
            return
        transition(w, _W.FAILED, error=w.error or f"worker process exited with {rc}")
        logger.warning("pool worker %d (pid %s) exited with %s; respawning", w.slot, w.pid, rc)
        w.spawn()

    def _fail_instance(self, inst: Instance, reason: str) -> None:
        """An instance lost a process: stop what is left, reclaim, keep it listed."""
        with self.lock:
            if inst.state not in LIVE_INSTANCE_STATES:
                return
            # An attach or a wake in progress sees FAILED and cleans up itself.
            attaching = inst.state in (_I.ATTACHING, _I.WAKING)
            transition(inst, _I.FAILED, error=reason)
        logger.error("instance %s (%s) failed: %s", inst.name, inst.id, reason)
        if not attaching:
            start_thread(f"PoolCleanup-{inst.id}", self._cleanup_failed, inst)

    def _cleanup_failed(self, inst: Instance) -> None:
        self._stop_engine(inst)
        self._reclaim(inst)
        park_wake.trim_idle_workers(self, inst.devices)

    # ---- attach --------------------------------------------------------------------------
    def attach(self, model: str, tp: int = 1, pp: int = 1, name: str | None = None,
               port: int | None = None, devices: list[str] | None = None,
               args: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 900.0,
               on_start: Callable[[Instance], None] | None = None) -> Instance:
        """Attach (or wake a parked instance with the same settings). `on_start` gets the
        instance once the request is accepted, before its engine starts (or the wake)."""
        t0 = time.perf_counter()
        args = list(args or [])
        env = dict(env or {})
        check_args(args, env)
        try:
            util = packing.utilization_of(args, compat.GPU_MEMORY_UTILIZATION_DEFAULT)
        except ValueError as e:
            raise AttachError(str(e), 422) from None
        settings = parking.settings_key(model, tp, pp, args, env, devices)
        with self.lock:
            parked = next((i for i in self.instances.values()
                           if i.settings == settings and i.state in (_I.PARKED, _I.WAKING)
                           and name in (None, i.name) and port in (None, i.port)), None)
        if parked is not None:
            # Re-attach of a parked model with the same settings: wake it, don't build it.
            if on_start is not None:
                on_start(parked)
            return self.wake(parked, timeout)
        n = tp * pp
        iid = uuid.uuid4().hex[:12]
        held = placement.place(self, util, n, devices)
        try:
            return self._attach_on(held, util, model, tp, pp, name, port, devices, args, env,
                                   timeout, on_start, settings, iid, t0)
        finally:
            for d in held:
                self.device_locks[d].release()

    def _attach_on(self, held: list[str], util: float, model: str, tp: int, pp: int,
                   name: str | None, port: int | None, devices: list[str] | None,
                   args: list[str], env: dict[str, str], timeout: float,
                   on_start: Callable[[Instance], None] | None, settings: str, iid: str,
                   t0: float) -> Instance:
        n, packed = tp * pp, bool(held)
        if packed:
            devices = held  # rank order
        self._wait_for_starting_workers(n, devices, timeout, packed)
        with self.lock:
            if self.stopping:
                raise AttachError("the pool is shutting down", 503)
            name = name or iid
            if any(i.name == name for i in self.instances.values()):
                raise AttachError(f"an instance named {name!r} already exists", 409)
            if port is not None and (any(i.port == port for i in self.instances.values())
                                     or not ports.port_free(self.cfg.engine_host, port)):
                raise AttachError(f"port {port} is in use", 409)
            try:
                slots = allocator.reserve(self.alloc_states(),
                                          {s: w.device for s, w in self.workers.items()},
                                          n, devices, packed)
            except allocator.NoCapacity as e:
                raise AttachError(str(e), 409) from None
            inst = self.lease(iid, name, model, tp, pp, port, args, env, slots, settings)
            if packed:
                inst.gpu_memory_utilization = util
        if on_start is not None:
            on_start(inst)
        inst.phases["reserve"] = time.perf_counter() - t0
        inst.phase_done("reserve", inst.phases["reserve"])
        logger.info("attaching %s as %s (TP=%d PP=%d) on workers %s, port %d",
                    model, name, tp, pp, slots, inst.port)
        self.launch(inst, timeout)
        if self.cfg.parking:
            # A park must leave its devices an idle worker at once, not one still importing:
            # start it now, beside the serving one.
            park_wake.add_workers_beside(self, inst.devices)
        return inst

    def lease(self, iid: str, name: str, model: str, tp: int, pp: int, port: int | None,
              args: list[str], env: dict[str, str], slots: list[int], settings: str,
              kernel_warmup: bool = False) -> Instance:
        """Register the instance and lease it its workers (under the lock)."""
        port = port or ports.free_port(self.cfg.engine_host, {i.port for i in self.instances.values()})
        inst = Instance(id=iid, name=name, model=model, tp=tp, pp=pp, port=port,
                        host=self.cfg.engine_host, args=args, env=env, slots=slots,
                        token=secrets.token_hex(16),
                        run_dir=os.path.join(self.cfg.run_dir, f"inst-{iid}"),
                        log_path=os.path.join(self.cfg.log_dir, f"engine-{iid}.log"),
                        settings=settings, devices=[self.workers[s].device for s in slots],
                        kernel_warmup=kernel_warmup)
        for s in slots:
            w = self.workers[s]
            # A worker's warm-up attach leaves it WARMING: not free until it is done.
            transition(w, _W.WARMING if kernel_warmup else _W.RESERVED,
                       [_W.WARMING] if kernel_warmup else [_W.IDLE], instance_id=iid)
            w.send(messages.Lease(instance_id=iid, token=inst.token, kernel_warmup=kernel_warmup))
        self.instances[iid] = inst
        return inst

    def _wait_for_starting_workers(self, n: int, devices: list[str] | None,
                                   timeout: float, packed: bool = False) -> None:
        """An attach that only lacks workers still starting waits for them rather than
        getting 409; anything else is decided (and refused) by the allocator right after."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            with self.lock:
                states = self.alloc_states()
                devs = {s: w.device for s, w in self.workers.items()}
                try:
                    allocator.reserve(states, devs, n, devices, packed)
                    return
                except (allocator.NoCapacity, ValueError):
                    if not allocator.fits_once_started(states, devs, n, devices, packed):
                        return
                starting = [w for w in self.workers.values()
                            if w.state in (_W.STARTING, _W.WARMING)]
            # Until one of them changes state (or a worker is added: re-checked each 0.5 s).
            starting[0].wait_for(lambda w: w.state not in (_W.STARTING, _W.WARMING),
                                 min(0.5, max(0.0, deadline - time.monotonic())))

    def launch(self, inst: Instance, timeout: float) -> None:
        """Start the instance's engine and wait until it serves; on any failure undo the
        attach completely (the pool is left as it was) and raise AttachError."""
        try:
            self._launch_and_wait(inst, timeout)
        except AttachError as e:
            self.abort_attach(inst, str(e))
            raise
        except BaseException as e:
            self.abort_attach(inst, f"{type(e).__name__}: {e}")
            raise

    def _launch_and_wait(self, inst: Instance, timeout: float) -> None:
        os.makedirs(inst.run_dir, mode=0o700, exist_ok=True)
        workers = [self.workers[s] for s in inst.slots]
        argv, env = engine_order(self, inst, workers)
        t_launch = inst.launched_at = time.perf_counter()
        try:
            inst.engine = self.engines.host_for(inst.env, inst.log_path, timeout)
        except OSError as e:
            raise AttachError(f"no engine host: {e}", 503) from None
        inst.engine_host = inst.engine.kind
        inst.engine.start(argv, env)
        deadline = time.monotonic() + timeout
        t_reached = t_served = None
        # The workers' events signal on their handles; the engine's /health is polled.
        while True:
            if inst.state == _I.FAILED:
                raise AttachError(f"attach failed: {inst.error}", 500)
            if not inst.engine.alive():
                raise AttachError("engine exited during start-up: "
                                  + failure_reason(inst.engine.log_tail()), 400)
            phases = [w.phase for w in workers]
            if t_reached is None and any(p in ("attaching", "serving") for p in phases):
                t_reached = time.perf_counter()
            if t_served is None and all(p == "serving" for p in phases):
                t_served = time.perf_counter()
            if t_served is not None and health_ok(inst.url):
                break
            if time.monotonic() > deadline:
                raise AttachError(f"engine not ready after {timeout:.0f}s; see {inst.log_path}",
                                  504)
            if t_served is None:
                workers[0].wait_for(lambda w: w.phase == "serving" or inst.state == _I.FAILED,
                                    0.02)
            else:
                time.sleep(0.02)
        now = time.perf_counter()
        inst.phases.update({k: 0.0 for k in ATTACH_PHASES if k not in inst.phases})
        inst.phases.update({k: round(v, 4) for k, v in workers[0].phases.items()})
        # The figure shown while attaching (taken when the first worker's event came).
        shown = inst.done_seconds("engine_start")
        inst.phases["engine_start"] = (t_reached or t_served) - t_launch if shown is None \
            else shown
        inst.phases["ready"] = now - t_served
        inst.phases["total"] = now - t_launch + inst.phases["reserve"]
        with self.lock:
            if inst.state != _I.ATTACHING:
                raise AttachError(f"attach failed: {inst.error}", 500)
            inst.phase_done("ready", inst.phases["ready"])
            transition(inst, _I.SERVING, ready_at=time.time(), phase=None)
        start_thread(f"PoolEngineWatch-{inst.id}", self._watch_engine, inst)
        logger.info("instance %s serving at %s after %.2fs", inst.name, inst.url,
                    inst.phases["total"])

    def abort_attach(self, inst: Instance, reason: str) -> None:
        """Undo a failed attach completely: the pool is left as it was."""
        logger.error("attach of %s failed: %s", inst.model, reason)
        with self.lock:
            transition(inst, _I.FAILED, error=inst.error or reason)
        self._stop_engine(inst)
        self._reclaim(inst)
        with self.lock:
            self.instances.pop(inst.id, None)

    def _watch_engine(self, inst: Instance) -> None:
        rc = inst.engine.wait()
        if inst.state in LIVE_INSTANCE_STATES and inst.state != _I.ATTACHING \
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
                    and inst.state == _I.SERVING
        if park:
            return park_wake.park(self, ref)
        with self.lock:
            if inst.state in (_I.DETACHING, _I.ATTACHING, _I.PARKING, _I.WAKING):
                raise AttachError(f"instance {inst.name} is {inst.state.value}", 409)
        return self.remove(inst)

    def remove(self, inst: Instance) -> Instance:
        """Detach, whatever state the instance is in (detach checks it first; a failed
        wake comes here directly)."""
        with self.lock:
            was_failed = inst.state == _I.FAILED
            transition(inst, _I.DETACHING)
        t0 = time.perf_counter()
        self._stop_engine(inst)
        t_engine = time.perf_counter() - t0
        self._reclaim(inst)
        with self.lock:
            self.instances.pop(inst.id, None)
            transition(inst, _I.FAILED if was_failed else _I.DETACHED)
        park_wake.trim_idle_workers(self, inst.devices)
        inst.phases["detach"] = time.perf_counter() - t0
        logger.info("instance %s detached in %.2fs (engine stopped in %.2fs)", inst.name,
                    inst.phases["detach"], t_engine)
        return inst

    def _stop_engine(self, inst: Instance) -> None:
        if inst.engine is not None:
            inst.engine.stop()

    def _reclaim(self, inst: Instance, timeout: float = 60.0) -> None:
        """Return the instance's workers to IDLE (or respawn them) and remove its
        shared memory and sockets. Called after the engine's process group is gone."""
        for s in inst.slots:
            w = self.workers.get(s)
            if w is None or w.instance_id != inst.id:
                continue  # already back, or leased to another instance since
            if w.phase == "idle":  # the engine never reached it: drop the lease
                w.send(messages.Release(instance_id=inst.id))
                transition(w, _W.IDLE if w.state == _W.RESERVED else w.state,
                           instance_id=None)
            else:
                # The engine is gone, so the worker saw EOF; Abort is the backstop.
                w.send(messages.Abort(instance_id=inst.id))
        for s in inst.slots:
            w = self.workers.get(s)
            if w is None:
                continue
            ok = w.wait_for(lambda w: w.instance_id != inst.id or w.state in
                            (_W.IDLE, _W.FAILED, _W.BROKEN, _W.STARTING, _W.STOPPED), timeout)
            if not ok and not self.stopping:
                logger.error("worker %d did not return from %s; killing it", s, inst.id)
                w.kill()
            if not self.stopping:
                # A worker that failed its clean check is being respawned: the workers
                # go back to the pool only when they can take the next attach.
                w.wait_for(lambda w: w.state in _RETURNED or self.stopping
                           or w.instance_id not in (None, inst.id),
                           self.cfg.worker_start_timeout)
        reclaim.remove(inst.shm_names, reclaim.shm_globs(inst.id, inst.dist_idents),
                       inst.run_dir)

    # ---- parking (park_wake.py) -----------------------------------------------------------
    def on_gpu(self, inst: Instance) -> bool:
        return any(self.workers[s].device.startswith("cuda") for s in inst.slots)

    def park(self, ref: str) -> Instance:
        return park_wake.park(self, ref)

    def wake(self, inst: Instance, timeout: float = 900.0, evict: bool = True) -> Instance:
        packed = inst.gpu_memory_utilization is not None
        return park_wake.wake(self, inst, timeout,
                              placement.WakeRoom(self, inst) if packed else None, evict)

    # ---- queries ---------------------------------------------------------------------------
    def find(self, ref: str) -> Instance | None:
        with self.lock:
            if ref in self.instances:
                return self.instances[ref]
            return next((i for i in self.instances.values() if i.name == ref), None)


def _each(fn: Callable, items: list) -> None:
    """fn(item) for every item, in threads, until all are done."""
    threads = [threading.Thread(target=fn, args=(x,), daemon=True) for x in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
