"""gateway/app.py against a stub upstream (the end-to-end gateway tests are test_gateway.py)."""

from __future__ import annotations


def test_gateway_plain_asgi_path_key_forwarding_and_errors():
    """The gateway's hot path (plain ASGI, in front of FastAPI): the API key on every /v1
    route, the request passed on with its query and without the gateway's key, whole and
    streamed answers, and OpenAI-shaped errors. The upstream is a stub HTTP server: what is
    tested is the gateway's own handling."""
    import http.server
    import json
    import threading
    import types

    from starlette.testclient import TestClient

    from tests import helpers
    from vllm_pool.gateway.app import build_gateway_app
    from vllm_pool.gateway.metrics import GatewayMetrics
    from vllm_pool.gateway.router import UnknownModel

    class Upstream(helpers.JsonHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            if json.loads(body).get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for ev in (b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"):
                    self.wfile.write(ev)
                return
            self.reply(200, json.dumps({"path": self.path,
                                        "auth": self.headers.get("authorization"),
                                        "body": json.loads(body)}).encode())

    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    model = types.SimpleNamespace(name="a", instance=types.SimpleNamespace(
        url=f"http://127.0.0.1:{up.server_port}"))
    released = []

    class Router:
        models: dict = {}
        pool = types.SimpleNamespace(down_reason=None)

        async def start(self):
            pass

        async def stop(self):
            pass

        async def acquire(self, name):
            if name != "a":
                raise UnknownModel(f"The model `{name}` does not exist.")
            return model

        def release(self, m):
            released.append(m.name)

        def resolve(self, name):
            return model

    metrics = GatewayMetrics()
    try:
        with TestClient(build_gateway_app(Router(), metrics, api_key="k")) as c:
            assert c.get("/health").status_code == 200  # no key needed off /v1
            for path in ("/v1/models", "/v1/completions"):
                r = c.post(path, json={"model": "a"}, headers={"authorization": "Bearer x"})
                assert r.status_code == 401, path
                assert r.json()["error"]["type"] == "AuthenticationError"
            key = {"authorization": "Bearer k"}
            assert c.get("/v1/models", headers=key).json()["object"] == "list"
            r = c.post("/v1/completions?x=1", json={"model": "a", "prompt": "p"},
                       headers=key)
            assert r.status_code == 200
            assert r.json() == {"path": "/v1/completions?x=1", "auth": None,
                                "body": {"model": "a", "prompt": "p"}}
            with c.stream("POST", "/v1/completions", json={"model": "a", "stream": True},
                          headers=key) as s:
                assert b"".join(s.iter_bytes()) == b'data: {"n": 1}\n\ndata: [DONE]\n\n'
            r = c.post("/v1/completions", json={"model": "zz"}, headers=key)
            assert r.status_code == 404 and "zz" in r.json()["error"]["message"]
            r = c.post("/v1/completions", content=b"not json", headers=key)
            assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    finally:
        up.shutdown()
    assert released == ["a", "a"]
    assert metrics.requests.labels("a", "200")._value.get() == 2
