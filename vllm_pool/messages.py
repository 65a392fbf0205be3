"""Typed messages that cross a process boundary.

Two channels exist:
- daemon <-> pool worker: a pair of pipes carrying msgspec JSON lines (control commands one
  way, events the other). JSON keeps the daemon free of pickled vLLM objects.
- engine executor <-> pool worker: an authenticated `multiprocessing.connection` on a Unix
  socket carrying pickled dataclasses, because the attach request holds vLLM's VllmConfig
  and the MessageQueue handle, which only pickle serialises. The same connection is the
  worker's death pipe for that engine: EOF means the EngineCore is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from vllm_pool.states import WorkerState


# ---- daemon -> worker (JSON lines) -------------------------------------------------
class Lease(msgspec.Struct, tag=True):
    """Reserve the worker for one instance; only a matching attach is accepted."""
    instance_id: str
    token: str
    warmup: bool = False  # the pool's kernel warm-up: measure the idle footprint after it


class Release(msgspec.Struct, tag=True):
    """Drop a lease whose engine never reached the worker (failed attach)."""
    instance_id: str


class Abort(msgspec.Struct, tag=True):
    """End the current attach now (detach, or the engine was found dead)."""
    instance_id: str


class Shutdown(msgspec.Struct, tag=True):
    pass


Command = Lease | Release | Abort | Shutdown


# ---- worker -> daemon (JSON lines) -------------------------------------------------
class StateChanged(msgspec.Struct, tag=True):
    state: WorkerState
    pid: int
    instance_id: str | None = None
    memory_bytes: int = 0           # this worker's own memory: GPU per process (NVML), CPU RSS
    baseline_bytes: int = 0         # the same figure when idle after warm-up
    memory_source: str = ""         # reset.MemoryFigures.source: nvml | torch | rss
    device_free_bytes: int = 0      # GPU: free on the whole device (all processes)
    device_total_bytes: int = 0
    device_uuid: str = ""           # NVML UUID of the worker's GPU (the daemon reads it live)
    error: str | None = None
    phases: dict[str, float] = {}   # worker-side attach phases, seconds
    shm_names: list[str] = []       # shared-memory segments the attach uses (for reclaim)
    dist_ident: str | None = None   # VLLM_DIST_IDENT: prefix of vLLM's CPU TP segments
    warmup_s: float = 0.0


Event = StateChanged

_cmd_dec = msgspec.json.Decoder(Command)
_evt_dec = msgspec.json.Decoder(Event)
_enc = msgspec.json.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _enc.encode(msg) + b"\n"


def decode_command(line: bytes) -> Command:
    return _cmd_dec.decode(line)


def decode_event(line: bytes) -> Event:
    return _evt_dec.decode(line)


# Environment variables the daemon sets for an attached engine.
LEASE_ENV = "VLLM_POOL_LEASE"        # LeaseInfo as JSON
RUN_DIR_ENV = "VLLM_POOL_RUN_DIR"    # the instance's private directory (sockets, store)


# ---- engine executor <-> worker (pickled over an authenticated socket) ---------------
@dataclass
class WorkerAddress:
    """Where an executor finds one leased worker; travels in the engine's environment."""
    slot: int
    device: str
    address: str


@dataclass
class LeaseInfo:
    """What the daemon hands the engine process (as JSON in VLLM_POOL_LEASE)."""
    instance_id: str
    token: str
    authkey: str                    # hex
    workers: list[WorkerAddress]

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, s: str) -> "LeaseInfo":
        return msgspec.json.decode(s, type=cls)


@dataclass
class AttachRequest:
    instance_id: str
    token: str
    vllm_config: Any                # vllm.config.VllmConfig
    local_rank: int
    rank: int
    distributed_init_method: str
    input_shm_handle: Any           # shm_broadcast.Handle
    is_driver_worker: bool
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class AttachReply:
    ok: bool
    response_handle: Any = None
    peer_response_handles: list = field(default_factory=list)
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Detach:
    """Sent by the executor on shutdown: leave the busy loop and tear down."""
    reason: str = "engine shutdown"
