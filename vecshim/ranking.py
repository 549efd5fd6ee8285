"""A configured reranker as served: long-document policy, pair batcher, retries, checks, fallbacks."""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from .batching import Batcher
from .config import RerankerConfig
from .errors import BackendError, ConfigError
from .plugins import build_plugin
from .reranker import Reranker
from .served import Served, fingerprint_hash

__all__ = ["Ranker", "build_reranker", "build_rankers", "bind_models", "WARMUP_QUERY"]

log = logging.getLogger("vecshim.ranking")
WARMUP_QUERY = "vecshim warm-up: which animal jumps?"
_WARMUP_DOCS = ["The quick brown fox jumps over the lazy dog."]


def build_reranker(name: str, cfg: RerankerConfig, cls: type[Reranker]) -> Reranker:
    """Validate `cfg.options` against the reranker's Options and construct it."""
    return build_plugin(cls, cfg.options, f"rerankers.{name}", "reranker")


def bind_models(name: str, reranker: Reranker, models: Mapping[str, Any]) -> None:
    """Hand the embedding models to `reranker.use_models()`; its errors get the config path."""
    try:
        reranker.use_models(models)
    except ConfigError as err:
        raise ConfigError(f"rerankers.{name}.{err.message}") from None


def build_rankers(config, registry, models: Mapping[str, Any], stats=None,
                  engine_cls: type[Ranker] | None = None) -> dict[str, Ranker]:
    """Build every configured reranker (no loading); option and model references fail here.

    With `engine_cls` (an HTTP worker beside an engine), rerankers the engine
    serves (`Ranker.in_engine`) are built as that class instead.
    """
    rankers: dict[str, Ranker] = {}
    for name, rcfg in (config.rerankers or {}).items():
        try:
            cls = registry.get_reranker(rcfg.backend)
        except ConfigError as err:
            raise ConfigError(f"rerankers.{name}.backend: {err.message}") from None
        reranker = build_reranker(name, rcfg, cls)
        bind_models(name, reranker, models)
        ranker = Ranker(name, rcfg, reranker, stats=stats)
        if engine_cls is not None and ranker.in_engine:
            ranker = engine_cls(name, rcfg, reranker, stats=stats)
        rankers[name] = ranker
    for name, r in rankers.items():
        r.fallbacks = [rankers[f] for f in r.cfg.fallbacks]
        for fb in r.fallbacks:
            if fb.fingerprint_parts() != r.fingerprint_parts():
                raise ConfigError(f"rerankers.{name}.fallbacks: {fb.name!r} scores with a different model "
                                  f"({fb.fingerprint_parts()} vs {r.fingerprint_parts()})")
    return rankers


