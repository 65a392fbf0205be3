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

    def __post_init__(self) -> None:
        self._init_state(InstanceState.ATTACHING)

    def label(self) -> str:
        return f"instance {self.name}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
