"""worker/reset.py: a leaked tensor is reported with the chain that holds it."""

from __future__ import annotations


def test_referrer_chain_names_the_holder():
    import torch

    from vllm_pool.worker.leak_report import describe_live_tensors, referrer_chain

    class Runner:
        pass

    r = Runner()
    r.kv_caches = [torch.zeros(1000)]
    chain = referrer_chain(r.kv_caches[0])
    assert chain.startswith("list") and "Runner.kv_caches" in chain, chain
    assert "Runner" in describe_live_tensors(torch.device("cpu"), top=1)