class Ranker(Served):
    """One named reranker as served: `rank()` is the only way pairs reach a reranker."""

    kind = "reranker"
    plugin_kind = "reranker"
    _log = log

    def __init__(self, name: str, cfg: RerankerConfig, backend: Reranker, *, stats=None):
        super().__init__(name, cfg, backend, stats=stats)
        self.batcher: Batcher | None = None
        self.fallbacks: list[Ranker] = []

    # -- identity -------------------------------------------------------
    @property
    def score_range(self) -> list[float | None]:
        """[low, high] bounds of the scores (None: unbounded)."""
        return list(self.backend.score_range)

    def fingerprint_parts(self) -> dict[str, Any]:
        """Everything that decides the score a pair gets."""
        return {"backend": self.backend.name, "model": self.backend.fingerprint_parts(),
                "long_text": self.cfg.long_text, "max_input_tokens": self.backend.max_input_tokens}

    @property
    def fingerprint(self) -> str:
        """Short stable hash of `fingerprint_parts()`."""
        return fingerprint_hash(self.fingerprint_parts())

    def info(self) -> dict[str, Any]:
        """The reranker's entry in `/meta`."""
        b = self.backend
        return {
            "name": self.name,
            "backend": b.name,
            "state": self.state,
            **({"error": self.error} if self.error else {}),
            "model": b.info(),
            "score_range": self.score_range,
            "max_input_tokens": b.max_input_tokens,
            "long_text": self.cfg.long_text,
            "batch": {"max_size": self.cfg.batch.max_size, "max_wait_ms": self.cfg.batch.max_wait_ms},
            "fingerprint": self.fingerprint,
            "fallbacks": list(self.cfg.fallbacks),
            "aliases": list(self.cfg.aliases),
        }

    @property
    def in_engine(self) -> bool:
        """Served by the replica's engine when there is one. A reranker that only calls configured
        models (`delegates`) stays in the HTTP workers, beside those models' vector cache."""
        return not self.backend.delegates

    # -- lifecycle ------------------------------------------------------
    def load(self) -> None:
        """Load the reranker, start its batcher and score one warm-up query."""
        start = time.monotonic()
        workers = self.cfg.batch.workers or self.backend.concurrency or 1
        self.backend.load()
        from .resilience import Resilience

        self.resilience = Resilience(self.cfg.retry, self.cfg.circuit, self.cfg.max_concurrency, self.name,
                                     on_event=self.stats.upstream_event(self.name) if self.stats else None)
        if self.batcher is None and not self.backend.delegates:
            # Unset in the config, a batch is as large as the reranker takes (a hosted API bills per call).
            size = self.cfg.batch.max_size if "max_size" in self.cfg.batch.model_fields_set \
                else max(self.backend.max_batch_size or 0, self.cfg.batch.max_size)
            self.batcher = Batcher(
                self.name, self._score_batch, max_size=size,
                max_wait_ms=self.cfg.batch.max_wait_ms, workers=workers, max_queue=self.cfg.batch.max_queue,
                backend_max_size=self.backend.max_batch_size, max_batch_tokens=self.backend.max_batch_tokens,
                cost=self.backend.batch_cost, **self._batch_observers())
        if not self.backend.delegates:  # a delegating reranker's models warm themselves up
            self._rank_here(WARMUP_QUERY, list(_WARMUP_DOCS), timeout=max(self.cfg.timeout_s, 120))
        self.load_seconds = time.monotonic() - start
        self._mark_ready()
        log.info("reranker %r ready: %s, loaded in %.1f s", self.name, self.backend.name, self.load_seconds)

    # -- scoring --------------------------------------------------------
    def rank(self, query: str, documents: Sequence[str]) -> np.ndarray:
        """Score every document against `query`; float64 scores in input order."""
        self._await_ready()
        try:
            return self._rank_here(query, list(documents))
        except BackendError as err:
            for fb in self.fallbacks:
                if not fb.ready:
                    continue
                log.warning("reranker %r failed (%s); using fallback %r", self.name, err.message, fb.name)
                try:
                    return fb._rank_here(query, list(documents))
                except BackendError:
                    continue
            raise

    def _rank_here(self, query: str, documents: list[str], timeout: float | None = None) -> np.ndarray:
        if not documents:
            return np.zeros(0, dtype=np.float64)
        units, spans, tokens = self._windows(query, documents)
        if self.batcher is None:
            scores = self._call(query, units)
        else:
            items = self.batcher.submit(units, tokens, query)
            scores = np.asarray(self.batcher.wait(items, timeout or self.cfg.timeout_s), dtype=np.float64)
        return np.array([scores[a:b].max() for a, b in spans], dtype=np.float64)

    def _windows(self, query: str, documents: list[str]) -> tuple[list[str], list[tuple[int, int]], list[int]]:
        """Apply the long-document policy: each document becomes one or more units to score."""
        b = self.backend
        query_tokens = b.count_tokens([query])[0]
        counts = b.count_tokens(documents)
        limit = b.max_input_tokens
        room = max(1, limit - query_tokens) if limit else None
        units: list[str] = []
        tokens: list[int] = []
        spans: list[tuple[int, int]] = []
        for doc, n in zip(documents, counts):
            start = len(units)
            if room is None or n <= room:
                units.append(doc)
                tokens.append(query_tokens + n)
            else:
                windows = b.split_text(doc, room)
                if self.cfg.long_text == "truncate":
                    windows = windows[:1]
                units.extend(windows)
                tokens.extend(query_tokens + c for c in b.count_tokens(windows))
            spans.append((start, len(units)))
        return units, spans, tokens

    def _score_batch(self, documents: list[str], query: str) -> np.ndarray:
        """Called by batch workers: one reranker call for one query."""
        return self._call(query, documents)

    def _call(self, query: str, documents: list[str]) -> np.ndarray:
        if self.backend.delegates:  # its models retry already; do not multiply the attempts
            raw = self._guarded(lambda: self.backend.score(query, documents))
        else:
            raw = self._guarded(lambda: self.resilience.call(self.backend.score, query, documents))
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise BackendError(f"reranker {self.backend.name!r} returned non-numeric scores") from None
        if arr.ndim == 2 and arr.shape[1:] == (1,):
            arr = arr[:, 0]
        if arr.ndim != 1 or arr.shape[0] != len(documents):
            raise BackendError(f"reranker {self.backend.name!r} returned {arr.size} scores "
                               f"for {len(documents)} documents")
        if not np.isfinite(arr).all():
            raise BackendError(f"reranker {self.backend.name!r} returned non-finite scores")
        return arr
