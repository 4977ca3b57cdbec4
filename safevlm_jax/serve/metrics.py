"""Prometheus metrics of one server (its own registry, so several apps in a process never mix).

    safevlm_requests_total{endpoint, status}      HTTP answers by endpoint and status code
                                                  (499: the client went away mid-answer)
    safevlm_finish_reasons_total{reason}          chat outcomes: stop, length, blocked, cancelled, error
    safevlm_queue_depth, safevlm_active_slots     the engine, read at scrape time
    safevlm_generated_tokens_total                every generated token (rate() = tokens/s)
    safevlm_tokens_per_second                     the engine's rate over the last 10 s
    safevlm_time_to_first_token_seconds           histogram: request arrival -> first text
    safevlm_request_latency_seconds{endpoint}     histogram: arrival -> last byte
    safevlm_verdicts_total{level, type}           safety verdicts, by level and type name
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from safevlm_jax.safety.taxonomy import RISK_LEVELS
from safevlm_jax.safety.verdict import Verdict

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """`stats()` is the engine's `stats()` (an `EngineStats`: queue_depth, active_slots, ...)."""

    def __init__(self, stats: Callable[[], Any]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("safevlm_requests", "HTTP answers by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.finish_reasons = Counter("safevlm_finish_reasons", "chat completions by outcome",
                                      ["reason"], registry=self.registry)
        self.ttft = Histogram("safevlm_time_to_first_token_seconds",
                              "seconds from request arrival to the first answer text",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("safevlm_request_latency_seconds", "seconds from arrival to the end",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.verdicts = Counter("safevlm_verdicts", "safety verdicts by risk level and type",
                                ["level", "type"], registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def verdict(self, verdict: Verdict | None) -> None:
        if verdict is not None:
            self.verdicts.labels(RISK_LEVELS[verdict.risk_level], verdict.risk_type_name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's `stats()` at each scrape."""

    def __init__(self, stats: Callable[[], Any]):
        self.stats = stats

    def describe(self):
        return []  # unknown until the first scrape; keeps registration from calling stats()

    def collect(self):
        stats = self.stats()
        yield GaugeMetricFamily("safevlm_queue_depth", "requests waiting for a slot",
                                value=stats.queue_depth)
        yield GaugeMetricFamily("safevlm_active_slots", "slots decoding now", value=stats.active_slots)
        yield CounterMetricFamily("safevlm_generated_tokens", "tokens generated",
                                  value=stats.tokens_generated)
        yield GaugeMetricFamily("safevlm_tokens_per_second", "generated tokens/s over the last 10 s",
                                value=stats.tokens_per_s)
