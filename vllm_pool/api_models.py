"""The control API's messages (pydantic): what crosses HTTP between the pool daemon and its
clients (the CLI, the standalone gateway, benchmarks, tests). The daemon builds replies
with them, and `client.py` validates what it reads with the same models."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

from vllm_pool.states import InstanceState, WorkerState


class AttachBody(BaseModel):
    model: str = Field(min_length=1, max_length=4096, description="model path or name")
    tp: int = Field(1, ge=1, le=64, description="tensor parallel size")
    pp: int = Field(1, ge=1, le=64, description="pipeline parallel size")
    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    port: int | None = Field(None, ge=1024, le=65535)
    devices: list[str] | None = Field(None, description="pin to these devices, rank order")
    args: list[str] = Field(default_factory=list, max_length=256,
                            description="any other `vllm serve` arguments")
    env: dict[str, str] = Field(default_factory=dict, max_length=128,
                                description="extra environment for this engine (VLLM_* etc.)")
    timeout_s: float = Field(900.0, gt=0, le=7200)


class InstanceInfo(BaseModel):
    id: str
    name: str
    model: str
    tp: int
    pp: int
    port: int
    url: str
    state: InstanceState
    workers: list[int]
    devices: list[str]
    args: list[str]
    engine_pid: int | None
    engine_host: str
    created_at: float
    uptime_s: float | None
    phases: dict[str, float]
    error: str | None
    parked_at: float | None = None
    host_bytes: int = Field(0, description="parked: host memory it holds (RSS over idle)")
    woken: bool = Field(False, description="the last attach request woke it from parking")
    device_bytes: int | None = Field(None, description="GPU: its workers' own device memory "
                                     "now (per process; parked: what it still holds there)")
    phase: str | None = Field(None, description="attaching: the phase in progress "
                              "(an attach phase name, as in `phases`)")
    gpu_memory_utilization: float | None = Field(None, description="GPU: the share of each "
                                                 "device it was placed with (packing)")


class DeviceInfo(BaseModel):
    device: str
    total_mib: int | None = Field(description="None: no reading (CPU, or no NVML)")
    free_mib: int | None
    used_mib: int | None
    instances: list[str] = Field(description="names of the instances with a worker on it")


class KernelWarmupInfo(BaseModel):
    state: str = Field(description="pending|running|waiting (for room on the device)|"
                                   "retrying|done|failed (gave up; serves without it)|off")
    attempts: int
    failures: int
    error: str | None = Field(description="the last failure, or why it waits")
    retry_in_s: float | None


# A streamed attach (POST /instances?stream=true) answers these as JSON lines, in order:
# started, one phase line per finished phase, then done or error.
class StartedEvent(BaseModel):
    event: Literal["started"] = "started"
    instance: InstanceInfo


class PhaseEvent(BaseModel):
    event: Literal["phase"] = "phase"
    phase: str = Field(description="the phase that finished")
    seconds: float
    next: str | None = Field(description="the phase now in progress (None: the last one)")


class DoneEvent(BaseModel):
    event: Literal["done"] = "done"
    instance: InstanceInfo = Field(description="what the plain POST /instances answers")


class ErrorEvent(BaseModel):
    event: Literal["error"] = "error"
    status: int = Field(description="the HTTP status the plain POST /instances answers")
    detail: str


AttachEvent = Annotated[StartedEvent | PhaseEvent | DoneEvent | ErrorEvent,
                        Field(discriminator="event")]
attach_event = TypeAdapter(AttachEvent)


class WorkerInfo(BaseModel):
    slot: int
    device: str
    state: WorkerState
    pid: int | None
    instance_id: str | None
    memory_bytes: int = Field(description="this worker's own memory: on a GPU its process's "
                              "device memory (NVML, CUDA context included), on CPU its RSS")
    baseline_bytes: int = Field(description="the same figure when idle after warm-up")
    memory_source: str = Field("", description="nvml | torch (no per-process figure from "
                               "NVML: PyTorch's reserved memory) | rss (CPU)")
    device_free_bytes: int | None = Field(None, description="GPU: free on the whole device "
                                          "(all processes)")
    device_total_bytes: int | None = None
    start_s: float = Field(description="the process's start: imports and CUDA context")
    kernel_warmup_s: float = Field(description="the pool's kernel warm-up attach on it")
    kernel_warmup: KernelWarmupInfo | None = None
    restarts: int
    error: str | None


class Health(BaseModel):
    status: str
    workers: int
    idle: int
    instances: int
    engine_hosts_ready: bool = Field(description="an attach gets a forked engine host at once "
                                     "(the pool's engine fork server is warm)")
    parking: bool = Field(False, description="started with --enable-parking")
    packs: bool = Field(False, description="attaches are placed by GPU memory, several per "
                        "GPU (every device has NVML's figures); else one model per device")
