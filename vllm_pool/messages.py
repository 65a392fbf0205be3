"""Typed messages that cross a process boundary.

Three channels exist:
- daemon <-> engine fork server: msgspec JSON datagrams on a Unix SOCK_SEQPACKET pair; a fork
  request carries the new host's order pipe and log file as passed descriptors.
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


# ---- daemon -> worker (JSON lines) -------------------------------------------------
class Lease(msgspec.Struct, tag=True):
    """Reserve the worker for one instance; only a matching attach is accepted."""
    instance_id: str
    token: str
    kernel_warmup: bool = False  # the pool's kernel warm-up: re-measure the idle footprint after


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
# The worker process reports its own phase only; the daemon owns the allocation states
# (RESERVED, WARMING, PARKED) and maps each event to a transition (daemon/pool.py).
class _Event(msgspec.Struct, tag=True):
    pid: int
    memory_bytes: int = 0           # this worker's own memory: GPU per process (NVML), CPU RSS
    memory_source: str = ""         # reset.MemoryFigures.source: nvml | torch | rss
    device_free_bytes: int = 0      # GPU: free on the whole device (all processes)
    device_total_bytes: int = 0
    device_uuid: str = ""           # NVML UUID of the worker's GPU (the daemon reads it live)


class Idle(_Event):
    """Ready for an attach: after start-up, and after each clean detach."""
    baseline_bytes: int = 0         # the same figure when idle after start (or warm-up)
    start_s: float = 0.0            # the process's start: imports, CUDA context


class Attaching(_Event):
    instance_id: str = ""
    shm_names: list[str] = []       # shared-memory segments the attach uses (for reclaim)


class Serving(_Event):
    instance_id: str = ""
    phases: dict[str, float] = {}   # worker-side attach phases, seconds
    shm_names: list[str] = []
    dist_ident: str | None = None   # VLLM_DIST_IDENT: prefix of vLLM's CPU TP segments


class Progress(_Event):
    """One attach phase finished on this worker (it runs on: the process's own phase is
    unchanged); the daemon shows it while the attach goes on."""
    instance_id: str = ""
    phase: str = ""                 # a states.ATTACH_PHASES name
    seconds: float = 0.0            # its time so far (the same figure Serving reports)


class Detaching(_Event):
    instance_id: str = ""
    error: str | None = None        # why the attach ended, if it failed


class Failed(_Event):
    """The worker is exiting: unclean after a detach, or its start-up failed."""
    error: str = ""
    instance_id: str | None = None


class Stopped(_Event):
    pass


Event = Idle | Attaching | Progress | Serving | Detaching | Failed | Stopped

_cmd_dec = msgspec.json.Decoder(Command)
_evt_dec = msgspec.json.Decoder(Event)
_enc = msgspec.json.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _enc.encode(msg) + b"\n"


def decode_command(line: bytes) -> Command:
    return _cmd_dec.decode(line)


def decode_event(line: bytes) -> Event:
    return _evt_dec.decode(line)


# ---- daemon <-> engine fork server (JSON datagrams, descriptors passed alongside) -----
class ServerReady(msgspec.Struct, tag=True):
    """The fork server has imported what a host needs."""
    pid: int


class Fork(msgspec.Struct, tag=True):
    """Fork one engine host; the datagram carries its order pipe and its log file."""
    seq: int


class Forked(msgspec.Struct, tag=True):
    seq: int
    pid: int


class HostExited(msgspec.Struct, tag=True):
    """A forked host ended (the fork server is its parent and reaps it)."""
    pid: int
    returncode: int


ForkServerReply = ServerReady | Forked | HostExited
_fork_dec = msgspec.json.Decoder(Fork)
_fork_reply_dec = msgspec.json.Decoder(ForkServerReply)


def decode_fork(data: bytes) -> Fork:
    return _fork_dec.decode(data)


def decode_fork_reply(data: bytes) -> ForkServerReply:
    return _fork_reply_dec.decode(data)


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
