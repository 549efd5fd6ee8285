"""A configured model: a backend plus text policy, cache, batcher and checks (the pure steps live
in `space`, `long_text` and `cache.lookup_or_compute`)."""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from .backend import TASKS, Backend, BackendOptions
from .batching import Batcher
from .cache import lookup_or_compute
from .config import ModelConfig
from .errors import BackendError, BackendUnavailable, BadRequest, brief
from . import space
from .long_text import HOSTED_REQUEST_TOKENS, LOCAL_REQUEST_TOKENS, count_within_limit, merge_units, plan_units
from .plugins import build_plugin
from .served import Served, fingerprint_hash

__all__ = ["Model", "build_backend", "UnavailableBackend"]

log = logging.getLogger("vecshim.model")


def build_backend(name: str, cfg: ModelConfig, cls: type[Backend]) -> Backend:
    """Validate `cfg.options` against the backend's Options and construct it."""
    return build_plugin(cls, cfg.options, f"models.{name}", "backend")


class UnavailableBackend(Backend):
    """Stands in for a `required: false` model's backend that could not be built."""

    name = "unavailable"

    def __init__(self, backend_name: str):
        super().__init__(BackendOptions())
        self.name = backend_name

    def embed(self, texts, task):
        raise BackendUnavailable(f"backend {self.name!r} is unavailable")


