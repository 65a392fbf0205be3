"""The pools behind one gateway (typically one per node), and where a new instance goes.

`PoolSet` holds one pool view per pool (`pool_view.LocalPool` in the daemon, else a
`RemotePool` per URL), refreshes their snapshots together, and follows the URLs a
`discovery.Discovery` gives (flags, a file, DNS). A pool whose snapshot fails is *down*:
the router routes around its instances and places nothing there until it answers again.
The gateway keeps no state of its own: what runs is what the pools say, so a restarted
gateway adopts what all its pools run, by name.

Placement of a new instance, in this order (`placement_order`):
1. a pool where the model is parked: wake it there (never attached elsewhere);
2. a pool with free workers that has run this model, then one that has run its
   architecture (compile cache warm, weights in the page cache);
3. a pool with free workers;
4. a pool where an idle instance can be evicted.
Within a tier: the pool with fewer replicas of the model first (spread), then the order the
pools were given.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger("vllm_pool.gateway")


class Tier(enum.IntEnum):
    WAKE = 0        # parked there
    WARM_MODEL = 1  # free workers; ran this model
    WARM_ARCH = 2   # free workers; ran its architecture
    FREE = 3        # free workers
    EVICT = 4       # an idle instance can be evicted there


@dataclass(frozen=True)
class Candidate:
    pool: str            # the pool's key
    index: int           # its place in the pool list
    tier: Tier
    replicas_here: int   # replicas of the model already on it


def tier_of(parked: bool, free: bool, ran_model: bool, ran_arch: bool,
            evictable: bool) -> Tier | None:
    """A pool's tier for a new instance of a model; None: it cannot take one now."""
    if parked:
        return Tier.WAKE
    if free:
        return Tier.WARM_MODEL if ran_model else Tier.WARM_ARCH if ran_arch else Tier.FREE
    return Tier.EVICT if evictable else None


def placement_order(cands: list[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (c.tier, c.replicas_here, c.index))


@functools.lru_cache(maxsize=256)
def arch_of(model: str) -> str | None:
    """The model's architecture from its config.json when the path is readable here (pools
    on other nodes usually mount the same path); None otherwise."""
    try:
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return archs[0] if archs and isinstance(archs[0], str) else None


@dataclass
class PoolMember:
    key: str
    view: object                                  # a pool_view.PoolView
    index: int = 0
    ran: set[str] = field(default_factory=set)    # models and architectures attached there
    was_up: bool | None = None

    @property
    def up(self) -> bool:
        return self.view.down_reason is None

    def note_ran(self, model: str) -> None:
        self.ran.add(model)
        arch = arch_of(model)
        if arch:
            self.ran.add("arch:" + arch)

    def has_run(self, model: str) -> tuple[bool, bool]:
        arch = arch_of(model)
        return model in self.ran, bool(arch) and ("arch:" + arch) in self.ran


class PoolSet:
    """The gateway's pools. `make_view(url)` builds the view of a pool found later by
    `discover()` (a URL list); views given at construction are kept as they are."""

    def __init__(self, views: dict[str, object], discover: Callable[[], list[str]] | None = None,
                 make_view: Callable[[str], object] | None = None):
        self.members: dict[str, PoolMember] = {}
        for k, v in views.items():
            self._add(k, v)
        self._discover = discover
        self._make_view = make_view
        self._exec = ThreadPoolExecutor(max_workers=16, thread_name_prefix="PoolRefresh")
        self.removed: list[str] = []  # keys dropped by the last refresh (the router forgets them)

    def _add(self, key: str, view) -> PoolMember:
        m = PoolMember(key, view, index=len(self.members))
        self.members[key] = m
        return m

    @property
    def single(self) -> bool:
        return len(self.members) == 1 and self._discover is None

    def get(self, key: str) -> PoolMember | None:
        return self.members.get(key)

    def up(self) -> list[PoolMember]:
        return [m for m in self.members.values() if m.up]

    @property
    def down_reason(self) -> str | None:
        """None while at least one pool answers."""
        if any(m.up for m in self.members.values()):
            return None
        if not self.members:
            return "no pool found yet"
        return "; ".join(f"{m.key}: {m.view.down_reason}" for m in self.members.values())

    def refresh(self) -> None:
        """Follow discovery, then refresh every pool's snapshot at once (one slow pool does
        not hold the others up by more than its own call)."""
        self.removed = []
        if self._discover is not None and self._make_view is not None:
            try:
                urls = self._discover()
            except Exception as e:  # a resolver or file error keeps the pools we have
                logger.warning("pool discovery failed: %s", e)
                urls = None
            if urls is not None:
                for u in urls:
                    if u not in self.members:
                        logger.info("pool %s found", u)
                        self._add(u, self._make_view(u))
                for k in [k for k in self.members if k not in urls]:
                    logger.info("pool %s is no longer listed", k)
                    del self.members[k]
                    self.removed.append(k)
        members = list(self.members.values())
        list(self._exec.map(lambda m: m.view.refresh(), members))
        for m in members:
            up = m.up
            if up != m.was_up and m.was_up is not None:
                if up:
                    logger.info("pool %s answers again", m.key)
                else:
                    logger.warning("pool %s is down: %s", m.key, m.view.down_reason)
            m.was_up = up

    def close(self) -> None:
        self._exec.shutdown(wait=False)
