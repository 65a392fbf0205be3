"""Prometheus metrics of the gateway, in a registry of its own (not the process-global
one, so a second gateway in one process, as in tests, does not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

# Attach phases run from milliseconds (reserve) to minutes (a large model's weight load).
_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120,
                  300, 600)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vllm_pool_gateway_requests", "Requests by model and HTTP "
                                "status", ["model", "status"], registry=r)
        self.queue_depth = Gauge("vllm_pool_gateway_queue_depth", "Requests waiting for "
                                 "their model to be attached", ["model"], registry=r)
        self.in_flight = Gauge("vllm_pool_gateway_in_flight", "Requests being served",
                               ["model"], registry=r)
        self.attaches = Counter("vllm_pool_gateway_attaches", "Attaches started by the "
                                "gateway, by outcome (ok, failed)", ["model", "outcome"],
                                registry=r)
        self.attach_phase = Histogram("vllm_pool_gateway_attach_phase_seconds", "Attach "
                                      "latency per phase (the pool's Instance.phases)",
                                      ["phase"], buckets=_PHASE_BUCKETS, registry=r)
        self.evictions = Counter("vllm_pool_gateway_evictions", "Instances the gateway "
                                 "detached, by reason (lru: room for another model, ttl: "
                                 "idle)", ["model", "reason"], registry=r)
        self.replicas = Gauge("vllm_pool_gateway_replicas", "Serving replicas of the model "
                              "(over all pools)", ["model"], registry=r)
        self.scale_ups = Counter("vllm_pool_gateway_scale_ups", "Instances brought up, by "
                                 "reason (cold: requests waited and it had none; load: "
                                 "in flight over target_in_flight per replica; min; "
                                 "preload)", ["model", "reason"], registry=r)
        self.scale_downs = Counter("vllm_pool_gateway_scale_downs", "Replicas removed, by "
                                   "reason (ttl, lru, wake: evicted by the gateway; "
                                   "pool_down, pool_removed, gone: lost)", ["model", "reason"],
                                   registry=r)
        self.pool_up = Gauge("vllm_pool_gateway_pool_up", "1 while the pool answers",
                             ["pool"], registry=r)
        self.model_state = Gauge("vllm_pool_gateway_model_state", "1 for the model's current "
                                 "state", ["model", "state"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
