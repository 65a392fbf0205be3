"""gateway/replicas.py's rules and the models file's replica fields (pure)."""

from __future__ import annotations

import types

import pytest

from vllm_pool.gateway import replicas
from vllm_pool.gateway.models_file import ModelsFileError, parse
from vllm_pool.gateway.replicas import Replica, ReplicaState


def _r(pool: str, in_flight: int = 0, last_used: float = 0.0, state=ReplicaState.SERVING):
    return Replica(pool, types.SimpleNamespace(id=pool), state=state, in_flight=in_flight,
                   last_used=last_used)


def test_pick_fewest_in_flight_then_least_recent_serving_only():
    rs = [_r("a", 2), _r("b", 1, last_used=5), _r("c", 1, last_used=3),
          _r("d", 0, state=ReplicaState.EVICTING)]
    assert replicas.pick(rs).pool == "c"
    assert replicas.pick([_r("d", 0, state=ReplicaState.EVICTING)]) is None


def test_wants_more_one_at_a_time_below_max_over_target():
    assert replicas.wants_more(0, 3, 1, False, 2, 3)
    assert not replicas.wants_more(0, 2, 1, False, 2, 3)       # at target, not over
    assert not replicas.wants_more(0, 9, 1, True, 2, 3)        # one is starting
    assert not replicas.wants_more(0, 9, 3, False, 2, 3)       # at max
    assert not replicas.wants_more(5, 0, 0, False, 2, 3)       # cold: the bring-up's job
    assert replicas.wants_more(2, 3, 2, False, 2, 3)           # waiting counts too


def test_may_take_keeps_devices_for_starving_models():
    assert replicas.may_take(0, 0)
    assert not replicas.may_take(0, 1)
    assert replicas.may_take(2, 2) and not replicas.may_take(1, 2)


def test_to_remove_idle_above_min_lru_first():
    rs = [_r("a", 0, last_used=1), _r("b", 0, last_used=0), _r("c", 1, last_used=0)]
    assert [r.pool for r in replicas.to_remove(rs, 0, 5, now=10)] == ["b", "a"]
    assert [r.pool for r in replicas.to_remove(rs, 2, 5, now=10)] == ["b"]
    assert replicas.to_remove(rs, 0, None, now=10) == []      # no ttl: kept
    assert replicas.to_remove(rs, 0, 20, now=10) == []        # not idle long enough


def test_models_file_replicas_fields_and_names():
    (e,) = parse("models:\n  - name: q\n    model: /q\n    replicas: {min: 1, max: 3}\n"
                 "    target_in_flight: 4\n")
    assert (e.replicas.min, e.replicas.max, e.target_in_flight) == (1, 3, 4)
    assert e.replica_names() == ["q", "q.r2", "q.r3"]
    (d,) = parse("models:\n  - name: q\n    model: /q\n")
    assert (d.replicas.min, d.replicas.max, d.replica_names()) == (0, 1, ["q"])


@pytest.mark.parametrize("body, where", [
    ("    replicas: {min: 3, max: 2}\n", "field 'replicas'"),
    ("    replicas: {max: 0}\n", "field 'replicas.max'"),
    ("    replicas: {mx: 2}\n", "field 'replicas.mx'"),
    ("    target_in_flight: 0\n", "field 'target_in_flight'"),
])
def test_models_file_refuses_bad_replicas(body, where):
    with pytest.raises(ModelsFileError, match=where):
        parse("models:\n  - name: q\n    model: /q\n" + body)


def test_models_file_refuses_a_name_that_is_another_entrys_replica_name():
    with pytest.raises(ModelsFileError, match="replica name of entry 'q'"):
        parse("models:\n  - name: q\n    model: /q\n    replicas: {max: 2}\n"
              "  - name: q.r2\n    model: /q\n")
