"""The gateway's FastAPI app: OpenAI routes routed by `model`, plus /health and /metrics.

Errors use OpenAI's shape, as vLLM's own server does:
`{"error": {"message": ..., "type": "NotFoundError", "param": null, "code": 404}}`.
"""

from __future__ import annotations

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


def error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                   "code": status}}, status_code=status)


def model_card(m: Model) -> dict:
    inst = m.instance
    return {"id": m.name, "object": "model", "created": _STARTED, "owned_by": "vllm-pool",
            "root": m.entry.model, "parent": None, "aliases": m.entry.aliases,
            "state": m.state.value, "instance": inst.id if inst else None,
            "in_flight": m.in_flight, "waiting": m.waiting, "ttl": m.entry.idle_ttl,
            "last_error": m.last_error}


async def _requested_model(request: Request, body: bytes) -> str | None:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):  # audio transcriptions and translations
        form = await request.form()  # parses the cached body; the raw body goes upstream
        model = form.get("model")
        return model if isinstance(model, str) else None
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def build_gateway_app(router: Router, metrics: GatewayMetrics,
                      api_key: str | None = None) -> FastAPI:
    proxy = Proxy()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()
            await proxy.aclose()

    app = FastAPI(title="vllm-pool gateway", version="0.1.0", lifespan=lifespan,
                  description="One OpenAI endpoint for the pool's models, attached on demand.")

    if api_key:
        # vLLM's --api-key convention: `Authorization: Bearer <key>` on /v1 routes.
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                got = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(got, expected):
                    return error(401, "missing or wrong API key", "AuthenticationError")
            return await call_next(request)

    @app.get("/health")
    def health() -> Response:
        if router.pool.stopping:
            return error(503, "the pool is stopping", "ServiceUnavailableError")
        return JSONResponse({"status": "ok", "models": len(router.models)})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [model_card(m) for m in router.models.values()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> Response:
        try:
            return JSONResponse(model_card(router.resolve(name)))
        except GatewayError as e:
            return error(e.status, e.message, e.type)

    @app.api_route("/v1/{path:path}", methods=["POST", "GET", "PUT", "PATCH", "DELETE"])
    async def route(request: Request, path: str) -> Response:
        body = await request.body()
        name = await _requested_model(request, body)
        if not name:
            metrics.requests.labels("", "400").inc()
            return error(400, "the request names no `model`; see GET /v1/models",
                         "BadRequestError")
        try:
            m = await router.acquire(name)
        except GatewayError as e:
            # Unknown names are not labels: a client must not grow the metric without bound.
            label = "" if isinstance(e, UnknownModel) else router.resolve(name).name
            metrics.requests.labels(label, str(e.status)).inc()
            return error(e.status, e.message, e.type)

        def done(status: int) -> None:
            router.release(m)
            metrics.requests.labels(m.name, str(status)).inc()

        try:
            return await proxy.forward(request, body, m.instance.url, done)
        except UpstreamError as e:
            done(502)
            return error(502, str(e), "BadGatewayError")

    return app
