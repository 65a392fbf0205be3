"""Scale-out end to end: two real pools of one CPU slot each (on their own cores; they stand
in for two nodes), the standalone gateway in front of both, real vLLM engines, real HTTP.

One flow, to keep CI's time small (two pools, two attaches): a load on a model with
`replicas: {max: 2}` brings up a replica on each pool, every answer has plain vLLM's greedy
tokens; kill -9 of one pool's daemon: the request in flight there gets a clear 502, the
others are served by the other pool; the killed pool restarted: seen up, nothing attached
twice; idle, the replica goes after `ttl`. The router's policy
in detail (a pool that answers again: adopted, nothing attached twice; parked: woken on its
own pool; the grouped queue) is tests/test_gateway_router.py, over in-memory pools.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import helpers

pytestmark = pytest.mark.skipif(bool(helpers.GPUS) or (os.cpu_count() or 1) < 2,
                                reason="two CPU pools on cores 0 and 1")
TTL_S = 10


def _wait(pred, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s")
        time.sleep(every)


def _metric(url: str, name: str, **labels) -> float:
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


class _clients:
    """`n` clients sending the greedy prompts through the gateway one after another until
    the block ends; each answer checked against plain vLLM's (`ref`)."""

    def __init__(self, url: str, n: int, ref):
        self.url, self.ref = url, ref
        self.answers: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            k = i % len(helpers.PROMPTS)
            try:
                (got,) = helpers.greedy(self.url, "s", [helpers.PROMPTS[k]])
                if got != self.ref[k]:
                    raise AssertionError(f"prompt {k}: {got} != {self.ref[k]}")
                self.answers.append(k)
            except Exception as e:  # collected: the test asserts there are none
                self.errors.append(repr(e))
                return
            i += 1

    def __enter__(self) -> "_clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _pool(logs: str, core: int, port: int | None = None, tag: str = "") -> helpers.Daemon:
    return helpers.Daemon(1, os.path.join(logs, f"scale-pool-{core}{tag}"),
                          ["--cpu-cores", str(core)], port=port)


def test_replicas_on_two_pools_pool_loss_and_ttl(model_a, reference, logs, tmp_path):
    ref = reference(model_a, 1)
    pools = [_pool(logs, 0), _pool(logs, 1)]
    gw_proc = None
    try:
        for p in pools:
            p.wait_ready()
        models = tmp_path / "models.yaml"
        models.write_text(f"models:\n  - name: s\n    model: {model_a}\n"
                          f"    args: [{', '.join(helpers.ENGINE_ARGS)}]\n"
                          f"    ttl: {TTL_S}\n    replicas: {{max: 2}}\n"
                          "    target_in_flight: 1\n")
        port = helpers.free_port()
        url = f"http://127.0.0.1:{port}"
        with open(os.path.join(logs, "scale-gateway.log"), "ab") as f:
            gw_proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_pool", "gateway", "--pool", pools[0].url,
                 "--pool", pools[1].url, "--models", str(models), "--gateway-port", str(port)],
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        helpers.wait_http(url + "/health", 120, gw_proc)

        def card() -> dict:
            return httpx.get(url + "/v1/models/s", timeout=30).json()

        def serving_pools() -> list[str]:
            return sorted(r["pool"] for r in card()["replicas"] if r["state"] == "serving")

        # A load of three clients: one replica, then (in flight over 1) a second, on the
        # other pool, while the load goes on. Every answer: plain vLLM's greedy tokens.
        with _clients(url, 3, ref) as load:
            _wait(lambda: len(serving_pools()) == 2 or load.errors, 300, "a second replica")
            assert serving_pools() == sorted(p.url for p in pools)
            for p in pools:  # each replica on its own, too (the load keeps them in use)
                (inst,) = [i for i in p.instances() if i["name"] == "s"]
                assert helpers.greedy(inst["url"], "s") == ref
        assert load.answers and not load.errors, load.errors[:3]
        assert _metric(url, "vllm_pool_gateway_scale_ups_total", model="s", reason="cold") == 1
        assert _metric(url, "vllm_pool_gateway_scale_ups_total", model="s", reason="load") == 1
        assert _metric(url, "vllm_pool_gateway_replicas", model="s") == 2

        # Two long requests, one on each replica (fewest in flight); then kill -9 of the
        # second pool's daemon (its engine goes with it): its request gets a clear 502.
        long_body = {"model": "s", "prompt": helpers.PROMPTS[:1] * 8, "max_tokens": 480,
                     "ignore_eos": True, "temperature": 0}
        victim = pools[1]
        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(httpx.post, url + "/v1/completions", json=long_body, timeout=300)
                    for _ in range(2)]
            _wait(lambda: sorted(r["in_flight"] for r in card()["replicas"]) == [1, 1]
                  or any(f.done() for f in futs), 60, "a request in flight on each replica",
                  every=0.05)
            assert not any(f.done() for f in futs), "the long requests ended too soon"
            tree = helpers.process_tree(victim.proc.pid)
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()
            codes = sorted(f.result().status_code for f in futs)
            bad = [f.result() for f in futs if f.result().status_code != 200]
        assert codes == [200, 502], codes
        err = bad[0].json()["error"]
        assert err["type"] == "BadGatewayError" and victim.url in err["message"], err
        _wait(lambda: not [p for p in tree if os.path.exists(f"/proc/{p}")], 60,
              "the killed pool's processes gone")

        # Routed to the other pool; none lost.
        with _clients(url, 1, ref) as trickle:
            _wait(lambda: len(trickle.answers) > 1 or trickle.errors, 60, "answers after")
            _wait(lambda: _metric(url, "vllm_pool_gateway_pool_up", pool=victim.url) == 0,
                  60, "the killed pool seen down")
            assert serving_pools() == [pools[0].url]
            assert _metric(url, "vllm_pool_gateway_scale_downs_total", model="s",
                           reason="pool_down") == 1
        assert trickle.answers and not trickle.errors, trickle.errors[:3]
        assert _metric(url, "vllm_pool_gateway_attaches_total", model="s", outcome="ok") == 2

        # The killed pool restarted on its port, under load: seen up again, and nothing
        # attached twice (one replica still, on the other pool; the new pool runs nothing).
        with _clients(url, 1, ref) as trickle:
            pools[1] = victim = _pool(logs, 1, port=victim.port, tag="-restarted")
            victim.wait_ready()
            _wait(lambda: _metric(url, "vllm_pool_gateway_pool_up", pool=victim.url) == 1,
                  60, "the restarted pool seen up")
            n = len(trickle.answers)
            _wait(lambda: len(trickle.answers) > n + 1 or trickle.errors, 60, "answers after")
            assert serving_pools() == [pools[0].url] and victim.instances() == []
        assert not trickle.errors, trickle.errors[:3]
        assert _metric(url, "vllm_pool_gateway_attaches_total", model="s", outcome="ok") == 2

        # Idle: the replica goes after ttl (min 0: scale to zero).
        _wait(lambda: card()["state"] == "cold", TTL_S + 60, "scale to zero after ttl")
        assert pools[0].instances() == []
        assert _metric(url, "vllm_pool_gateway_scale_downs_total", model="s",
                       reason="ttl") == 1
    finally:
        if gw_proc is not None:
            assert helpers.stop(gw_proc, 30) == 0
        for p in pools:
            p.stop()
