"""The daemon's state on disk, so that a daemon started after a crash finds what the dead
one left behind.

The running daemon rewrites the file atomically (temp file + os.replace) whenever its
processes or instances change: worker, engine and spare-host PIDs (with their start times,
so a recycled PID is never mistaken for ours), each instance's shared-memory segments and
run directory. On start, a daemon given the same file first reclaims it:

- the recorded daemon still runs (same PID and start time): refuse to start, two daemons
  must never own the same devices;
- otherwise every recorded process that still runs is killed with its process group, the
  recorded shared memory is unlinked, the run directory removed.

Nothing is adopted. Workers and engines end themselves when their daemon dies (EOF on the
pipes the daemon holds), so a survivor is a process that could not notice: hung in a device
call or stopped. Stopping it is the one safe choice; an instance cannot be re-attached to a
daemon that no longer holds its workers' command pipes and lease tokens.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import msgspec

from vllm_pool.daemon import reclaim as cleanup

logger = logging.getLogger("vllm_pool.daemon")


class ProcRecord(msgspec.Struct):
    pid: int
    start_time: int     # /proc/<pid>/stat field 22: tells a recycled PID apart
    role: str           # "worker-<slot>", "engine-<instance id>", "engine-forkserver"


class InstanceRecord(msgspec.Struct):
    id: str
    name: str
    model: str
    slots: list[int]
    port: int
    shm_names: list[str] = []
    shm_globs: list[str] = []       # patterns of segments named after the instance
    run_dir: str = ""


class StateRecord(msgspec.Struct):
    daemon_pid: int
    daemon_start_time: int
    control_port: int
    run_dir: str
    processes: list[ProcRecord] = []
    instances: list[InstanceRecord] = []


class DaemonAlive(RuntimeError):
    pass


def proc_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if it does not run."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def same_process(pid: int, start_time: int) -> bool:
    """`pid` is still that process, and runs (a zombie has ended: it holds nothing)."""
    if pid <= 0 or proc_start_time(pid) != start_time:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[:1] != ["Z"]


def save(path: str, rec: StateRecord) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(rec))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str) -> StateRecord | None:
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=StateRecord)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        logger.warning("ignoring unreadable pool state file %s: %s", path, e)
        return None


def reclaim(path: str, timeout: float = 10.0) -> list[str]:
    """Stop and remove what a dead daemon recorded in `path`; returns what was done.
    Raises DaemonAlive if the recorded daemon still runs."""
    rec = load(path)
    if rec is None:
        return []
    if rec.daemon_pid != os.getpid() and same_process(rec.daemon_pid, rec.daemon_start_time):
        raise DaemonAlive(f"another vllm-pool daemon (pid {rec.daemon_pid}, control port "
                          f"{rec.control_port}) owns the state file {path}; stop it first")
    done = reclaim_record(rec, timeout)
    os.unlink(path)
    return done


def reclaim_record(rec: StateRecord, timeout: float = 10.0, grace: float = 0.0) -> list[str]:
    """Stop the recorded processes that still run (after `grace` seconds in which they may
    end themselves, as they do on their dead daemon's EOF), then remove the recorded shared
    memory and run directories; returns what was done. Used by the next daemon's start
    (`reclaim`) and by the dead daemon's reaper (reaper.py)."""
    done: list[str] = []
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(
            same_process(p.pid, p.start_time) for p in rec.processes):
        time.sleep(0.05)
    survivors = [p for p in rec.processes if same_process(p.pid, p.start_time)]
    for p in survivors:
        for target, kill in ((p.pid, os.killpg), (p.pid, os.kill)):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        done.append(f"killed {p.role} (pid {p.pid})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            same_process(p.pid, p.start_time) for p in survivors):
        time.sleep(0.05)
    for inst in rec.instances:
        removed = cleanup.remove(inst.shm_names, inst.shm_globs, inst.run_dir)
        if removed:
            done.append(f"removed {removed} shared-memory segments of instance {inst.name}")
    if rec.run_dir and os.path.isdir(rec.run_dir):
        shutil.rmtree(rec.run_dir, ignore_errors=True)
        done.append(f"removed run directory {rec.run_dir}")
    return done


def default_path(control_port: int) -> str:
    base = os.path.join(os.path.expanduser("~"), ".cache", "vllm-pool")
    return os.path.join(base, f"pool-{control_port}.state.json")


def snapshot(pool) -> StateRecord:
    """What a daemon started after `pool`'s crashed must stop and remove (daemon/pool.Pool)."""
    procs: list[ProcRecord] = []

    def add(pid: int | None, role: str) -> None:
        st = proc_start_time(pid) if pid else None
        if st is not None:
            procs.append(ProcRecord(pid=pid, start_time=st, role=role))

    with pool.lock:
        for w in pool.workers.values():
            add(w.pid, f"worker-{w.slot}")
        for pid in pool.engines.pids():
            add(pid, "engine-forkserver")
        insts = []
        for i in pool.instances.values():
            if i.engine is not None:
                add(i.engine.pid, f"engine-{i.id}")
            insts.append(InstanceRecord(
                id=i.id, name=i.name, model=i.model, slots=list(i.slots), port=i.port,
                shm_names=sorted(i.shm_names), run_dir=i.run_dir,
                shm_globs=cleanup.shm_globs(i.id, i.dist_idents)))
    return StateRecord(
        daemon_pid=os.getpid(), daemon_start_time=proc_start_time(os.getpid()) or 0,
        control_port=pool.cfg.control_port, run_dir=pool.cfg.run_dir, processes=procs,
        instances=insts)


class StateWriter:
    """Keeps the snapshot where a dead daemon's successors find it: the state file (for the
    next daemon's start) and the reaper (reaper.py, which acts as soon as this daemon dies).
    Polled every 0.2 s, so every change of a PID or an instance is out within that, without
    a hook on each path; it runs until `close`, through the whole shutdown, since a daemon
    killed while it stops leaves what the snapshot then lists."""

    def __init__(self, path: str | None, snapshot, reaper=None):
        self.path = path
        self._snapshot = snapshot
        self._reaper = reaper
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="PoolStateWriter")
        self._thread.start()

    def _loop(self) -> None:
        last = b""
        while not self._closed.is_set():
            try:
                rec = self._snapshot()
                enc = msgspec.json.encode(rec)
                if enc != last:
                    if self._reaper is not None:
                        self._reaper.record(enc)
                    if self.path:
                        save(self.path, rec)
                    last = enc
            except Exception:  # noqa: BLE001 - never let the writer die silently
                logger.exception("could not write the pool state file %s", self.path)
            self._closed.wait(0.2)

    def close(self) -> None:
        """After shutdown: everything recorded is stopped and removed, nothing is left for
        a next daemon or the reaper to do."""
        self._closed.set()
        self._thread.join(timeout=5)
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._reaper is not None:
            self._reaper.done()