class Model(Served):
    """One named model as served: `embed()` is the only way texts reach a backend."""

    kind = "model"
    plugin_kind = "backend"
    _log = log

    def __init__(self, name: str, cfg: ModelConfig, backend: Backend, *, cache=None, stats=None,
                 origin: dict | None = None, fleet=None):
        super().__init__(name, cfg, backend, stats=stats)
        #: The plugin that registered the backend: {"plugin", "distribution", "version"}.
        self.origin = origin or {}
        self.cache = cache
        self.dimension: int | None = None
        self.batcher: Batcher | None = None
        self.fallbacks: list[Model] = []
        #: Fallbacks removed at start because their vector space differs: [{"name", "reason"}].
        self.dropped_fallbacks: list[dict[str, str]] = []
        #: The app's rate budgets (`vecshim.budget.Fleet`); hosted backends take theirs from it.
        self.fleet = fleet
        self.budget = None
        #: Called when `info()` changes after loading (a rate limit learned, Redis lost).
        self.on_change = None
        self._fingerprint: str | None = None
        self._read_capabilities()

    def _read_capabilities(self) -> None:
        """Capabilities may change in `load()`: read them again once it returned."""
        prefixes = self.cfg.prefixes
        #: Whether query and passage texts reach the model differently.
        self.task_split = bool(self.backend.task_aware) or prefixes.query != prefixes.passage
        #: Pooling strategies a request may choose; the first is the model's own.
        self.poolings: tuple[str, ...] = tuple(self.backend.pooling_strategies or ())

    # -- identity -------------------------------------------------------
    @property
    def normalized(self) -> bool:
        """Whether served vectors are unit length."""
        return self.cfg.normalize if self.cfg.normalize is not None else bool(self.backend.normalized)

    @property
    def matryoshka(self) -> bool:
        """Whether `dimensions` below the native size may be served by truncation."""
        return self.cfg.matryoshka if self.cfg.matryoshka is not None else bool(self.backend.matryoshka)

    def fingerprint_parts(self) -> dict[str, Any]:
        """Everything that decides which vector a text gets (see docs/guide.md "Vector spaces")."""
        dimension = self.dimension if self.dimension is not None else self.backend.dimension
        return {
            "backend_name": self.backend.name,
            "plugin": self.origin,
            "backend": self.backend.fingerprint_parts(),
            # Missing until known (learnt at load), so config checks skip it.
            **({"dimension": dimension} if dimension is not None else {}),
            "pooling": self.poolings[0] if self.poolings else None,
            "normalized": self.normalized,
            "prefixes": self.cfg.prefixes.model_dump(),
            "long_text": self.cfg.long_text,
            "max_input_tokens": self.backend.max_input_tokens,
        }

    @property
    def fingerprint(self) -> str:
        """Short stable hash of `fingerprint_parts()` (fixed once the model is ready)."""
        if self._fingerprint is not None:
            return self._fingerprint
        value = fingerprint_hash(self.fingerprint_parts())
        if self.ready:  # every part is known now; it keys every cache lookup
            self._fingerprint = value
        return value

    def info(self) -> dict[str, Any]:
        """The model's entry in `/meta`; built once the model is loaded."""
        b = self.backend
        return {
            "name": self.name,
            "backend": b.name,
            "state": self.state,
            **({"error": self.error} if self.error else {}),
            "required": self.cfg.required,
            "model": b.info(),
            "plugin": self.origin,
            "dimension": self.dimension,
            "normalized": self.normalized,
            "matryoshka": self.matryoshka,
            "dimensions": self.cfg.dimensions,
            "pooling_strategies": list(self.poolings) or [space.DEFAULT_POOLING],
            "max_input_tokens": b.max_input_tokens,
            "long_text": self.cfg.long_text,
            "prefixes": self.cfg.prefixes.model_dump(),
            "task_aware": self.task_split,
            "batch": {"max_size": self.cfg.batch.max_size, "max_wait_ms": self.cfg.batch.max_wait_ms},
            "fingerprint": self.fingerprint,
            "fallbacks": [f for f in self.cfg.fallbacks if f not in {d["name"] for d in self.dropped_fallbacks}],
            **({"rate_budget": self.budget.info()} if self.budget is not None else {}),
            **({"fallbacks_dropped": list(self.dropped_fallbacks)} if self.dropped_fallbacks else {}),
        }

    @property
    def max_request_tokens(self) -> int:
        """Most tokens one request may bring (windows included); see BatchConfig."""
        if self.cfg.batch.max_request_tokens is not None:
            return self.cfg.batch.max_request_tokens
        return LOCAL_REQUEST_TOKENS if self.backend.in_process else HOSTED_REQUEST_TOKENS

    # -- lifecycle ------------------------------------------------------
    def load(self) -> None:
        """Load the backend, start the batcher and learn (or check) the dimension."""
        start = time.monotonic()
        workers = self.cfg.batch.workers or self.backend.concurrency or 1
        self.backend.plan_threads(workers)  # a local backend sizes its threads per caller
        self.backend.load()
        self._read_capabilities()
        space.require_identity(self.name, self.backend)
        from .resilience import Resilience  # the core wraps every backend call

        self._attach_budget()
        hosted = self.budget is not None
        self.resilience = Resilience(self.cfg.retry, self.cfg.circuit,
                                     self.cfg.max_concurrency or (workers if hosted else None), self.name,
                                     on_event=self.stats.upstream_event(self.name) if self.stats else None,
                                     budget=self.budget,
                                     on_window=self.stats.window_observer(self.name) if self.stats and hosted
                                     else None)
        max_size = self.cfg.batch.max_size
        if hosted and "max_size" not in self.cfg.batch.model_fields_set:
            max_size = self.backend.max_batch_size or max_size  # the provider's per-call limit
        if self.batcher is None:
            self.batcher = Batcher(
                self.name, self._embed_batch, max_size=max_size, gate=self.resilience if hosted else None,
                max_wait_ms=self.cfg.batch.max_wait_ms, workers=workers,
                max_queue=self.cfg.batch.max_queue, max_request_tokens=self.max_request_tokens,
                max_queue_tokens=self.cfg.batch.max_queue_tokens or 4 * self.max_request_tokens,
                small_tokens=self.backend.max_input_tokens or 512, backend_max_size=self.backend.max_batch_size,
                max_batch_tokens=self.backend.max_batch_tokens, cost=self.backend.batch_cost,
                inline=self.backend.inline_calls, **self._batch_observers())
        self.dimension = self._learn_dimension()
        if self.poolings and self.poolings[0] != space.DEFAULT_POOLING:
            log.warning("model %r pools with %s: Weaviate asks for %s unless the collection sets "
                        "poolingStrategy: %s, and vecshim honours what it asks", self.name, self.poolings[0],
                        space.DEFAULT_POOLING, self.poolings[0])
        self.load_seconds = time.monotonic() - start
        if self.stats:
            self.stats.load_seconds.labels(self.name).set(self.load_seconds)
        self._mark_ready()
        log.info("model %r ready: backend %s, dimension %d (%s), loaded in %.1f s",
                 self.name, self.backend.name, self.dimension,
                 "Matryoshka-trained" if self.matryoshka else
                 ("not Matryoshka-trained: dimensions below it are truncated and renormalised"
                  if self.cfg.dimensions == "truncate" else "not Matryoshka-trained: dimensions: strict"),
                 self.load_seconds, extra={"model": self.name})

    def _learn_dimension(self) -> int:
        """The declared dimension, checked; else the one length every check text gets (`space.learn_dimension`)."""
        def length_of(text: str) -> int:
            # A cold model may be slow on its first call: allow more than a request gets.
            futures = self.batcher.submit([text], self.backend.count_tokens([text]), self._task_key("passage"))
            return int(self.batcher.wait(futures, max(self.cfg.timeout_s, 120))[0].shape[0])

        return space.learn_dimension(self.backend, length_of)

    def _attach_budget(self) -> None:
        """Give a hosted backend (one with `rate_account()`) its account's fleet budget."""
        account = getattr(self.backend, "rate_account", None)
        if account is None or self.fleet is None or self.budget is not None:
            return
        self.budget = self.fleet.budget(*account())
        self.budget.configure(self.cfg.rate_limit)
        self.budget.subscribe(self._changed)

    def _changed(self) -> None:
        if self.ready and self.on_change is not None:
            self.on_change()

    # -- embedding ------------------------------------------------------
    def _task_key(self, task: str) -> str | None:
        return task if self.task_split else None

    def _embed_batch(self, texts: list[str], key) -> np.ndarray:
        """Called by batch workers: one backend call, checked."""
        key, pooling = key if isinstance(key, tuple) else (key, None)
        task = key or "passage"
        extra = {"pooling": pooling} if pooling is not None else {}

        def call():
            if self.budget is not None:
                fn = getattr(self.backend, "embed_reply", self.backend.embed)
                tokens = sum(self.backend.count_tokens(texts))
                if self.stats:
                    self.stats.upstream_texts.labels(self.name).observe(len(texts))
                return self.resilience.call(fn, texts, task, tokens=tokens, **extra)
            return self.resilience.call(self.backend.embed, texts, task, **extra)

        return space.checked_vectors(self._guarded(call), len(texts), self.dimension, self.backend.name)

    def check_dimensions(self, dimensions: int | None) -> int | None:
        """Validate a requested output size; None means the native size (see `space.resolve_dimensions`)."""
        if dimensions is None or dimensions == self.dimension:
            return None
        return space.resolve_dimensions(self.name, self.dimension, dimensions, self.matryoshka,
                                        self.cfg.dimensions == "strict")

    def check_pooling(self, pooling) -> str | None:
        """Validate a request's `pooling_strategy`; None means the model's own pooling."""
        return space.resolve_pooling(self.name, self.poolings, pooling)

    def embed(self, texts: Sequence[str], task: str = "passage", dimensions: int | None = None,
              pooling: str | None = None) -> list[np.ndarray]:
        """Embed texts for a task; return one float32 vector per text (of `dimensions`, if given)."""
        if task not in TASKS:
            raise BadRequest(f"task_type must be one of {', '.join(TASKS)}, got {brief(task)}")
        self._await_ready()
        dims = self.check_dimensions(dimensions)
        pooling = self.check_pooling(pooling)
        return self._embed_cached(list(texts), task, dims, pooling)

    def _embed_cached(self, texts: list[str], task: str, dims: int | None, pooling: str | None) -> list[np.ndarray]:
        """Serve from the cache what it holds for exactly this space and size; compute the rest.

        The cache holds vectors as served: keyed by the model's fingerprint (with
        the request's pooling), the task and the served size, and checked
        against that space and size when read back.
        """
        def compute(missing: list[str]) -> list[np.ndarray]:
            fresh = self._run(missing, task, pooling)
            return fresh if dims is None else [space.truncate(v, dims, self.normalized) for v in fresh]

        counted = (lambda hits, misses: self.stats.cache(self.name, hits, misses)) if self.stats else None
        return lookup_or_compute(self.cache, texts, space.space_id(self.fingerprint, pooling), self._task_key(task),
                                 dims, dims or self.dimension, compute, counted)

    def _run(self, texts: list[str], task: str, pooling: str | None = None) -> list[np.ndarray]:
        """Embed cache misses: prefixes, long-text policy, batcher, fallbacks."""
        try:
            return self._run_here(texts, task, pooling)
        except (BackendError,) as err:
            for fb in self.fallbacks:
                # The loader drops mismatched fallbacks only once all models are up:
                # check here too, so a different vector space is never served.
                if not fb.ready or fb.fingerprint != self.fingerprint:
                    continue
                log.warning("model %r failed (%s); using fallback %r", self.name, err.message, fb.name,
                            extra={"model": self.name})
                try:
                    return fb._run_here(texts, task, pooling)
                except BackendError:
                    continue
            raise

    def _run_here(self, texts: list[str], task: str, pooling: str | None = None) -> list[np.ndarray]:
        """Prefixes, the request's token limit and the long-text policy around one batcher round trip."""
        prefix = self.cfg.prefixes.query if task == "query" else self.cfg.prefixes.passage
        inputs = [prefix + t for t in texts]
        counts = count_within_limit(self.backend, inputs, self.max_request_tokens, self.name)
        units, unit_tokens, spans = plan_units(self.backend, texts, inputs, counts, prefix, self.cfg.long_text,
                                               self.name)
        deadline = time.monotonic() + self.cfg.timeout_s
        bkey = self._task_key(task) if pooling is None else (self._task_key(task), pooling)
        futures = self.batcher.submit(units, unit_tokens, bkey, deadline=deadline)
        vecs = self.batcher.wait(futures, self.cfg.timeout_s)
        return merge_units(vecs, unit_tokens, spans, self.normalized, self.cfg.normalize)
