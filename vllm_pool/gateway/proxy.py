"""Pass a request through to an instance and its answer back, as it comes.

The upstream is reached with aiohttp (a vLLM dependency): on the CPU machine the gateway
added about half the latency per request that it did with httpx's async client
(docs/gateway.md has the figures). Streams (Server-Sent Events, or any answer without a
length) are relayed chunk by chunk as they arrive (`iter_any`, no decompression), so
events reach the client when vLLM writes them; when the client goes away, sending the next
chunk fails and the upstream connection is closed, not reused: vLLM sees it drop and aborts
the request. A whole JSON answer is read and sent in one piece: vLLM sends it only once the
generation is done, so relaying it piecewise would gain nothing and cost a streaming
response's per-request machinery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import anyio
from starlette.responses import Response, StreamingResponse

# Hop-by-hop headers (RFC 9110 7.6.1), and ours: the gateway's key is not the engine's.
_DROP_REQUEST = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                 "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                 "authorization"}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade"}
CLIENT_GONE = 499  # recorded when the client disconnected mid-response (nginx's code)
# The OpenAI stream's last event. A client that has it has the whole answer: the openai client
# closes the connection right there, before vLLM's end of the chunked body reaches us.
_SSE_DONE = b"data: [DONE]"


class UpstreamError(Exception):
    def __init__(self, message: str, sent: bool = True):
        super().__init__(message)
        self.sent = sent  # False: the connection was refused, nothing reached the engine


class _Relay(StreamingResponse):
    """StreamingResponse that always ends the upstream response and reports the outcome
    exactly once, however the response ends (done, client gone, cancelled)."""

    def __init__(self, upstream: aiohttp.ClientResponse, on_done: Callable[[int], None],
                 lost: asyncio.Future | None = None):
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
        super().__init__(self._relay(upstream), status_code=upstream.status, headers=headers)
        self.upstream = upstream
        self.on_done = on_done
        self.lost = lost
        if lost is not None:  # the instance is lost: cut the stream rather than hang
            lost.add_done_callback(self._cut)
        self.complete = False  # the upstream body was read to its end
        self.delivered = False  # the client was sent the stream's [DONE] event

    def _cut(self, _fut) -> None:
        self.upstream.close()

    async def _relay(self, upstream: aiohttp.ClientResponse):
        async for chunk in upstream.content.iter_any():
            yield chunk
            # Resumed only after the chunk was sent.
            self.delivered = chunk.rstrip().endswith(_SSE_DONE)
        self.complete = True

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette returns normally when it notices the disconnect itself.
            status = self.upstream.status if self.complete or self.delivered else CLIENT_GONE
            if self.lost is not None:
                self.lost.remove_done_callback(self._cut)
            with anyio.CancelScope(shield=True):
                if self.complete:
                    self.upstream.release()  # the connection goes back to the pool
                else:
                    self.upstream.close()  # cut: vLLM sees the disconnect and aborts
            self.on_done(status)


class Proxy:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0,
                                               keepalive_timeout=60),
                # No read timeout: a long generation is not a hung one; vLLM has its limits.
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
                auto_decompress=False, skip_auto_headers=("User-Agent",))
        return self._session

    async def forward(self, scope: dict, body: bytes, base_url: str,
                      on_done: Callable[[int], None],
                      lost: asyncio.Future | None = None) -> Response:
        """Send the ASGI request `scope` (its body already read) to `base_url` and return
        the answer: a stream as it comes, a whole reply in one piece. Raises UpstreamError
        when the instance does not answer. `lost` (done when the instance is lost) cuts a
        stream that would otherwise hang."""
        url = base_url + scope["path"]
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [(name, v.decode("latin-1")) for k, v in scope["headers"]
                   if (name := k.decode("latin-1")) not in _DROP_REQUEST]
        try:
            upstream = await self._client().request(
                scope["method"], url, headers=headers, data=body,
                skip_auto_headers=("Accept-Encoding", "Content-Type"))
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError(f"the instance at {base_url} did not answer: "
                                f"{type(e).__name__}: {e}",
                                sent=not isinstance(e, aiohttp.ClientConnectorError)) from None
        if upstream.headers.get("content-type", "").startswith("text/event-stream") \
                or upstream.content_length is None:
            return _Relay(upstream, on_done, lost)
        # A whole JSON answer (not streamed): read it and answer in one piece, without a
        # streaming response's per-request machinery.
        try:
            content = await upstream.read()
        except (aiohttp.ClientError, OSError) as e:
            upstream.close()
            raise UpstreamError(f"the instance at {base_url} failed mid-answer: "
                                f"{type(e).__name__}: {e}") from None
        except BaseException:  # cancelled: a half-read connection must not be reused
            upstream.close()
            raise
        upstream.release()
        on_done(upstream.status)
        headers = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in _DROP_RESPONSE and k.lower() != "content-length"}
        return Response(content, status_code=upstream.status, headers=headers)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
