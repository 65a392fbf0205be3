"""The control-API client (vllm_pool/client.py) against a tiny in-process HTTP server that
answers as the daemon does (the API's own models, FastAPI's error body): no pool, no vLLM."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from tests import helpers
from vllm_pool.api_models import InstanceInfo
from vllm_pool.client import PoolClient, PoolError
from vllm_pool.states import InstanceState

INST = InstanceInfo(
    id="3f2a", name="a/b", model="/models/tiny", tp=1, pp=1, port=8200,
    url="http://127.0.0.1:8200", state=InstanceState.PARKED, workers=[0], devices=["cpu:0"],
    args=["--dtype", "float32"], engine_pid=123, engine_host="forked", created_at=1.5,
    uptime_s=None, phases={"engine_start": 0.25}, error=None, host_bytes=4096)


@pytest.fixture
def server():
    """(url, paths asked): GET /instances/<id or name> answers INST, any other path 404."""
    paths: list[str] = []

    class Handler(helpers.JsonHandler):
        def do_GET(self):
            paths.append(self.path)
            if self.path in ("/instances/3f2a", "/instances/a%2Fb"):
                self.reply(200, INST.model_dump_json().encode())
            else:
                self.reply(404, json.dumps({"detail": "no instance 'x'"}).encode())

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", paths
    srv.shutdown()
    srv.server_close()


def test_instance_by_id_or_name(server):
    url, paths = server
    c = PoolClient(url, timeout=10)
    assert c.instance("3f2a") == INST
    got = c.instance("a/b")  # a name is quoted into one path segment
    assert paths == ["/instances/3f2a", "/instances/a%2Fb"]
    assert isinstance(got, InstanceInfo) and got.state is InstanceState.PARKED
    assert got.model_dump(mode="json") == json.loads(INST.model_dump_json())


def test_instance_404_is_pool_error_with_status_and_body(server):
    url, _ = server
    with pytest.raises(PoolError) as ei:
        PoolClient(url, timeout=10).instance("x")
    assert ei.value.status == 404
    assert str(ei.value) == "HTTP 404: no instance 'x'"
    assert json.loads(ei.value.body) == {"detail": "no instance 'x'"}


def test_unreachable_pool_has_no_status():
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PoolError) as ei:
        PoolClient(f"http://127.0.0.1:{port}", timeout=10).instance("x")
    assert ei.value.status is None and ei.value.body == ""
