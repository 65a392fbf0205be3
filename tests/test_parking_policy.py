"""daemon/parking.py's pure rules: the budget and the settings key (the end-to-end parking
tests are test_parking.py)."""

from __future__ import annotations


def test_park_budget_detaches_least_recently_used_first():
    from vllm_pool.daemon.parking import Parked, over_budget

    ps = [Parked("new", 300, 30.0), Parked("old", 300, 10.0), Parked("mid", 300, 20.0)]
    assert over_budget(ps, 1000) == []
    assert over_budget(ps, 600) == ["old"]
    assert over_budget(ps, 100) == ["old", "mid", "new"]


def test_parking_settings_key_and_engine_args():
    from vllm_pool.daemon.parking import engine_args, settings_key

    k = settings_key("m", 1, 1, ["--dtype", "float32"], {}, None)
    assert k == settings_key("m", 1, 1, ["--dtype", "float32"], {}, None)
    assert k != settings_key("m", 1, 1, ["--dtype", "bfloat16"], {}, None)
    assert k != settings_key("m", 2, 1, ["--dtype", "float32"], {}, None)
    assert engine_args(["--x"], on_gpu=True) == ["--x", "--enable-sleep-mode"]
    assert engine_args(["--x"], on_gpu=False) == ["--x"]
