"""The gateway's ASGI app: OpenAI routes routed by `model`, plus /health and /metrics.

Every proxied call (`/v1/...` but the model list) is handled in plain ASGI, in front of the
FastAPI app that serves the rest: on a small machine the framework's per-request layers
(middleware stack, routing, request and dependency objects) were a third of the gateway's
own time per request (docs/gateway.md). Errors use OpenAI's shape, as vLLM's own server does:
`{"error": {"message": ..., "type": "NotFoundError", "param": null, "code": 404}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vllm_pool.gateway.metrics import GatewayMetrics
from vllm_pool.gateway.proxy import Proxy, UpstreamError
from vllm_pool.gateway.router import GatewayError, Model, Router, UnknownModel

_STARTED = int(time.time())
# A whole JSON answer with a request the engine aborted (vLLM's compact JSON).
_ABORTED = b'"finish_reason":"abort"'


def error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                   "code": status}}, status_code=status)


def model_card(m: Model, router: Router) -> dict:
    inst = m.instance
    e = m.entry
    return {"id": m.name, "object": "model", "created": _STARTED, "owned_by": "vllm-pool",
            "root": e.model, "parent": None, "aliases": e.aliases,
            "state": m.state.value, "phase": router.attach_phase(m),
            "instance": inst.id if inst else None,
            "in_flight": m.in_flight, "waiting": m.waiting, "ttl": e.idle_ttl,
            "last_error": m.last_error,
            "replicas": [{"pool": r.pool, "instance": r.instance.id, "name": r.instance.name,
                          "state": r.state.value, "in_flight": r.in_flight,
                          "devices": list(r.instance.devices)} for r in m.replicas],
            "min_replicas": e.replicas.min, "max_replicas": e.replicas.max,
            "target_in_flight": e.target_in_flight}


def _header(scope: dict, name: bytes) -> bytes:
    for k, v in scope["headers"]:
        if k == name:  # ASGI header names are lower-case
            return v
    return b""


def _json_model(body: bytes) -> str | None:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


class GatewayApp:
    """The ASGI entry: the API key on /v1, proxied calls here, everything else (health,
    metrics, the model list, multipart uploads, lifespan) to the FastAPI app."""

    def __init__(self, router: Router, metrics: GatewayMetrics, api_key: str | None):
        self.router = router
        self.metrics = metrics
        self.proxy = Proxy()
        # vLLM's --api-key convention: `Authorization: Bearer <key>` on /v1 routes.
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.api = self._build_api()

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            return await self.api(scope, receive, send)
        if self.key and not hmac.compare_digest(_header(scope, b"authorization"), self.key):
            resp = error(401, "missing or wrong API key", "AuthenticationError")
        elif path == "/v1/models" or path.startswith("/v1/models/") \
                or _header(scope, b"content-type").startswith(b"multipart/form-data"):
            return await self.api(scope, receive, send)
        else:
            body = await _read_body(receive)
            if body is None:
                return  # the client went away before its request was in
            resp = await self.dispatch(_json_model(body), scope, body)
        await resp(scope, receive, send)

    async def dispatch(self, name: str | None, scope: dict, body: bytes) -> Response:
        """Acquire the named model's instance (attaching it if need be) and pass the call
        on; the answer, or an OpenAI-shaped error."""
        metrics = self.metrics
        if not name:
            metrics.requests.labels("", "400").inc()
            return error(400, "the request names no `model`; see GET /v1/models",
                         "BadRequestError")
        router = self.router
        for attempt in (0, 1):
            try:
                m = await router.acquire(name)  # a router.Lease
            except GatewayError as e:
                # Unknown names are not labels: a client must not grow the metric without
                # bound.
                label = "" if isinstance(e, UnknownModel) else router.resolve(name).name
                metrics.requests.labels(label, str(e.status)).inc()
                return error(e.status, e.message, e.type)

            def done(status: int, m=m) -> None:
                router.release(m)
                metrics.requests.labels(m.name, str(status)).inc()

            try:
                resp = await self._forward(scope, body, m, done)
                if resp is None:
                    done(502)
                    return error(502, f"the pool {m.replica.pool} of the instance at "
                                 f"{m.instance.url} went away mid-request (model `{m.name}`)",
                                 "BadGatewayError")
                whole = getattr(resp, "body", None)  # not a stream
                if whole is not None and (resp.status_code >= 500 or _ABORTED in whole[:1 << 16]) \
                        and hasattr(router, "lost") and await router.lost(m):
                    # vLLM answers what it had (or 500: engine dead) when its engine is
                    # stopped under it, as when its pool's node goes: not the answer asked for.
                    return error(502, f"the instance at {m.instance.url} stopped mid-request: "
                                 f"its pool {m.replica.pool} does not answer (model "
                                 f"`{m.name}`); the answer was cut short", "BadGatewayError")
                return resp
            except UpstreamError as e:
                if not e.sent and attempt == 0 and hasattr(router, "unreachable"):
                    # Refused: nothing reached that engine (its pool may be gone before
                    # the gateway's next look at it). Once more, on another replica.
                    router.release(m)
                    router.unreachable(m)
                    continue
                done(502)
                pool = getattr(getattr(m, "replica", None), "pool", None)
                where = f" (model `{m.name}`" + (f", pool {pool})" if pool else ")")
                return error(502, str(e) + where, "BadGatewayError")

    async def _forward(self, scope: dict, body: bytes, lease, done) -> Response | None:
        """proxy.forward, cut short (None) if the replica is lost before the answer comes:
        an engine whose pool's node went away may never answer."""
        signal = getattr(self.router, "lost_signal", None)
        if signal is None:
            return await self.proxy.forward(scope, body, lease.instance.url, done)
        lost = signal(lease)
        fwd = asyncio.ensure_future(self.proxy.forward(scope, body, lease.instance.url, done,
                                                       lost))
        try:
            await asyncio.wait((fwd, lost), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            fwd.cancel()
            raise
        if fwd.done():
            return fwd.result()
        fwd.cancel()
        with contextlib.suppress(BaseException):
            await fwd
        return None

    def _build_api(self) -> FastAPI:
        router, metrics, proxy = self.router, self.metrics, self.proxy

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            await router.start()
            try:
                yield
            finally:
                await router.stop()
                await proxy.aclose()

        app = FastAPI(title="vllm-pool gateway", version="0.1.0", lifespan=lifespan,
                      description="One OpenAI endpoint for the pool's models, attached on "
                                  "demand.")

        @app.get("/health")
        def health() -> Response:
            down = router.pool.down_reason
            if down:
                return error(503, down, "ServiceUnavailableError")
            return JSONResponse({"status": "ok", "models": len(router.models)})

        @app.get("/metrics")
        def prometheus() -> Response:
            return Response(metrics.render(), media_type=metrics.content_type)

        @app.get("/v1/models")
        def list_models() -> dict:
            return {"object": "list", "data": [model_card(m, router) for m in router.models.values()]}

        @app.get("/v1/models/{name:path}")
        def get_model(name: str) -> Response:
            try:
                return JSONResponse(model_card(router.resolve(name), router))
            except GatewayError as e:
                return error(e.status, e.message, e.type)

        @app.api_route("/v1/{path:path}", methods=["POST", "PUT", "PATCH"])
        async def form_route(request: Request, path: str) -> Response:
            # Multipart uploads (audio transcriptions and translations) only.
            body = await request.body()
            form = await request.form()  # parses the cached body; the raw body goes upstream
            model = form.get("model")
            return await self.dispatch(model if isinstance(model, str) else None,
                                       request.scope, body)

        return app


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)


def build_gateway_app(router: Router, metrics: GatewayMetrics,
                      api_key: str | None = None) -> GatewayApp:
    return GatewayApp(router, metrics, api_key)
