"""messages.py: what crosses a process survives the trip."""

from __future__ import annotations

from vllm_pool import messages


def test_messages_round_trip():
    line = messages.encode(messages.Lease(instance_id="i", token="t"))
    assert messages.decode_command(line) == messages.Lease(instance_id="i", token="t")
    for ev in (messages.Serving(pid=3, instance_id="i", phases={"x": 1.0}),
               messages.Idle(pid=3, memory_bytes=5, baseline_bytes=4, start_s=1.5),
               messages.Failed(pid=3, error="unclean")):
        assert messages.decode_event(messages.encode(ev)) == ev
    lease = messages.LeaseInfo("i", "t", "ab", [messages.WorkerAddress(0, "cpu:0", "/s")])
    assert messages.LeaseInfo.from_json(lease.to_json()) == lease
