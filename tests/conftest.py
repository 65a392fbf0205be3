"""Session fixtures: the tiny models, one shared 2-slot CPU pool, plain-vLLM references.

One pool serves all the end-to-end tests (each leaves it idle again), which keeps the
suite inside CI's time on two cores while every test still drives real processes.
"""

from __future__ import annotations

import os

import pytest

from tests import helpers

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# An illegal state transition raises in the daemons the tests start (states.py).
os.environ.setdefault("VLLM_POOL_STRICT_STATES", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CACHE = os.environ.get("VLLM_POOL_TEST_MODELS", os.path.join(ROOT, ".cache", "models"))


@pytest.fixture(scope="session")
def model_a() -> str:
    from vllm_pool.testing.tiny_model import build_model

    return build_model(os.path.join(MODEL_CACHE, "tiny-a"), seed=0)


@pytest.fixture(scope="session")
def model_b() -> str:
    """A different model: other weights and fewer layers."""
    from vllm_pool.testing.tiny_model import build_model

    return build_model(os.path.join(MODEL_CACHE, "tiny-b"), seed=1, num_layers=2)


@pytest.fixture(scope="session")
def model_a_ft() -> str:
    """A "fine-tune" of A: A's config and tokenizer, other weights, another directory."""
    from vllm_pool.testing.tiny_model import build_model

    return build_model(os.path.join(MODEL_CACHE, "tiny-a-ft"), seed=3)


@pytest.fixture(scope="session")
def logs(tmp_path_factory) -> str:
    d = os.environ.get("VLLM_POOL_TEST_LOGS") or str(tmp_path_factory.mktemp("logs"))
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def pool(logs, model_a, model_b):
    d = helpers.Daemon(2, os.path.join(logs, "pool"))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def reference(model_a, model_b, logs):
    """Greedy outputs of plain vLLM, computed once per (model, TP)."""
    cache: dict = {}

    def get(model: str, tp: int = 1, args: tuple[str, ...] | None = None):
        key = (model, tp, args)
        if key not in cache:
            with helpers.plain_vllm(model, tp, os.path.join(logs, f"plain-tp{tp}.log"),
                                    list(args) if args else None) as url:
                cache[key] = helpers.greedy(url, model)
        return cache[key]

    return get


@pytest.fixture
def idle_pool(pool):
    """The shared pool, checked idle before the test and detached-all after it."""
    pool.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 180)
    yield pool
    for inst in pool.instances():
        pool.detach(inst["id"])
    pool.wait_workers(lambda ws: all(w["state"] == "idle" for w in ws), 180)
