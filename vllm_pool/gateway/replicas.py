"""Replicas of one model: the record of each, and the pure rules the router applies to them.

A model's entry may ask for several instances (`replicas: {min, max}`, `target_in_flight`),
on one pool or several. The router keeps one `Replica` per instance it routes to; these
functions decide which replica takes a request, when one more is wanted, and which idle
ones go. They read numbers only, so they are tested without a pool or an engine.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class ReplicaState(str, enum.Enum):
    SERVING = "serving"
    EVICTING = "evicting"  # being parked or detached: takes no new request


@dataclass
class Replica:
    """One serving instance of a model, on one pool."""

    pool: str                 # the pool's key (its URL; "local" for the daemon's own)
    instance: Any             # the pool's Instance, or a pool_view.RemoteInstance
    state: ReplicaState = ReplicaState.SERVING
    in_flight: int = 0
    since: float = field(default_factory=time.monotonic)   # serving since
    last_used: float = field(default_factory=time.monotonic)
    lost: Any = None          # the router's asyncio.Future, done when the replica is lost

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool, self.instance.id)

    @property
    def serving(self) -> bool:
        return self.state == ReplicaState.SERVING


def pick(replicas: list[Replica]) -> Replica | None:
    """The serving replica with the fewest requests in flight; ties to the one used least
    recently, so equal replicas share the load."""
    live = [r for r in replicas if r.serving]
    return min(live, key=lambda r: (r.in_flight, r.last_used), default=None)


def wants_more(waiting: int, in_flight: int, replicas: int, starting: bool, target: int,
               max_replicas: int) -> bool:
    """One more replica is wanted when the model's waiting plus in-flight requests are more
    than `target` per replica, below `max_replicas`, and none is starting (one at a time).
    A model without any replica is not scaled up here: its first instance is the bring-up
    of a cold model."""
    if starting or replicas == 0 or replicas >= max_replicas:
        return False
    return waiting + in_flight > target * replicas


def may_take(free_after: int, starving_need: int) -> bool:
    """A replica beyond the first may take devices only if what stays free still covers the
    models that have requests waiting and no instance (their `tp` summed): a replica never
    takes the last free devices from such a model."""
    return starving_need == 0 or free_after >= starving_need


def to_remove(replicas: list[Replica], min_replicas: int, ttl: float | None,
              now: float) -> list[Replica]:
    """Idle serving replicas to remove: none in flight and unused for `ttl` seconds, the
    least recently used first, never taking the model below `min_replicas`. No ttl: none."""
    if not ttl:
        return []
    live = [r for r in replicas if r.serving]
    spare = len(live) - min_replicas
    idle = sorted((r for r in live if r.in_flight == 0 and now - r.last_used >= ttl),
                  key=lambda r: r.last_used)
    return idle[:max(spare, 0)]
