"""Pass a request through to an instance and its answer back, as it comes.

The upstream body is relayed chunk by chunk (`aiter_raw`), so Server-Sent Events reach the
client when vLLM writes them. When the client goes away, sending the next chunk fails and
the upstream response is closed; vLLM sees its connection drop and aborts the request.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse

# Hop-by-hop headers (RFC 9110 7.6.1), and ours: the gateway's key is not the engine's.
_DROP_REQUEST = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                 "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                 "authorization"}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade"}
CLIENT_GONE = 499  # recorded when the client disconnected mid-response (nginx's code)


class UpstreamError(Exception):
    pass


class _Relay(StreamingResponse):
    """StreamingResponse that always closes the upstream response and reports the
    outcome exactly once, however the response ends (done, client gone, cancelled)."""

    def __init__(self, upstream: httpx.Response, on_done: Callable[[int], None]):
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
        super().__init__(self._relay(upstream), status_code=upstream.status_code,
                         headers=headers)
        self.upstream = upstream
        self.on_done = on_done
        self.complete = False

    async def _relay(self, upstream: httpx.Response):
        async for chunk in upstream.aiter_raw():
            yield chunk
        self.complete = True

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette returns normally when it notices the disconnect itself.
            status = self.upstream.status_code if self.complete else CLIENT_GONE
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_done(status)


class Proxy:
    def __init__(self) -> None:
        # No read timeout: a long generation is not a hung one; vLLM has its own limits.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    async def forward(self, request: Request, body: bytes, base_url: str,
                      on_done: Callable[[int], None]) -> StreamingResponse:
        """Send `request` (its body already read) to `base_url`; the returned response
        streams the answer. Raises UpstreamError when the instance does not answer."""
        url = base_url + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.raw
                   if k.decode("latin-1").lower() not in _DROP_REQUEST]
        req = self.client.build_request(request.method, url, headers=headers, content=body)
        try:
            upstream = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise UpstreamError(f"the instance at {base_url} did not answer: "
                                f"{type(e).__name__}: {e}") from None
        return _Relay(upstream, on_done)

    async def aclose(self) -> None:
        await self.client.aclose()
