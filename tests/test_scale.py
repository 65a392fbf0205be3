"""Scale-out end to end: two real pools of one CPU slot each (on their own cores; they stand
in for two nodes), the standalone gateway in front of both, real vLLM engines, real HTTP.

One flow, to keep CI's time small (two pools, two attaches): a load on a model with
`replicas: {max: 2}` brings up a replica on each pool, every answer has plain vLLM's greedy
tokens; kill -9 of one pool's daemon: the request in flight there gets a clear 502, the
others are served by the other pool; the killed pool restarted: seen up, nothing attached
twice; idle, the replica goes after `ttl`. The router's policy
in detail (a pool that answers again: adopted, nothing attached twice; parked: woken on its
own pool; the grouped queue) is tests/test_gateway_router.py, over in-memory pools; two of
its rules also run here end to end: a parked model woken on its own pool, and the grouped
queue against an interleaved A/B load on one slot.
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
    """The sum of the samples of `name` with these labels (any value of the others)."""
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


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


def _pool(logs: str, core: int, port: int | None = None, tag: str = "",
          extra: tuple[str, ...] = ()) -> helpers.Daemon:
    return helpers.Daemon(1, os.path.join(logs, f"scale-pool-{core}{tag}"),
                          ["--cpu-cores", str(core), *extra], port=port)


def _models_file(tmp_path, extra: str = "", **models: str):
    """A models file: one entry per name=path, the test engine arguments, `extra` lines."""
    args = f"[{', '.join(helpers.ENGINE_ARGS)}]"
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + "".join(
        f"  - name: {n}\n    model: {m}\n    args: {args}\n{extra}" for n, m in models.items()))
    return path


def _gateway(logs: str, tag: str, pools: list[helpers.Daemon], models,
             extra: tuple[str, ...] = ()) -> tuple:
    port = helpers.free_port()
    with open(os.path.join(logs, f"scale-gateway{tag}.log"), "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_pool", "gateway",
             *[a for p in pools for a in ("--pool", p.url)], "--models", str(models),
             "--gateway-port", str(port), *extra],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    helpers.wait_http(url + "/health", 120, proc)
    return proc, url


def test_replicas_on_two_pools_pool_loss_and_ttl(model_a, reference, logs, tmp_path):
    ref = reference(model_a, 1)
    pools = [_pool(logs, 0), _pool(logs, 1)]
    gw_proc = None
    try:
        for p in pools:
            p.wait_ready()
        models = _models_file(tmp_path, f"    ttl: {TTL_S}\n    replicas: {{max: 2}}\n"
                                        "    target_in_flight: 1\n", s=model_a)
        gw_proc, url = _gateway(logs, "", pools, models)

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


def test_a_parked_model_is_woken_on_its_own_pool(model_a, reference, logs, tmp_path):
    """Placement's first rule across pools: a model parked on one pool is woken there (same
    instance, no new attach), though the other pool has a free worker."""
    ref = reference(model_a, 1)
    pools = [_pool(logs, c, tag="-park", extra=("--enable-parking",)) for c in (0, 1)]
    gw_proc = None
    try:
        for p in pools:
            p.wait_ready()
        models = _models_file(tmp_path, pk=model_a)
        gw_proc, url = _gateway(logs, "-park", pools, models)

        def replicas() -> list[tuple[str, str]]:
            card = httpx.get(url + "/v1/models/pk", timeout=30).json()
            return sorted((r["pool"], r["state"]) for r in card["replicas"])

        assert helpers.greedy(url, "pk") == ref
        (home,) = [p for p in pools if p.instances()]
        (other,) = [p for p in pools if p is not home]
        (inst,) = home.instances()
        r = home.client.delete(f"/instances/{inst['id']}", params={"park": "true"})
        assert r.status_code == 200 and r.json()["state"] == "parked", r.text
        # Parked behind the gateway's back: no replica serves, so the model reads cold.
        _wait(lambda: replicas() == [], 60, "the gateway sees it gone")
        assert other.workers()[0]["state"] == "idle"  # room elsewhere: a wrong rule would use it

        assert helpers.greedy(url, "pk") == ref
        (woken,) = home.instances()
        assert (woken["id"], woken["state"]) == (inst["id"], "serving")
        assert other.instances() == []
        assert replicas() == [(home.url, "serving")]
        assert _metric(url, "vllm_pool_gateway_attaches_total", model="pk", outcome="ok") == 1
    finally:
        if gw_proc is not None:
            assert helpers.stop(gw_proc, 30) == 0
        for p in pools:
            p.stop()


LOAD_S = 20


def _interleaved_load(url: str, refs: dict, seconds: float) -> dict[str, int]:
    """Two clients per model, each sending greedy requests back to back for `seconds`:
    an A/B interleaved load. Answers per model; every one checked against plain vLLM's."""
    answers = {m: 0 for m in refs}
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def client(m: str, k: int) -> None:
        while time.monotonic() < stop and not errors:
            try:
                (got,) = helpers.greedy(url, m, [helpers.PROMPTS[k]])
                assert got == refs[m][k], f"{m} prompt {k}: {got} != {refs[m][k]}"
                answers[m] += 1
            except Exception as e:  # noqa: BLE001 - collected: asserted empty
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(m, k)) for m in refs for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return answers


def test_the_grouped_queue_cuts_swaps_on_one_slot(model_a, model_b, reference, logs,
                                                  tmp_path):
    """One slot, two models, an interleaved A/B load through the gateway, twice on the same
    pool: without grouping (`--gateway-max-turn 0 --gateway-linger 0`: a holder gives way as
    soon as the other model waits) and with it (turns of 4 s). Swaps are the instances
    brought up (scale-ups: every swap brings one model's instance up). Grouped: at most
    half the swaps, both models served (no starvation), plain vLLM's tokens throughout."""
    refs = {"qa": reference(model_a, 1), "qb": reference(model_b, 1)}
    pool = _pool(logs, 0, tag="-queue", extra=("--enable-parking",))
    models = _models_file(tmp_path, qa=model_a, qb=model_b)
    swaps, served = {}, {}
    try:
        pool.wait_ready()
        for tag, policy in (("ungrouped", ("--gateway-max-turn", "0", "--gateway-linger", "0")),
                            ("grouped", ("--gateway-max-turn", "4", "--gateway-linger", "1"))):
            gw_proc, url = _gateway(logs, f"-{tag}", [pool], models, policy)
            try:
                served[tag] = _interleaved_load(url, refs, LOAD_S)
                swaps[tag] = sum(_metric(url, "vllm_pool_gateway_scale_ups_total", model=m)
                                 for m in refs)
            finally:
                assert helpers.stop(gw_proc, 30) == 0
            for inst in pool.instances():  # the next run starts from an empty pool
                assert pool.detach(inst["id"]).status_code == 200
        print(f"swaps over {LOAD_S}s: {swaps}; answers: {served}")
        assert all(n > 0 for s in served.values() for n in s.values()), served
        assert swaps["ungrouped"] >= 4, swaps  # the load does interleave
        assert 2 * swaps["grouped"] <= swaps["ungrouped"], swaps
    finally:
        pool.stop()
