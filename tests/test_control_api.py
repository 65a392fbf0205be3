"""The control API under bad input (issue 7, item 5), on the real shared pool.

schemathesis generates requests from the daemon's own served /openapi.json: schema-valid
ones (positive) and schema-violating ones (negative: bad JSON, wrong types, huge values,
missing fields), for every operation, unknown instance ids included. No answer may be a
5xx, and afterwards the pool must be exactly as before: same workers, idle, same PIDs, no
instance, no engine process, no new /dev/shm entry.

What is not sent: a POST /instances body that the API itself would accept (checked here
with the same pydantic model the route uses). Such a body is a real attach: it leases
workers and starts an engine (seconds each on two cores, and a valid model path is what
the trust model says the caller may load). So POST /instances gets everything the
validator must refuse, which is the part under test here; attaches with a valid shape
but a bad model or bad engine arguments are covered by
test_attach.py::test_bad_input_leaves_pool_as_it_was. How many were left out is printed.
"""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests import helpers  # noqa: E402
from vllm_pool.daemon.api import MAX_BODY_BYTES, AttachBody  # noqa: E402

EXAMPLES = int(os.environ.get("VLLM_POOL_FUZZ_EXAMPLES", "60"))


def _would_attach(case) -> bool:
    """True for a POST /instances body that passes the route's own validation."""
    if case.method.upper() != "POST" or case.path != "/instances":
        return False
    body = case.body
    try:
        if isinstance(body, (bytes, str)):
            AttachBody.model_validate_json(body)
        elif isinstance(body, dict):
            # The request is sent as JSON: validate what the server will parse.
            AttachBody.model_validate_json(json.dumps(body))
        else:
            return False
    except Exception:  # noqa: BLE001 - any refusal means the server refuses it too
        return False
    # A body that is not sent as JSON is refused by the server whatever it holds.
    return case.media_type in (None, "application/json")


def _snapshot(pool) -> tuple:
    ws = pool.workers()
    return ([(w["slot"], w["state"], w["pid"], w["instance_id"]) for w in ws],
            pool.instances())


def test_fuzzed_control_api_no_5xx_and_no_change(idle_pool):
    pool = idle_pool
    before = _snapshot(pool)
    assert all(w[1] == "idle" for w in before[0]) and before[1] == []
    shm_before = set(os.listdir("/dev/shm"))
    schema = schemathesis.openapi.from_url(pool.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in ops} >= {
        ("GET", "/health"), ("GET", "/workers"), ("GET", "/instances"),
        ("POST", "/instances"), ("GET", "/instances/{ref}"), ("DELETE", "/instances/{ref}")}
    server_errors: list[str] = []
    sent: dict[str, int] = {}
    held_back = 0
    unsatisfiable: list[str] = []

    for op in ops:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            # Negative attach bodies that pydantic still accepts (a schema violation that
            # coerces) are held back, so that cell gets more draws to send EXAMPLES // 2.
            attach_neg = (op.method.upper(), op.path) == ("POST", "/instances") and \
                mode == schemathesis.GenerationMode.NEGATIVE

            @settings(max_examples=EXAMPLES * (3 if attach_neg else 1), deadline=None,
                      database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal held_back
                if _would_attach(case):
                    held_back += 1
                    return
                r = case.call(base_url=pool.url, timeout=30)
                key = f"{case.method.upper()} {case.path} {mode.value}"
                sent[key] = sent.get(key, 0) + 1
                if r.status_code >= 500:
                    server_errors.append(f"{r.status_code} for {case.as_curl_command()}: "
                                         f"{r.text[:300]}")

            try:
                run()
            except Unsatisfiable:
                # Negative data for an operation without inputs (GET /health) cannot exist.
                unsatisfiable.append(f"{op.method.upper()} {op.path} {mode.value}")

    print(f"schemathesis: sent {sum(sent.values())} requests {sent}; "
          f"held back {held_back} schema-valid attach bodies; no negative data for "
          f"{unsatisfiable}")
    assert not server_errors, "\n".join(server_errors[:20])
    # Every operation was exercised in both modes, the attach route with bad bodies.
    assert sent.get("POST /instances negative", 0) >= EXAMPLES // 2, sent
    assert sent.get("DELETE /instances/{ref} positive", 0) >= EXAMPLES // 2, sent
    # A rejected request changes nothing.
    assert _snapshot(pool) == before
    assert helpers.running_engines(pool.proc.pid) == []
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_request_size_limit(idle_pool, model_a):
    pool = idle_pool
    before = _snapshot(pool)
    url = pool.url + "/instances"
    big = json.dumps({"model": model_a, "args": ["x" * (MAX_BODY_BYTES + 10)]}).encode()
    # Announced size over the limit: 413 before the body is read.
    r = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text
    assert "over" in r.json()["detail"]

    # Streamed (chunked, no Content-Length): counted as it arrives.
    def chunks():
        yield b'{"model": "' + model_a.encode() + b'", "args": ["'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"y" * 65536
        yield b'"]}'

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413, r.text
    # Under the limit, the body reaches validation as before (model name too long: 422),
    # streamed or not.
    ok_size = json.dumps({"model": "m" * 5000}).encode()
    assert httpx.post(url, content=ok_size, timeout=30,
                      headers={"content-type": "application/json"}).status_code == 422
    assert httpx.post(url, content=iter([ok_size[:10], ok_size[10:]]), timeout=30,
                      headers={"content-type": "application/json"}).status_code == 422
    # Broken JSON and a non-numeric Content-Length.
    assert httpx.post(url, content=b'{"model": ', timeout=30,
                      headers={"content-type": "application/json"}).status_code == 422
    # (httpx refuses to send a bad Content-Length: a raw socket does.)
    with socket.create_connection(("127.0.0.1", pool.port), timeout=30) as s:
        s.sendall(b"POST /instances HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: abc\r\n\r\n{}")
        status_line = s.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), status_line
    # GETs still answer, and nothing changed.
    health = pool.client.get("/health")
    assert health.status_code == 200
    assert health.json()["packs"] is False  # CPU workers: one model per device
    assert _snapshot(pool) == before
