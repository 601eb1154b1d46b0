"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    """Read at scrape time from the engine's public counters: queue depth, running requests, slot loads, evictions,
    hits (slot acquisitions that found the delta loaded) and misses (acquisitions that loaded it)."""

    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        engine, runner = self.server.engine, self.server.runner
        slots = getattr(engine, "slots", None)
        loads = int(getattr(slots, "loads", 0))
        evictions = int(getattr(slots, "evictions", 0))
        g = GaugeMetricFamily("deltatune_queue_depth", "Requests waiting for admission")
        g.add_metric([], len(getattr(engine, "waiting", ())) + runner.pending)
        yield g
        g = GaugeMetricFamily("deltatune_running_requests", "Requests running (prefilled, decoding)")
        g.add_metric([], len(getattr(engine, "running", ())))
        yield g
        g = GaugeMetricFamily("deltatune_registered_deltas", "Deltas registered")
        g.add_metric([], len(self.server.delta_names()))
        yield g
        c = CounterMetricFamily("deltatune_slot_misses", "Slot acquisitions that loaded the delta into a slot")
        c.add_metric([], loads)
        yield c
        c = CounterMetricFamily("deltatune_slot_hits", "Slot acquisitions that found the delta already loaded")
        c.add_metric([], max(0, runner.delta_admissions - loads))
        yield c
        c = CounterMetricFamily("deltatune_slot_loads", "Deltas copied into a device slot")
        c.add_metric([], loads)
        yield c
        c = CounterMetricFamily("deltatune_slot_evictions", "Deltas evicted from a device slot")
        c.add_metric([], evictions)
        yield c
        for name, help_, value in (
                ("deltatune_kv_arena_bytes", "Bytes of the KV arena (grows to about twice the longest live span)",
                 getattr(getattr(engine, "arena", None), "nbytes", 0)),
                ("deltatune_slot_bank_bytes", "Bytes of the preallocated device slot banks",
                 getattr(getattr(engine, "banks", None), "nbytes", 0)),
                ("deltatune_host_cache_bytes", "Bytes of delta factors in the host cache",
                 getattr(getattr(engine, "pool", None), "host_used", 0))):
            g = GaugeMetricFamily(name, help_)
            g.add_metric([], int(value))
            yield g


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deltatune_requests", "Requests by model (base or delta) and outcome",
                                ["model", "status"], registry=r)
        self.tokens = Counter("deltatune_tokens", "Tokens by model and kind (prompt, completion)",
                              ["model", "kind"], registry=r)
        self.adapter_loads = Counter("deltatune_delta_loads", "Hot loads over HTTP by outcome", ["status"], registry=r)
        self.adapter_unloads = Counter("deltatune_delta_unloads", "Hot unloads over HTTP", registry=r)
        self.load_latency = Histogram("deltatune_delta_load_seconds", "Hot load latency (validate, register, "
                                      "copy into a slot)", buckets=_LATENCY, registry=r)
        self.ttft = Histogram("deltatune_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=_LATENCY, registry=r)
        self.inflight = Gauge("deltatune_http_requests_in_flight", "Generation requests being answered", registry=r)

    def attach(self, server) -> None:
        self.registry.register(_EngineCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)
