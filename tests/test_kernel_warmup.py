"""daemon/kernel_warmup.py: the warm-up attach's mode and engine arguments."""

from __future__ import annotations

from vllm_pool import messages


def test_kernel_warmup_mode_and_engine_args():
    from vllm_pool.daemon import kernel_warmup as kw

    assert kw.resolve_mode("auto", on_gpu=True) == "compiled"
    assert kw.resolve_mode("auto", on_gpu=False) == "off"
    assert kw.resolve_mode("eager", on_gpu=False) == "eager"
    gpu, cpu = kw.engine_args("compiled", True), kw.engine_args("eager", False)
    assert "--enforce-eager" not in gpu and "--enforce-eager" in cpu
    assert gpu[gpu.index("--dtype") + 1] == "bfloat16" and "--dtype" not in cpu
    # vLLM's warm-up sizes its dummy batch from these: the user's defaults must apply.
    assert not {"--max-num-seqs", "--max-num-batched-tokens"} & set(gpu)
    # The warm-up lease tells the worker to measure its idle footprint afterwards.
    lease = messages.decode_command(messages.encode(messages.Lease("i", "t", kernel_warmup=True)))
    assert lease.kernel_warmup is True
    assert messages.decode_command(messages.encode(messages.Lease("i", "t"))).kernel_warmup \
        is False
