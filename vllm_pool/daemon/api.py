"""The control API: typed request and response models and the FastAPI routes.

Attach and detach block for seconds, so they run in the threadpool; the pool's own lock
keeps concurrent requests safe.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

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


class WorkerInfo(BaseModel):
    slot: int
    device: str
    state: WorkerState
    pid: int | None
    instance_id: str | None
    memory_bytes: int
    baseline_bytes: int
    warmup_s: float
    restarts: int
    error: str | None


class Health(BaseModel):
    status: str
    workers: int
    idle: int
    instances: int
    engine_spares_ready: int


def instance_info(pool: Pool, i: Instance) -> InstanceInfo:
    return InstanceInfo(
        id=i.id, name=i.name, model=i.model, tp=i.tp, pp=i.pp, port=i.port, url=i.url,
        state=i.state, workers=i.slots, devices=[pool.workers[s].device for s in i.slots],
        args=i.args, engine_pid=i.engine.pid if i.engine else None,
        engine_host=i.engine_host, created_at=i.created_at,
        uptime_s=(time.time() - i.ready_at) if i.ready_at and i.state == InstanceState.SERVING
        else None, phases={k: round(v, 4) for k, v in i.phases.items()}, error=i.error)


def worker_info(w: WorkerHandle) -> WorkerInfo:
    return WorkerInfo(slot=w.slot, device=w.device, state=w.state, pid=w.pid,
                      instance_id=w.instance_id, memory_bytes=w.memory_bytes,
                      baseline_bytes=w.baseline_bytes, warmup_s=round(w.warmup_s, 3),
                      restarts=max(0, w.restarts), error=w.error)


def build_app(pool: Pool) -> FastAPI:
    app = FastAPI(title="vllm-pool", version="0.1.0",
                  description="Warm GPU worker pool for vLLM: attach and detach models.")

    @app.get("/health", response_model=Health)
    def health() -> Health:
        ws = list(pool.workers.values())
        idle = sum(w.state == WorkerState.IDLE for w in ws)
        ok = all(w.state not in (WorkerState.STARTING, WorkerState.FAILED) for w in ws)
        if pool.stopping or not ok:
            raise HTTPException(503, "pool is starting, stopping or respawning a worker")
        spares = sum(e.alive() and e.ready() for e in list(pool.spares))
        return Health(status="ok", workers=len(ws), idle=idle, instances=len(pool.instances),
                      engine_spares_ready=spares)

    @app.get("/workers", response_model=list[WorkerInfo])
    def workers() -> list[WorkerInfo]:
        return [worker_info(w) for w in pool.workers.values()]

    @app.get("/instances", response_model=list[InstanceInfo])
    def instances() -> list[InstanceInfo]:
        return [instance_info(pool, i) for i in list(pool.instances.values())]

    @app.post("/instances", response_model=InstanceInfo, status_code=201,
              responses={409: {"description": "not enough free workers, or name/port taken"},
                         400: {"description": "the engine failed to start"}})
    async def attach(body: AttachBody) -> InstanceInfo:
        try:
            inst = await run_in_threadpool(
                pool.attach, body.model, tp=body.tp, pp=body.pp, name=body.name,
                port=body.port, devices=body.devices, args=body.args, env=body.env,
                timeout=body.timeout_s)
        except AttachError as e:
            raise HTTPException(e.status, str(e)) from None
        return instance_info(pool, inst)

    @app.get("/instances/{ref}", response_model=InstanceInfo,
             responses={404: {"description": "no such instance"}})
    def get_instance(ref: str) -> InstanceInfo:
        inst = pool.find(ref)
        if inst is None:
            raise HTTPException(404, f"no instance {ref!r}")
        return instance_info(pool, inst)

    @app.delete("/instances/{ref}", response_model=InstanceInfo,
                responses={404: {"description": "no such instance"},
                           409: {"description": "instance is attaching or detaching"}})
    async def detach(ref: str) -> InstanceInfo:
        try:
            inst = await run_in_threadpool(pool.detach, ref)
        except KeyError:
            raise HTTPException(404, f"no instance {ref!r}") from None
        except AttachError as e:
            raise HTTPException(e.status, str(e)) from None
        return instance_info(pool, inst)

    return app
