"""The `cohere` reranker: Cohere's `POST /v2/rerank` through the `cohere` SDK (any compatible `base_url`).

Keys, timeouts and error mapping are the `cohere` embedding backend's; the
SDK never retries, `vecshim.resilience` does. Every document is sent with
`top_n` equal to their number, and the reply must score each exactly once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator

from ..backends._hosted import endpoint_host, one_key_source
from ..backends.cohere_api import DEFAULT_HOST, CohereClientMixin
from ..errors import BackendError
from ..hookspecs import hookimpl
from ..reranker import Reranker, RerankerOptions

__all__ = ["CohereReranker", "CohereRerankOptions"]

#: Cohere's limit of documents per rerank call.
MAX_DOCUMENTS = 1000


class CohereRerankOptions(RerankerOptions):
    """Options of the `cohere` reranker."""

    model: str = "rerank-v3.5"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    base_url: str | None = None
    timeout_s: float = Field(20.0, gt=0)
    #: Documents per API call (Cohere takes at most 1000).
    max_batch_size: int = Field(MAX_DOCUMENTS, ge=1, le=MAX_DOCUMENTS)
    #: Cohere's own truncation of each document (None: the API's default).
    max_tokens_per_doc: int | None = Field(None, ge=1)

    _check_key_source = model_validator(mode="after")(one_key_source)


class CohereReranker(CohereClientMixin, Reranker):
    """Relevance scores in [0, 1] from Cohere (or a server that speaks its rerank API)."""

    name = "cohere"
    Options = CohereRerankOptions
    requires = ("cohere", "httpx")
    extra = "cohere"
    concurrency = 4
    score_range = (0.0, 1.0)

    def __init__(self, options: CohereRerankOptions):
        super().__init__(options)
        self.max_batch_size = options.max_batch_size

    def load(self) -> None:
        """Import the SDK and build the client (no network call)."""
        self._open_client("reranker")

    def info(self) -> dict[str, Any]:
        """The model and the upstream host (never the key)."""
        return {"model": self.options.model, "host": endpoint_host(self.options.base_url) or DEFAULT_HOST,
                "max_tokens_per_doc": self.options.max_tokens_per_doc}

    def fingerprint_parts(self) -> dict[str, Any]:
        """What decides the scores: the model and its truncation (not the host)."""
        return {"model": self.options.model, "max_tokens_per_doc": self.options.max_tokens_per_doc}

    def score(self, query: str, documents: list[str]) -> list[float]:
        """One API call; the reply's results put back in input order."""
        if self._client is None:
            raise BackendError("reranker 'cohere' is not loaded")
        params: dict[str, Any] = {"model": self.options.model, "query": query, "documents": documents,
                                  "top_n": len(documents)}
        if self.options.max_tokens_per_doc is not None:
            params["max_tokens_per_doc"] = self.options.max_tokens_per_doc
        error: BackendError | None = None
        try:
            reply = self._client.rerank(**params)
        except self._errors as exc:
            error = self._map_error(exc)
        if error is not None:
            raise error  # outside `except`: no SDK exception (which may quote the key) is chained
        scores: list[float | None] = [None] * len(documents)
        for item in getattr(reply, "results", None) or []:
            index, value = getattr(item, "index", None), getattr(item, "relevance_score", None)
            if not isinstance(index, int) or not 0 <= index < len(documents) or scores[index] is not None:
                raise BackendError(f"cohere upstream returned a bad or repeated result index {index!r}")
            scores[index] = value
        missing = sum(s is None for s in scores)
        if missing:
            raise BackendError(f"cohere upstream scored {len(documents) - missing} of {len(documents)} documents")
        return scores


@hookimpl
def register_rerankers(register):
    """Register the `cohere` reranker."""
    register(CohereReranker)
