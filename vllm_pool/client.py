"""The one client of the pool's control API, for the CLI, the standalone gateway, the
benchmarks and the tests. Standard library only for the transport (so `vllm-pool ls`
answers in a tenth of a second); replies are validated with the API's own models."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

from vllm_pool.access import API_KEY_ENV
from vllm_pool.api_models import (AttachEvent, DeviceInfo, DoneEvent, ErrorEvent, Health,
                                  InstanceInfo, WorkerInfo, attach_event)

POOL_URL_ENV = "VLLM_POOL_URL"
DEFAULT_POOL = "http://127.0.0.1:8100"


def default_pool() -> str:
    return os.environ.get(POOL_URL_ENV, DEFAULT_POOL)


class PoolError(Exception):
    """A control call failed; `status` is the HTTP status, None if the pool was not reached;
    `body` the error reply as the pool sent it ("" if none), for callers that report it."""

    def __init__(self, msg: str, status: int | None = None, body: str = ""):
        super().__init__(msg)
        self.status = status
        self.body = body


class PoolClient:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30.0):
        self.url = (url or default_pool()).rstrip("/")
        self.key = key or os.environ.get(API_KEY_ENV)
        self.timeout = timeout

    def _open(self, method: str, path: str, body: dict | None, timeout: float | None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if self.key:
            req.add_header("authorization", f"Bearer {self.key}")
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            body = ""
            try:
                body = e.read().decode(errors="replace")
                detail = json.loads(body).get("detail", e.reason)
            except Exception:  # noqa: BLE001 - not our JSON: the status says enough
                detail = e.reason
            raise PoolError(f"HTTP {e.code}: {detail}", e.code, body) from None
        except (urllib.error.URLError, OSError) as e:
            raise PoolError(f"cannot reach the pool at {self.url}: {e}") from None

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float | None = None):
        """One call; the decoded JSON reply."""
        with self._open(method, path, body, timeout) as r:
            try:
                return json.loads(r.read() or b"null")
            except (OSError, ValueError) as e:
                raise PoolError(f"bad reply from the pool at {self.url}: {e}") from None

    def events(self, method: str, path: str, body: dict | None = None,
               timeout: float | None = None) -> Iterator[dict]:
        """A streamed call: one JSON object per line, as the pool sends them."""
        with self._open(method, path, body, timeout) as r:
            try:
                for line in r:
                    if line.strip():
                        yield json.loads(line)
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise PoolError(f"the pool's stream from {self.url} broke off: {e}") from None

    # ---- typed calls ------------------------------------------------------------------
    def health(self) -> Health:
        return Health.model_validate(self.request("GET", "/health"))

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo.model_validate(w) for w in self.request("GET", "/workers")]

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo.model_validate(d) for d in self.request("GET", "/devices")]

    def instances(self) -> list[InstanceInfo]:
        return [InstanceInfo.model_validate(i) for i in self.request("GET", "/instances")]

    def instance(self, ref: str) -> InstanceInfo:
        """One instance by id or name; a PoolError with status 404 where there is none."""
        return InstanceInfo.model_validate(self.request("GET", f"/instances/{_q(ref)}"))

    def attach(self, body: dict, timeout: float | None = None,
               on_event: Callable[[AttachEvent], None] | None = None) -> InstanceInfo:
        """Attach; with `on_event`, streamed: it gets the started and phase events as they
        come. The same instance, or the same PoolError, either way."""
        if on_event is None:
            return InstanceInfo.model_validate(self.request("POST", "/instances", body,
                                                            timeout))
        for ev in self.attach_events(body, timeout):
            if isinstance(ev, DoneEvent):
                return ev.instance
            if isinstance(ev, ErrorEvent):
                raise PoolError(f"HTTP {ev.status}: {ev.detail}", ev.status)
            on_event(ev)
        raise PoolError(f"the pool at {self.url} ended the attach stream without a result")

    def attach_events(self, body: dict, timeout: float | None = None) -> Iterator[AttachEvent]:
        """A streamed attach's events (api_models.AttachEvent), as they come."""
        for ev in self.events("POST", "/instances?stream=true", body, timeout):
            yield attach_event.validate_python(ev)

    def wake(self, ref: str, timeout_s: float, evict: bool = True) -> InstanceInfo:
        query = f"timeout_s={timeout_s}" + ("" if evict else "&evict=false")
        return InstanceInfo.model_validate(self.request(
            "POST", f"/instances/{_q(ref)}/wake?{query}", timeout=timeout_s + 60))

    def detach(self, ref: str, park: bool | None = None, timeout: float = 600.0) -> InstanceInfo:
        query = "" if park is None else f"?park={str(park).lower()}"
        return InstanceInfo.model_validate(
            self.request("DELETE", f"/instances/{_q(ref)}{query}", timeout=timeout))


def _q(ref: str) -> str:
    return urllib.parse.quote(ref, safe="")
