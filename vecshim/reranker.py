"""The Reranker contract: scores documents against a query (built-in or plugin)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, Sequence

from pydantic import BaseModel

from .backend import BackendOptions, EstimatedTextMixin

__all__ = ["Reranker", "RerankerOptions"]


class RerankerOptions(BackendOptions):
    """Base for a reranker's `Options`: unknown keys are rejected."""


class Reranker(EstimatedTextMixin, ABC):
    """A reranker: gives each document one relevance score for a query.

    Subclasses set `name` and `Options`, may override `load()`, `info()`,
    `use_models()` and the token methods, and must implement `score()`.
    The core does batching (pairs grouped by length), retries, the
    long-document policy, checks and rendering around it. Scores are only
    comparable between calls of one reranker; `score_range` says their bounds.
    """

    #: Name used as `backend:` of an entry under `rerankers:` in the YAML config. Must be unique.
    name: ClassVar[str]
    #: Pydantic model validating the `options:` mapping of the config.
    Options: ClassVar[type[BaseModel]] = RerankerOptions
    #: Importable modules the reranker needs, checked when the config is validated, and their pip extra.
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    #: True if the reranker holds model weights in this process (one copy per gunicorn worker).
    in_process: ClassVar[bool] = False
    #: True if `score()` only calls configured embedding models (see `use_models`), which batch,
    #: cache and retry themselves: the core then calls it in the request thread, unbatched.
    delegates: ClassVar[bool] = False

    #: Most documents one `score()` call may take (None: no limit).
    max_batch_size: int | None = None
    #: Most tokens of query plus document the model reads (None: no limit). Longer
    #: documents go through the reranker's long-text policy (`max` or `truncate`).
    max_input_tokens: int | None = None
    #: Most tokens summed over the pairs of one `score()` call (None: no limit).
    max_batch_tokens: int | None = None
    #: Batch cost model `(a, b, c)`, as for `Backend.batch_cost`, over pairs (None: group by limits only).
    batch_cost: tuple[float, float, float] | None = None
    #: Worker threads the core runs against this reranker (None: one).
    concurrency: int | None = None
    #: Lowest and highest score `score()` can return (None: unbounded on that side).
    score_range: tuple[float | None, float | None] = (None, None)

    def __init__(self, options: BaseModel):
        self.options = options

    def use_models(self, models: Mapping[str, Any]) -> None:
        """Receive the configured embedding models (name -> `vecshim.model.Model`) before `load()`.

        Raise `vecshim.ConfigError` if a model the options name is missing. Default: ignore them.
        """

    def load(self) -> None:
        """Do heavy start-up work (import SDKs, load weights, open clients)."""

    def info(self) -> dict[str, Any]:
        """Return JSON-safe facts for `/meta` (model id, revision...). Never secrets."""
        return {}

    def fingerprint_parts(self) -> dict[str, Any]:
        """Return what decides the scores (model id, revision...); fallbacks must share it."""
        return self.info()

    @abstractmethod
    def score(self, query: str, documents: list[str]) -> Sequence[float]:
        """Return one finite relevance score per document, in input order (higher: more relevant).

        Raise `vecshim.BackendError` (or any exception) on failure; the core
        turns it into a JSON error for the callers of this batch.
        """

    def close(self) -> None:
        """Release clients and threads at shutdown."""
