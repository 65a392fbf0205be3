"""Lifecycle states of pool workers, attached instances and engine hosts, with the legal
transitions of each in one table, and the one door every state change goes through.

Explicit states rather than flags: every transition is a named step, checked against its
table, logged and signalled to whoever waits on the object; `ls` shows them, and the
allocator only hands out workers that are IDLE. An illegal transition is a bug: it raises
where $VLLM_POOL_STRICT_STATES is set (the test suite sets it), and is logged as an error
and applied otherwise, so a pool in production keeps running. `force` is the one escape
hatch, for the exceptional paths that name their reason.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

logger = logging.getLogger("vllm_pool.states")


class WorkerState(str, enum.Enum):
    STARTING = "starting"    # process spawned, importing and warming up
    WARMING = "warming"      # up, running the pool's kernel warm-up attach; not free yet
    IDLE = "idle"            # warm, holds no model, free for the allocator
    RESERVED = "reserved"    # leased to an instance whose engine is starting
    ATTACHING = "attaching"  # building vLLM's worker and model runner
    SERVING = "serving"      # running vLLM's busy loop for an engine
    DETACHING = "detaching"  # tearing the model down, checking it is clean
    PARKED = "parked"        # holds a parked (sleeping) model; its device is free for others
    FAILED = "failed"        # dead or unclean: being killed and respawned
    BROKEN = "broken"        # died before it was ever ready: not respawned (see its log)
    STOPPED = "stopped"      # stopped for good (pool shutting down, or an extra retired)


class InstanceState(str, enum.Enum):
    ATTACHING = "attaching"
    SERVING = "serving"
    PARKING = "parking"      # being put to sleep (GPU: vLLM sleep level 1)
    PARKED = "parked"        # asleep: processes kept, weights in host memory, no KV cache
    WAKING = "waking"        # being woken for a re-attach
    DETACHING = "detaching"
    FAILED = "failed"
    DETACHED = "detached"


class HostState(str, enum.Enum):
    """An engine host process (engine/launch.py), or the engine fork server."""
    STARTING = "starting"    # importing vLLM (a fresh interpreter, or the fork server)
    READY = "ready"          # warm, waiting for its order (or, the server: for fork requests)
    RUNNING = "running"      # running vLLM's API server and EngineCore for an attach
    EXITED = "exited"


_W, _I, _H = WorkerState, InstanceState, HostState
_W_ANY = {_W.FAILED, _W.STOPPED}
# One table per entity (the enums are str-valued: "starting" of one equals another's).
TRANSITIONS: dict[type, dict[enum.Enum, frozenset]] = {
    entity: {k: frozenset(v) for k, v in table.items()} for entity, table in {
        WorkerState: {
            _W.STARTING: {_W.IDLE, _W.WARMING, _W.BROKEN} | _W_ANY,
            _W.WARMING: {_W.IDLE} | _W_ANY,
            _W.IDLE: {_W.RESERVED, _W.WARMING} | _W_ANY,
            _W.RESERVED: {_W.ATTACHING, _W.IDLE} | _W_ANY,
            _W.ATTACHING: {_W.SERVING, _W.DETACHING, _W.IDLE} | _W_ANY,
            _W.SERVING: {_W.DETACHING, _W.PARKED, _W.IDLE} | _W_ANY,
            _W.PARKED: {_W.SERVING, _W.DETACHING, _W.IDLE} | _W_ANY,
            _W.DETACHING: {_W.IDLE} | _W_ANY,
            _W.FAILED: {_W.STARTING, _W.BROKEN, _W.STOPPED},
            _W.BROKEN: {_W.STOPPED},
            _W.STOPPED: set(),
        },
        InstanceState: {
            _I.ATTACHING: {_I.SERVING, _I.FAILED},
            _I.SERVING: {_I.PARKING, _I.DETACHING, _I.FAILED},
            _I.PARKING: {_I.PARKED, _I.SERVING, _I.FAILED},
            _I.PARKED: {_I.WAKING, _I.DETACHING, _I.FAILED},
            # Back to PARKED: a wake that may not evict found no room (409).
            _I.WAKING: {_I.SERVING, _I.PARKED, _I.DETACHING, _I.FAILED},
            _I.DETACHING: {_I.DETACHED, _I.FAILED},
            _I.FAILED: {_I.DETACHING},
            _I.DETACHED: set(),
        },
        HostState: {
            # A fresh host may get its order while it imports: it runs it when done.
            _H.STARTING: {_H.READY, _H.RUNNING, _H.EXITED},
            _H.READY: {_H.RUNNING, _H.EXITED},
            _H.RUNNING: {_H.EXITED},
            _H.EXITED: set(),
        },
    }.items()}


class IllegalTransition(RuntimeError):
    pass


def _strict() -> bool:
    return bool(os.environ.get("VLLM_POOL_STRICT_STATES"))


class Stateful:
    """A thing with a state: one Condition signals every change to those waiting on it."""

    state: enum.Enum

    def _init_state(self, state: enum.Enum) -> None:
        self.state = state
        self.changed = threading.Condition(threading.RLock())

    def label(self) -> str:
        return f"{type(self).__name__} {getattr(self, 'name', None) or getattr(self, 'slot', '')}"

    def wait_for(self, pred: Callable[[Stateful], bool], timeout: float | None) -> bool:
        """Until `pred(self)` holds (re-checked at every change); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while not pred(self):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


