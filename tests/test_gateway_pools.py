"""gateway/pools.py's placement order and gateway/discovery.py's sources (pure)."""

from __future__ import annotations

import json

import pytest

from vllm_pool.gateway import discovery, pools
from vllm_pool.gateway.pools import Candidate, Tier


def test_tier_order_wake_warm_free_evict():
    t = pools.tier_of
    assert t(True, False, False, False, False) == Tier.WAKE
    assert t(False, True, True, True, False) == Tier.WARM_MODEL
    assert t(False, True, False, True, False) == Tier.WARM_ARCH
    assert t(False, True, False, False, True) == Tier.FREE
    assert t(False, False, True, True, True) == Tier.EVICT
    assert t(False, False, True, True, False) is None


def test_placement_order_tier_then_spread_then_pool_order():
    cands = [Candidate("p0", 0, Tier.FREE, 0), Candidate("p1", 1, Tier.WARM_MODEL, 1),
             Candidate("p2", 2, Tier.WARM_MODEL, 0), Candidate("p3", 3, Tier.EVICT, 0),
             Candidate("p4", 4, Tier.WAKE, 3)]
    assert [c.pool for c in pools.placement_order(cands)] == ["p4", "p2", "p1", "p0", "p3"]


def test_member_remembers_model_and_architecture(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"architectures": ["LlamaX"]}))
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"architectures": ["LlamaX"]}))
    m = pools.PoolMember("p", view=None)
    m.note_ran(str(tmp_path / "a"))
    assert m.has_run(str(tmp_path / "a")) == (True, True)
    assert m.has_run(str(tmp_path / "ft")) == (False, True)  # same architecture
    assert m.has_run("/nowhere") == (False, False)


def test_pools_file_and_dns_sources(tmp_path):
    f = tmp_path / "pools.txt"
    f.write_text("# nodes\nhttp://10.0.0.1:8100/\n10.0.0.2:8100  # no scheme\n\n")
    records = {"pool.ns": ["10.0.0.3", "10.0.0.2"]}
    clock = [0.0]
    d = discovery.Discovery(["http://10.0.0.1:8100"], str(f), "pool.ns:8100",
                            dns_every_s=5, resolve=lambda n, p: records[n],
                            clock=lambda: clock[0])
    assert d.urls() == ["http://10.0.0.1:8100", "http://10.0.0.2:8100",
                        "http://10.0.0.3:8100"]
    f.write_text("http://10.0.0.9:8100\n")  # re-read on change
    records["pool.ns"] = ["10.0.0.4"]       # re-resolved only after dns_every_s
    assert d.urls() == ["http://10.0.0.1:8100", "http://10.0.0.9:8100",
                        "http://10.0.0.3:8100", "http://10.0.0.2:8100"]
    clock[0] = 6.0
    assert d.urls()[-1] == "http://10.0.0.4:8100" and len(d.urls()) == 3


def test_dns_spec_checked():
    assert discovery.parse_dns("pools.default.svc:8100") == ("pools.default.svc", 8100)
    for bad in ("pools", "pools:", ":8100", "pools:99999"):
        with pytest.raises(ValueError):
            discovery.parse_dns(bad)


def test_poolset_follows_discovery():
    class View:
        def __init__(self, url):
            self.url, self.down_reason, self.refreshed = url, None, 0

        def refresh(self):
            self.refreshed += 1

    urls = ["http://a", "http://b"]
    ps = pools.PoolSet({}, discover=lambda: list(urls), make_view=View)
    ps.refresh()
    a = ps.get("http://a").view
    assert list(ps.members) == urls and a.refreshed == 1
    urls[:] = ["http://a", "http://c"]
    ps.refresh()
    assert list(ps.members) == ["http://a", "http://c"] and ps.removed == ["http://b"]
    assert ps.get("http://a").view is a and a.refreshed == 2  # kept, not rebuilt
    ps.get("http://c").view.down_reason = "refused"
    assert ps.down_reason is None and [m.key for m in ps.up()] == ["http://a"]
    a.down_reason = "refused"
    assert "http://c: refused" in ps.down_reason
    ps.close()
