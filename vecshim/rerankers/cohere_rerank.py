"""The `cohere` reranker: Cohere's `POST /v2/rerank` through the `cohere` SDK (any compatible `base_url`).

Keys, timeouts and error mapping are the `cohere` embedding backend's; the
SDK never retries, `vecshim.resilience` does. Every document is sent with
`top_n` equal to their number, and the reply must score each exactly once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator

from ..backends._hosted import endpoint_host, resolve_api_key
from ..backends.cohere_api import DEFAULT_HOST, NO_KEY, CohereBackend
from ..errors import BackendError, ConfigError
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

    @model_validator(mode="after")
    def _check_key_source(self) -> CohereRerankOptions:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        return self


class CohereReranker(Reranker):
    """Relevance scores in [0, 1] from Cohere (or a server that speaks its rerank API)."""

    name = "cohere"
    Options = CohereRerankOptions
    requires = ("cohere", "httpx")
    extra = "cohere"
    concurrency = 4
    score_range = (0.0, 1.0)
    # The embedding backend's mapping: statuses, retryability, Retry-After, keys never in messages.
    _map_error = CohereBackend._map_error

    def __init__(self, options: CohereRerankOptions):
        super().__init__(options)
        self.max_batch_size = options.max_batch_size
        self._client: Any = None
        self._http: Any = None
        self._key: str | None = None
        self._errors: tuple[type[Exception], ...] = ()
        self._httpx: Any = None

    def load(self) -> None:
        """Import the SDK and build the client (no network call)."""
        try:
            import cohere
            import httpx
        except ImportError:
            raise ConfigError("reranker 'cohere' needs: pip install 'vecshim[cohere]'") from None
        opts = self.options
        self._key = resolve_api_key(opts.api_key, opts.api_key_file, ("CO_API_KEY", "COHERE_API_KEY"), self.name)
        if self._key is None:
            if not opts.base_url:
                raise ConfigError("reranker 'cohere' needs an API key: set options.api_key, "
                                  "options.api_key_file, CO_API_KEY or COHERE_API_KEY")
            self._key = NO_KEY
        self._http = httpx.Client(timeout=opts.timeout_s)
        self._client = cohere.ClientV2(api_key=self._key, base_url=opts.base_url, timeout=opts.timeout_s,
                                       max_retries=0, httpx_client=self._http)
        self._errors = (cohere.core.ApiError, cohere.core.ParsingError, httpx.HTTPError)
        self._httpx = httpx

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

    def close(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            self._http.close()
            self._http = self._client = None


@hookimpl
def register_rerankers(register):
    """Register the `cohere` reranker."""
    register(CohereReranker)