def transition(obj: Stateful, new: enum.Enum, expected: Iterable[enum.Enum] | None = None,
               **fields) -> enum.Enum:
    """Move `obj` to `new` (setting `fields` with it, atomically for waiters), if it is in
    one of `expected` (when given) and the table allows it. Returns the old state."""
    with obj.changed:
        old = obj.state
        wrong = expected is not None and old not in set(expected)
        if wrong or (new != old and new not in TRANSITIONS[type(old)][old]):
            msg = (f"{obj.label()}: illegal transition {old.value} -> {new.value}"
                   + (f" (expected {', '.join(e.value for e in expected)})" if wrong else ""))
            if _strict():
                raise IllegalTransition(msg)
            logger.error("%s", msg)
        return _set(obj, old, new, fields)


def force(obj: Stateful, new: enum.Enum, reason: str, **fields) -> enum.Enum:
    """The escape hatch: set a state the table does not allow, for the reason given."""
    with obj.changed:
        old = obj.state
        logger.warning("%s: forced %s -> %s: %s", obj.label(), old.value, new.value, reason)
        return _set(obj, old, new, fields)


def _set(obj: Stateful, old: enum.Enum, new: enum.Enum, fields: dict) -> enum.Enum:
    obj.state = new
    for k, v in fields.items():
        setattr(obj, k, v)
    if new != old:
        logger.debug("%s: %s -> %s", obj.label(), old.value, new.value)
    obj.changed.notify_all()
    return old


# Phase names of an attach, in order. Worker-side phases are measured inside the pool
# worker (rank 0's figures are reported); the others by the daemon.
ATTACH_PHASES = (
    "reserve",              # allocator picks and leases the workers
    "engine_start",         # engine process launched until its executor reaches the workers
    "worker_init",          # vLLM Worker built, distributed init among the peers
    "weight_load",          # load_model
    "memory_profiling",     # determine_available_memory (includes the first compile on GPU)
    "kv_cache",             # KV cache allocation
    "compile",              # torch.compile time as vLLM records it (part of the above)
    "graph_capture",        # CUDA graph capture (0 when eager)
    "model_warmup",         # vLLM's compile_or_warm_up_model minus the capture
    "ready",                # last worker step until the API server answers /health
)


# Instance states whose processes are alive and leased (a crash of one fails the instance).
LIVE_INSTANCE_STATES = (InstanceState.ATTACHING, InstanceState.SERVING, InstanceState.PARKING,
                        InstanceState.PARKED, InstanceState.WAKING)
