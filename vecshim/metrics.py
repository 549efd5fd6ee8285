"""Prometheus metrics, correct across gunicorn workers (multiprocess mode).

`vecshim serve` sets PROMETHEUS_MULTIPROC_DIR before any worker starts, so
every worker writes its samples to files that `/metrics` aggregates.
"""
from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__

__all__ = ["Stats", "CONTENT_TYPE_LATEST", "multiprocess_dir"]

MODEL_STATES = ("loading", "ready", "failed")
CIRCUIT_STATES = ("closed", "half-open", "open")
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def multiprocess_dir() -> str | None:
    """The multiprocess directory, when running under several workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Stats:
    """All vecshim metrics on one registry (one per app, so tests stay isolated)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("vecshim_requests", "HTTP requests", ["route", "model", "status"], registry=r)
        self.latency = Histogram("vecshim_request_seconds", "HTTP request latency", ["route", "model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vecshim_batch_size", "Texts per gathered batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_workers = Histogram("vecshim_batch_workers", "HTTP worker processes whose texts shared a "
                                       "batch (engine only)", ["model"], buckets=(1, 2, 3, 4, 6, 8, 16, 32),
                                       registry=r)
        self.queue_wait = Histogram("vecshim_queue_wait_seconds", "Wait of the oldest text in a batch", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("vecshim_batch_seconds", "Backend time per gathered batch", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("vecshim_queue_depth", "Texts waiting in the model's queue", ["model"],
                                 multiprocess_mode="livesum", registry=r)
        self.cache_hits = Counter("vecshim_cache_hits", "Vector cache hits", ["model"], registry=r)
        self.cache_misses = Counter("vecshim_cache_misses", "Vector cache misses", ["model"], registry=r)
        self.redis_errors = Counter("vecshim_redis_errors", "Failed Redis cache operations", registry=r)
        self.cache_rejected = Counter("vecshim_cache_rejected", "Redis cache values dropped as not the "
                                      "model's (reason: short, format, space, length, non_finite)",
                                      ["reason"], registry=r)
        self.upstream = Counter("vecshim_upstream_events", "Backend calls and their outcomes "
                                "(call, retry, 429, failure, circuit_open)", ["model", "event"], registry=r)
        self.upstream_texts = Histogram("vecshim_upstream_call_texts", "Texts per call to a hosted upstream",
                                        ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.upstream_window = Gauge("vecshim_upstream_concurrency_limit", "Adaptive (AIMD) limit of concurrent "
                                     "upstream calls, summed over workers", ["model"],
                                     multiprocess_mode="livesum", registry=r)
        self.upstream_in_flight = Gauge("vecshim_upstream_in_flight", "Upstream calls in flight", ["model"],
                                        multiprocess_mode="livesum", registry=r)
        self.budget_used_total = Counter("vecshim_budget_used", "Requests and tokens spent from an upstream "
                                         "account's rate budget", ["upstream", "kind"], registry=r)
        self.budget_left_gauge = Gauge("vecshim_budget_left", "Requests or tokens the account's budget could "
                                       "still give over the next minute at its pace", ["upstream", "kind"],
                                       multiprocess_mode="mostrecent", registry=r)
        self.budget_limit = Gauge("vecshim_budget_limit_per_minute", "Rate limit in force (configured or "
                                  "announced by the upstream)", ["upstream", "kind"],
                                  multiprocess_mode="mostrecent", registry=r)
        self.budget_fallback = Gauge("vecshim_budget_fallback", "1 while Redis is unreachable and this "
                                     "process uses 1/expected_replicas of the limits", ["upstream"],
                                     multiprocess_mode="max", registry=r)
        self.load_seconds = Gauge("vecshim_model_load_seconds", "Seconds to load and warm up the model",
                                  ["model"], multiprocess_mode="max", registry=r)
        # livesum: across workers, the number of workers that see the model (circuit) in each state.
        self.model_state = Gauge("vecshim_model_state", "Workers with the model in each state "
                                 "(loading, ready, failed)", ["model", "state"], multiprocess_mode="livesum",
                                 registry=r)
        self.circuit_state = Gauge("vecshim_circuit_state", "Workers with the model's circuit breaker in each "
                                   "state (closed, half-open, open)", ["model", "state"],
                                   multiprocess_mode="livesum", registry=r)
        self._circuits: dict[str, Callable[[], str]] = {}
        self.in_flight = Gauge("vecshim_requests_in_flight", "HTTP requests being handled", [],
                               multiprocess_mode="livesum", registry=r)
        self.build = Gauge("vecshim_build_info", "vecshim version", ["version"], multiprocess_mode="max",
                           registry=r)
        self.build.labels(__version__).set(1)

    # -- callbacks handed to models, batchers, caches -----------------------
    def batch_observer(self, model: str) -> Callable[[int, float, float], None]:
        """Callback for the batcher: (texts, queue wait s, backend s)."""
        size, wait, secs = self.batch_size.labels(model), self.queue_wait.labels(model), self.batch_seconds.labels(model)

        def observe(n: int, wait_s: float, batch_s: float) -> None:
            size.observe(n)
            wait.observe(wait_s)
            secs.observe(batch_s)
        return observe

    def depth_observer(self, model: str) -> Callable[[int], None]:
        """Callback for the batcher's queue depth."""
        return self.queue_depth.labels(model).set

    def upstream_event(self, model: str) -> Callable[[str], None]:
        """Callback for Resilience events; each also refreshes the model's circuit gauge."""
        def on_event(kind: str) -> None:
            self.upstream.labels(model, kind).inc()
            self.refresh_circuit(model)
        return on_event

    def set_model_state(self, model: str, state: str) -> None:
        """Mark this worker's copy of `model` as loading, ready or failed."""
        for s in MODEL_STATES:
            self.model_state.labels(model, s).set(1 if s == state else 0)

    def track_circuit(self, model: str, state_fn: Callable[[], str]) -> None:
        """Read the model's circuit state from `state_fn` on every upstream event and scrape."""
        self._circuits[model] = state_fn
        self.refresh_circuit(model)

    def refresh_circuit(self, model: str) -> None:
        """Set the circuit gauge of `model` from its current state."""
        fn = self._circuits.get(model)
        if fn is None:
            return
        state = fn()
        for s in CIRCUIT_STATES:
            self.circuit_state.labels(model, s).set(1 if s == state else 0)

    def refresh(self) -> None:
        """Before a scrape: circuits move from open to half-open with time alone."""
        for model in list(self._circuits):
            self.refresh_circuit(model)

    def window_observer(self, model: str) -> Callable[[float, int], None]:
        """Callback for Resilience: (concurrency limit, calls in flight)."""
        limit, flight = self.upstream_window.labels(model), self.upstream_in_flight.labels(model)

        def observe(window: float, in_flight: int) -> None:
            limit.set(window)
            flight.set(in_flight)
        return observe

    def budget_used(self, upstream: str, kind: str, amount: float) -> None:
        """Count requests or tokens spent from a budget."""
        if amount > 0:
            self.budget_used_total.labels(upstream, kind).inc(amount)

    def budget_left(self, upstream: str, requests: float | None, tokens: float | None) -> None:
        """Record what a budget could still give over the next minute (None: no limit known)."""
        for kind, value in (("requests", requests), ("tokens", tokens)):
            if value is not None:
                self.budget_left_gauge.labels(upstream, kind).set(value)

    def budget_state(self, upstream: str, rpm: int | None, tpm: int | None, fallback: bool) -> None:
        """Record a budget's limits and whether it fell back to a per-replica share."""
        for kind, value in (("requests", rpm), ("tokens", tpm)):
            if value is not None:
                self.budget_limit.labels(upstream, kind).set(value)
        self.budget_fallback.labels(upstream).set(1 if fallback else 0)

    def cache(self, model: str, hits: int, misses: int) -> None:
        """Count one lookup's hits and misses."""
        if hits:
            self.cache_hits.labels(model).inc(hits)
        if misses:
            self.cache_misses.labels(model).inc(misses)

    def redis_error(self) -> None:
        """Count a failed Redis operation."""
        self.redis_errors.inc()

    def cache_reject(self, reason: str) -> None:
        """Count a Redis value that failed its checks."""
        self.cache_rejected.labels(reason).inc()

    def render(self) -> bytes:
        """The exposition text: this process alone, or every worker in multiprocess mode."""
        path = multiprocess_dir()
        if path:
            from prometheus_client import multiprocess
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)
            return generate_latest(registry)
        return generate_latest(self.registry)
