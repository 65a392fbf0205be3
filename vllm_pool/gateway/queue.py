"""Grouped queue: a contended device serves waiting requests model by model.

When several models take turns on one device, each swap costs a detach (or park) and an
attach (or wake): seconds. Requests that wait are therefore served by group: the model on
the device keeps it while its own requests keep coming, and the others' requests wait and
then go together: A A A, then B B, not A B A B with a swap each time.

The rules (pure; the router applies them to each replica, i.e. each device holder):

- *linger*: an idle holder (no request in flight) is not evicted for a waiting model until
  it has been idle `linger_s`, so that its next request, which in a busy group comes at
  once, does not cost two swaps;
- *turn*: a device is *contended* from the moment another model waits for it (the oldest
  such wait). From then on the holder admits new requests for at most `max_turn_s`; after
  that its new requests wait too, its in-flight requests finish, and it is evicted even
  if its own requests wait;
- *order*: of the models waiting for room, the one whose oldest request waits longest
  goes first; a model that came later does not take the device from it.

Bound against starvation: a request that waits for a contended device gets it after at
most, for each model ahead of it in the order (at most the number of models that share
the device, less one), `max_turn_s` + that model's longest request + one swap. A group
keeps the device while others wait for no more than `max_turn_s` + its longest request.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupPolicy:
    max_turn_s: float = 30.0  # a holder admits new requests this long once contended
    linger_s: float = 1.0     # an idle holder keeps the device this long for its next request


def turn_over(since: float, contended_since: float | None, now: float,
              p: GroupPolicy) -> bool:
    """The holder (serving since `since`) has had its turn: others have waited for its
    device since `contended_since`, and `max_turn_s` has passed since the later of the two."""
    if contended_since is None:
        return False
    return now - max(since, contended_since) >= p.max_turn_s


def admits(since: float, contended_since: float | None, now: float, p: GroupPolicy) -> bool:
    """The holder takes a new request now (else the request waits for the next turn)."""
    return not turn_over(since, contended_since, now, p)


def may_evict(in_flight: int, owner_waiting: int, last_used: float, since: float,
              contended_since: float | None, now: float, p: GroupPolicy) -> bool:
    """The holder can be evicted for a waiting model: nothing in flight, and either its turn
    is over or it has no request waiting and has lingered `linger_s` idle."""
    if in_flight:
        return False
    if turn_over(since, contended_since, now, p):
        return True
    return owner_waiting == 0 and now - last_used >= p.linger_s


def first_in_line(waiting_since: dict[str, float]) -> str | None:
    """Of the models waiting for room (name -> arrival of its oldest waiting request), the
    one to serve first; ties by name, so every caller agrees."""
    return min(waiting_since, key=lambda n: (waiting_since[n], n), default=None)
