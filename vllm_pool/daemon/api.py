"""The control API: typed request and response models and the FastAPI routes.

Attach and detach block for seconds, so they run in the threadpool; the pool's own lock
keeps concurrent requests safe.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from vllm_pool.api_models import (AttachBody, DeviceInfo, Health, InstanceInfo,
                                  KernelWarmupInfo, WorkerInfo)
from vllm_pool.daemon import parking, placement
from vllm_pool.daemon.attach_stream import StreamedAttach
from vllm_pool.daemon.errors import AttachError
from vllm_pool.daemon.pool import Instance, Pool
from vllm_pool.daemon.workers import WorkerHandle
from vllm_pool.states import InstanceState, WorkerState


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
                                           if s in pool.workers]),
        phase=i.phase if i.state == InstanceState.ATTACHING else None,
        gpu_memory_utilization=i.gpu_memory_utilization)


def device_infos(pool: Pool) -> list[DeviceInfo]:
    rooms = {r.device: r for r in placement.rooms(pool)}
    out = []
    for d in pool.cfg.devices:
        r = rooms.get(d)
        names = [i.name for i in list(pool.instances.values()) if d in i.devices]
        total, free = (r.total_bytes >> 20, r.free_bytes >> 20) if r else (None, None)
        out.append(DeviceInfo(device=d, total_mib=total, free_mib=free,
                              used_mib=None if r is None else total - free, instances=names))
    return out


def worker_info(pool: Pool, w: WorkerHandle) -> WorkerInfo:
    own, free, total = w.memory_now()
    on_gpu = w.device.startswith("cuda")
    wu = w.warmup_status
    off = pool.cfg.kernel_warmup == "off" or (w.extra and wu.state == "pending")
    return WorkerInfo(slot=w.slot, device=w.device, state=w.state, pid=w.pid,
                      instance_id=w.instance_id, memory_bytes=own,
                      baseline_bytes=w.baseline_bytes, memory_source=w.memory_source,
                      device_free_bytes=free if on_gpu and total else None,
                      device_total_bytes=total if on_gpu and total else None,
                      start_s=round(w.start_s, 3),
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
        idle = sum(w.state == WorkerState.IDLE for w in ws)
        # Workers started beside parked ones do not make the pool unready while they warm,
        # nor do workers retrying a kernel warm-up (they served meanwhile).
        ok = all(w.state not in (WorkerState.STARTING, WorkerState.WARMING, WorkerState.FAILED,
                                 WorkerState.BROKEN)
                 or (w.state == WorkerState.WARMING and w.warmup_status.released)
                 for w in ws if not w.extra)
        if pool.stopping or not ok or not pool.engines.ready():
            raise HTTPException(503, "pool is starting, stopping or respawning a worker")
        return Health(status="ok", workers=len(ws), idle=idle, instances=len(pool.instances),
                      engine_hosts_ready=pool.engines.ready(), parking=pool.cfg.parking,
                      packs=placement.packs(pool))

    @app.get("/workers", response_model=list[WorkerInfo])
    def workers() -> list[WorkerInfo]:
        return [worker_info(pool, w) for w in list(pool.workers.values())]

    @app.get("/devices", response_model=list[DeviceInfo])
    def devices() -> list[DeviceInfo]:
        """Each device's memory now (GPU, NVML: the whole device) and its instances."""
        return device_infos(pool)

    @app.get("/instances", response_model=list[InstanceInfo])
    def instances() -> list[InstanceInfo]:
        return [instance_info(pool, i) for i in list(pool.instances.values())]

    @app.post("/instances", response_model=InstanceInfo, status_code=201,
              responses={409: {"description": "not enough free workers or no GPU with room "
                                               "for the share, or name/port taken"},
                         422: {"description": "bad input (e.g. --gpu-memory-utilization "
                                               "outside (0, 1])"},
                         400: {"description": "the engine failed to start"}})
    async def attach(body: AttachBody, response: Response,
                     stream: bool = Query(False, description=(
                         "answer application/x-ndjson as the attach goes: a `started` "
                         "line, a `phase` line per finished phase, then `done` (the "
                         "instance) or `error` (status, detail); a request refused "
                         "before it starts gets the plain error"))) -> InstanceInfo:
        """Attach; a parked instance with the same settings is woken instead (200)."""
        if stream:
            run = StreamedAttach(pool, body, lambda i: instance_info(pool, i))
            run.start()
            await run_in_threadpool(run.started.wait)
            if run.inst is None:
                status, detail = run.error or (500, "the attach ended without a result")
                raise HTTPException(status, detail)
            return StreamingResponse(run.lines(), status_code=200 if run.waking else 201,
                                     media_type="application/x-ndjson")
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
                         409: {"description": "the instance is not parked, or (evict=false) "
                                              "it does not fit beside what serves"}})
    async def wake(ref: str, timeout_s: float = Query(900.0, gt=0, le=7200),
                   evict: bool = Query(True, description=(
                       "make room by evicting what serves on its devices (a packed "
                       "instance: least recently used first, until its share fits); "
                       "false: evict nothing, 409 unless its devices are free or its "
                       "share fits"))) -> InstanceInfo:
        """Wake a parked instance as it is (an attach with its settings does the same)."""
        inst = pool.find(ref)
        if inst is None:
            raise HTTPException(404, f"no instance {ref!r}")
        try:
            inst = await run_in_threadpool(pool.wake, inst, timeout_s, evict)
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
