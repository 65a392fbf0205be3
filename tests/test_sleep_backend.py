"""worker/sleep_backend.py: where the kept-copy park backend is chosen."""

from __future__ import annotations


def test_sleep_backend_chosen_only_where_weights_stay_read_only():
    """The kept-copy park backend registers in vLLM's sleep-mode registry, and an engine
    gets it only with sleep mode on, vLLM's default backend, no LoRA, no computed KV scales."""
    from types import SimpleNamespace as NS

    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    from vllm_pool import compat
    from vllm_pool.worker import sleep_backend

    reg = (sleep_backend.NAME, sleep_backend.__name__, sleep_backend.KeptCopyBackend.__name__)
    assert compat.register_sleep_backend(*reg) and compat.register_sleep_backend(*reg)  # idempotent
    assert SleepModeBackendFactory.get_backend_class(sleep_backend.NAME) \
        is sleep_backend.KeptCopyBackend

    def cfg(sleep=True, backend="cumem", lora=None, kv_scales=False):
        return NS(model_config=NS(enable_sleep_mode=sleep, sleep_mode_backend=backend),
                  lora_config=lora, cache_config=NS(calculate_kv_scales=kv_scales))

    c = cfg()
    assert compat.choose_sleep_backend(c, sleep_backend.NAME) == sleep_backend.NAME
    assert c.model_config.sleep_mode_backend == sleep_backend.NAME
    for c in (cfg(sleep=False), cfg(backend="other"), cfg(lora=object()),
              cfg(kv_scales=True)):
        before = c.model_config.sleep_mode_backend
        assert compat.choose_sleep_backend(c, sleep_backend.NAME) is None
        assert c.model_config.sleep_mode_backend == before
