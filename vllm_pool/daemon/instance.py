"""The pool's settings and its record of one attached instance."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm_pool.engine.launch import EngineProcess
from vllm_pool.states import InstanceState, Stateful


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
    engine_fork: bool = True                # engine hosts forked from a warm server
    state_path: str | None = None           # state file for reclaim after a crash
    control_port: int = 0
    parking: bool = False                   # engines start able to sleep; detach may park
    park_budget_bytes: int = 0              # host memory for parked instances (0: default)
    park_on_detach: bool = False            # a plain detach parks
    wake_evicts: str = "park"               # what waking does to an occupant: park|detach
    kernel_warmup: str = "off"              # off|eager|compiled: see kernel_warmup.py
    pack_margin_mib: int = 1024             # packing.py: kept free on a GPU beyond a share


# The phase an attach is in once the named one is done (vLLM's start-up order; the
# capture runs inside model_warmup, so it moves nothing).
_NEXT_PHASE = {"reserve": "engine_start", "engine_start": "worker_init",
               "worker_init": "weight_load", "weight_load": "memory_profiling",
               "memory_profiling": "kv_cache", "kv_cache": "model_warmup",
               "model_warmup": "ready", "ready": None}


@dataclass(eq=False)
class Instance(Stateful):
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
    created_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    engine: EngineProcess | None = None
    engine_host: str = ""                   # "forked" (from the warm server) or "fresh"
    shm_names: set[str] = field(default_factory=set)
    dist_idents: set[str] = field(default_factory=set)
    settings: str = ""                      # parking.settings_key: what a re-attach must match
    devices: list[str] = field(default_factory=list)
    last_used: float = field(default_factory=time.time)
    parked_at: float | None = None
    host_bytes: int = 0                     # parked: host memory held (RSS over idle)
    woken: bool = False                     # the last attach request woke it
    kernel_warmup: bool = False             # the pool's own warm-up attach of a new worker
    gpu_memory_utilization: float | None = None  # GPU: the share it was packed with
    # An attach as it happens: the phase in progress, and the phases done so far in order
    # (name, seconds, the phase then in progress), each signalled on `changed`;
    # `launched_at`: the engine's launch.
    phase: str | None = None
    progress: list[tuple[str, float, str | None]] = field(default_factory=list)
    launched_at: float | None = None

    def __post_init__(self) -> None:
        self._init_state(InstanceState.ATTACHING)

    def label(self) -> str:
        return f"instance {self.name}"

    def phase_done(self, name: str, seconds: float, once: bool = False) -> None:
        """Record a finished attach phase (`once`: unless it is recorded already)."""
        with self.changed:
            if once and self.done_seconds(name) is not None:
                return
            self.phase = _NEXT_PHASE.get(name, self.phase)
            self.progress.append((name, round(seconds, 4), self.phase))
            self.changed.notify_all()

    def done_seconds(self, name: str) -> float | None:
        return next((s for n, s, _ in list(self.progress) if n == name), None)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
