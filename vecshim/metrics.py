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
        self.load_seconds = Gauge("vecshim_model_load_seconds", "Seconds to load and warm up the model",
                                  ["model"], multiprocess_mode="max", registry=r)
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
        """Callback for Resilience events."""
        def on_event(kind: str) -> None:
            self.upstream.labels(model, kind).inc()
        return on_event

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
