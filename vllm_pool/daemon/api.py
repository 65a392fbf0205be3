"""The control API: typed request and response models and the FastAPI routes.

Attach and detach block for seconds, so they run in the threadpool; the pool's own lock
keeps concurrent requests safe.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from vllm_pool.daemon import parking
from vllm_pool.daemon.pool import AttachError, Instance, Pool
from vllm_pool.daemon.workers import WorkerHandle
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


class KernelWarmupInfo(BaseModel):
    state: str = Field(description="pending|running|waiting (for room on the device)|"
                                   "retrying|done|failed (gave up; serves without it)|off")
    attempts: int
    failures: int
    error: str | None = Field(description="the last failure, or why it waits")
    retry_in_s: float | None


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
    warmup_s: float
    kernel_warmup_s: float
    kernel_warmup: KernelWarmupInfo | None = None
    restarts: int
    error: str | None


class Health(BaseModel):
    status: str
    workers: int
    idle: int
    instances: int
    engine_spares_ready: int
    parking: bool = Field(False, description="started with --enable-parking")


def instance_info(pool: Pool, i: Instance) -> InstanceInfo:
    return InstanceInfo(
        id=i.id, name=i.name, model=i.model, tp=i.tp, pp=i.pp, port=i.port, url=i.url,
        state=i.state, workers=i.slots, devices=list(i.devices),
        args=i.args, engine_pid=i.engine.pid if i.engine else None,
        engine_host=i.engine_host, created_at=i.created_at,
        uptime_s=(time.time() - i.ready_at) if i.ready_at and i.state == InstanceState.SERVING
        else None, phases={k: round(v, 4) for k, v in i.phases.items()}, error=i.error,
        parked_at=i.parked_at, host_bytes=i.host_bytes, woken=i.woken,
        device_bytes=parking.device_bytes([pool.workers[s] for s in i.slots
                                           if s in pool.workers]))


def worker_info(pool: Pool, w: WorkerHandle) -> WorkerInfo:
    own, free, total = w.memory_now()
    on_gpu = w.device.startswith("cuda")
    wu = w.warmup_status
    off = pool.cfg.kernel_warmup == "off" or (w.extra and wu.state == "pending")
    return WorkerInfo(slot=w.slot, device=w.device, state=pool.worker_state(w), pid=w.pid,
                      instance_id=w.instance_id, memory_bytes=own,
                      baseline_bytes=w.baseline_bytes, memory_source=w.memory_source,
                      device_free_bytes=free if on_gpu and total else None,
                      device_total_bytes=total if on_gpu and total else None,
                      warmup_s=round(w.warmup_s, 3),
                      kernel_warmup_s=round(w.kernel_warmup_s, 3),
                      kernel_warmup=KernelWarmupInfo(
                          state="off" if off else wu.state, attempts=wu.attempts,
                          failures=wu.failures, error=wu.error,
                          retry_in_s=None if wu.retry_at is None
                          else round(max(0.0, wu.retry_at - time.time()), 1)),
                      restarts=max(0, w.restarts), error=w.error)


# The largest attach body is a few KiB (model path, <=256 args, <=128 env entries).
MAX_BODY_BYTES = 1 << 20


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before any route
    sees it, whether it announces its size (Content-Length) or streams it (chunked).
    Bodies under the limit are read here and replayed to the app unchanged."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _reply(send, 400, "bad Content-Length")
            if n > self.limit:
                return await _reply(send, 413, f"request body over {self.limit} bytes")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await _reply(send, 413, f"request body over {self.limit} bytes")
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, for streaming responses

        return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def build_app(pool: Pool) -> FastAPI:
    app = FastAPI(title="vllm-pool", version="0.1.0",
                  description="Warm GPU worker pool for vLLM: attach and detach models.")
    app.add_middleware(BodySizeLimit, limit=MAX_BODY_BYTES)

    @app.get("/health", response_model=Health)
    def health() -> Health:
        ws = list(pool.workers.values())
        idle = sum(pool.worker_state(w) == WorkerState.IDLE for w in ws)
        # Workers started beside parked ones do not make the pool unready while they warm,
        # nor do workers retrying a kernel warm-up (they served meanwhile).
        ok = all(pool.worker_state(w) not in (WorkerState.STARTING, WorkerState.WARMING,
                                              WorkerState.FAILED)
                 or (pool.worker_state(w) == WorkerState.WARMING and w.warmup_status.released)
                 for w in ws if not w.extra)
        if pool.stopping or not ok:
            raise HTTPException(503, "pool is starting, stopping or respawning a worker")
        spares = sum(e.alive() and e.ready() for e in list(pool.spares))
        return Health(status="ok", workers=len(ws), idle=idle, instances=len(pool.instances),
                      engine_spares_ready=spares, parking=pool.cfg.parking)

    @app.get("/workers", response_model=list[WorkerInfo])
    def workers() -> list[WorkerInfo]:
        return [worker_info(pool, w) for w in list(pool.workers.values())]

    @app.get("/instances", response_model=list[InstanceInfo])
    def instances() -> list[InstanceInfo]:
        return [instance_info(pool, i) for i in list(pool.instances.values())]

    @app.post("/instances", response_model=InstanceInfo, status_code=201,
              responses={409: {"description": "not enough free workers, or name/port taken"},
                         400: {"description": "the engine failed to start"}})
    async def attach(body: AttachBody, response: Response) -> InstanceInfo:
        """Attach; a parked instance with the same settings is woken instead (200)."""
        try:
            inst = await run_in_threadpool(
                pool.attach, body.model, tp=body.tp, pp=body.pp, name=body.name,
                port=body.port, devices=body.devices, args=body.args, env=body.env,
                timeout=body.timeout_s)
        except AttachError as e:
            raise HTTPException(e.status, str(e)) from None
        if inst.woken:
            response.status_code = 200
        return instance_info(pool, inst)

    @app.get("/instances/{ref}", response_model=InstanceInfo,
             responses={404: {"description": "no such instance"}})
    def get_instance(ref: str) -> InstanceInfo:
        inst = pool.find(ref)
        if inst is None:
            raise HTTPException(404, f"no instance {ref!r}")
        return instance_info(pool, inst)

    @app.post("/instances/{ref}/wake", response_model=InstanceInfo,
              responses={404: {"description": "no such instance"},
                         409: {"description": "the instance is not parked"}})
    async def wake(ref: str, timeout_s: float = Query(900.0, gt=0, le=7200)) -> InstanceInfo:
        """Wake a parked instance as it is (an attach with its settings does the same)."""
        inst = pool.find(ref)
        if inst is None:
            raise HTTPException(404, f"no instance {ref!r}")
        try:
            inst = await run_in_threadpool(pool.wake, inst, timeout_s)
        except AttachError as e:
            raise HTTPException(e.status, str(e)) from None
        return instance_info(pool, inst)

    @app.delete("/instances/{ref}", response_model=InstanceInfo,
                responses={404: {"description": "no such instance"},
                           409: {"description": "instance is attaching or detaching"}})
    async def detach(ref: str, park: bool | None = None) -> InstanceInfo:
        """Detach; `park=true` parks instead (the pool's --park-on-detach sets the default)."""
        try:
            inst = await run_in_threadpool(pool.detach, ref, park)
        except KeyError:
            raise HTTPException(404, f"no instance {ref!r}") from None
        except AttachError as e:
            raise HTTPException(e.status, str(e)) from None
        return instance_info(pool, inst)

    return app
