"""daemon/pool.py outside its state machine (that is test_pool_states.py): the workers'
spawn environment."""

from __future__ import annotations


def test_workers_share_one_triton_cache_unless_the_pool_sets_one(tmp_path, monkeypatch):
    """Every worker process gets one fixed TRITON_CACHE_DIR at spawn (compat.worker_cache_env
    says why); a directory set in the pool's own environment is left as it is."""
    from vllm_pool.daemon.pool import Pool, PoolConfig

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    pool = Pool(PoolConfig(devices=["cpu:0", "cuda:0"], visible_devices="0",
                           run_dir=str(tmp_path / "r"), log_dir=str(tmp_path / "l")))
    want = str(tmp_path / ".triton" / "cache")
    assert {w.spawn_env.get("TRITON_CACHE_DIR") for w in pool.workers.values()} == {want}
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    assert "TRITON_CACHE_DIR" not in pool.new_worker("cuda:0").spawn_env  # inherited as it is
