"""gateway/queue.py: the grouped queue's rules (pure)."""

from __future__ import annotations

from vllm_pool.gateway import queue
from vllm_pool.gateway.queue import GroupPolicy

P = GroupPolicy(max_turn_s=10, linger_s=1)


def test_turn_counts_from_contention_or_serving_whichever_later():
    assert not queue.turn_over(since=0, contended_since=None, now=100, p=P)  # no one waits
    assert not queue.turn_over(since=0, contended_since=95, now=100, p=P)
    assert queue.turn_over(since=0, contended_since=90, now=100, p=P)
    assert not queue.turn_over(since=95, contended_since=80, now=100, p=P)  # its turn is new
    assert queue.admits(0, 95, 100, P) and not queue.admits(0, 90, 100, P)


def test_may_evict_linger_then_turn():
    # In flight: never.
    assert not queue.may_evict(1, 0, last_used=0, since=0, contended_since=0, now=100, p=P)
    # Idle, used a moment ago, its turn not over: it keeps the device.
    assert not queue.may_evict(0, 0, last_used=99.5, since=95, contended_since=95, now=100,
                               p=P)
    # Lingered long enough.
    assert queue.may_evict(0, 0, last_used=98, since=95, contended_since=95, now=100, p=P)
    # Its own requests wait (it was out of turn): evicted only once the turn is over.
    assert not queue.may_evict(0, 2, last_used=90, since=95, contended_since=95, now=100,
                               p=P)
    assert queue.may_evict(0, 2, last_used=99.9, since=0, contended_since=80, now=100, p=P)


def test_first_in_line_oldest_wait_then_name():
    assert queue.first_in_line({"b": 5.0, "a": 7.0}) == "b"
    assert queue.first_in_line({"b": 5.0, "a": 5.0}) == "a"
    assert queue.first_in_line({}) is None
