"""The `cohere` backend: Cohere's v2 embed API, with Weaviate's tasks mapped to input types.

Weaviate's `query` becomes `search_query` and `passage` becomes
`search_document` (both configurable). The SDK is imported in `load()` and
never retries: `vecshim.resilience` does that for every backend.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from ..backend import Backend, BackendOptions, Task
from ..errors import BackendError, ConfigError, UpstreamError
from ..hookspecs import hookimpl
from ..budget import account_id
from ..ratelimit import Reply, read_cohere_headers
from ._hosted import (check_vectors, endpoint_host, key_problems, one_key_source, redact, resolve_api_key,
                      upstream_detail)

__all__ = ["CohereBackend", "CohereClientMixin", "CohereOptions"]

#: Statuses worth another try: rate limits and server errors.
RETRYABLE_STATUSES = frozenset({408, 429})
#: 498 is Cohere's "invalid token"; like 401 and 403 its body is never copied.
AUTH_STATUSES = frozenset({401, 403, 498})
#: Used as the key for a compatible server that needs none: the SDK insists on one.
NO_KEY = "no-key"
DEFAULT_HOST = "api.cohere.com"
#: Environment variables a key may come from, in order.
KEY_ENV = ("CO_API_KEY", "COHERE_API_KEY")


class CohereOptions(BackendOptions):
    """Options of the `cohere` backend."""

    model: str = "embed-english-v3.0"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    base_url: str | None = None
    timeout_s: float = Field(20.0, gt=0)
    input_type_query: str = "search_query"
    input_type_passage: str = "search_document"
    output_dimension: int | None = Field(None, ge=1)
    truncate: Literal["NONE", "START", "END"] = "END"
    max_batch_size: int = Field(96, ge=1)
    max_input_tokens: int = Field(512, ge=1)

    _check_key_source = model_validator(mode="after")(one_key_source)


class CohereClientMixin:
    """The SDK client of the `cohere` backend and reranker: the key, our own httpx client, no SDK retries,
    and errors mapped so that no message holds the key. Put it before `Backend` or `Reranker`."""

    _client: Any = None
    _http: Any = None
    _key: str | None = None
    _errors: tuple[type[Exception], ...] = ()
    _httpx: Any = None

    def _open_client(self, kind: str) -> None:
        """Import the SDK and build the client (no network call); `kind` is `backend` or `reranker`."""
        try:
            import cohere
            import httpx
        except ImportError:
            raise ConfigError(f"{kind} 'cohere' needs: pip install 'vecshim[cohere]'") from None
        opts = self.options
        self._key = resolve_api_key(opts.api_key, opts.api_key_file, KEY_ENV, self.name)
        if self._key is None:
            if not opts.base_url:
                raise ConfigError(f"{kind} 'cohere' needs an API key: set options.api_key, "
                                  "options.api_key_file, CO_API_KEY or COHERE_API_KEY")
            self._key = NO_KEY
        # Our own httpx client, so that close() can release its connections.
        self._http = httpx.Client(timeout=opts.timeout_s)
        self._client = cohere.ClientV2(api_key=self._key, base_url=opts.base_url,
                                       timeout=opts.timeout_s, max_retries=0,
                                       httpx_client=self._http)
        self._errors = (cohere.core.ApiError, cohere.core.ParsingError, httpx.HTTPError)
        self._httpx = httpx

    def close(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            self._http.close()
            self._http = self._client = None

    def _map_error(self, exc: Exception) -> BackendError:
        """Turn an SDK or httpx exception into an error whose message never holds the key."""
        httpx = self._httpx
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamError(f"cohere upstream timed out (timeout_s={self.options.timeout_s:g})",
                                 retryable=True)
        if isinstance(exc, httpx.TransportError):
            return UpstreamError(f"cohere upstream connection failed ({type(exc).__name__})",
                                 retryable=True)
        status = getattr(exc, "status_code", None)
        if not isinstance(status, int) or 200 <= status < 300:
            # The SDK raises ApiError with the 2xx status when the body is not JSON.
            return BackendError("cohere upstream returned a reply that is not valid JSON")
        retryable = status in RETRYABLE_STATUSES or status >= 500
        if status in AUTH_STATUSES:
            detail = "authentication failed" if status != 403 else "permission denied"
        elif status == 429:
            detail = "rate limited"
        else:
            detail = upstream_detail(self.name, status, _error_message(getattr(exc, "body", None)), self._key)
        info = read_cohere_headers(getattr(exc, "headers", None))
        error = UpstreamError(f"cohere upstream returned {status} ({detail})",
                              upstream_status=status, retryable=retryable,
                              retry_after=info.retry_after_s)
        error.info = info
        return error


class CohereBackend(CohereClientMixin, Backend):
    """Embeddings from Cohere's `POST /v2/embed`."""

    name = "cohere"
    Options = CohereOptions
    requires = ("cohere", "httpx")
    extra = "cohere"
    #: Batcher workers: a hosted API spends its time waiting, so overlap calls.
    concurrency = 4
    task_aware = True

    def __init__(self, options: CohereOptions):
        super().__init__(options)
        self.max_batch_size = options.max_batch_size
        self.max_input_tokens = options.max_input_tokens
        self.dimension = options.output_dimension
        self.input_types = {"query": options.input_type_query,
                            "passage": options.input_type_passage}

    def preflight(self) -> list[tuple[str, str]]:
        """A key must come from the options, the key file or the environment (unless base_url is set)."""
        opts = self.options
        return key_problems(opts.api_key, opts.api_key_file, KEY_ENV, self.name, key_optional=bool(opts.base_url))

    def load(self) -> None:
        """Import the SDK and build the client (no network call)."""
        self._open_client("backend")

    def info(self) -> dict[str, Any]:
        """Return the model, the upstream host, input types and dimension (never the key)."""
        return {"model": self.options.model,
                "host": endpoint_host(self.options.base_url) or DEFAULT_HOST,
                "input_types": dict(self.input_types),
                "dimensions": self.options.output_dimension}

    def fingerprint_parts(self) -> dict[str, Any]:
        """Return what shapes the vectors: model, input types, dimension and truncation."""
        return {"model": self.options.model, "input_types": dict(self.input_types),
                "dimensions": self.options.output_dimension, "truncate": self.options.truncate}

    def rate_account(self) -> tuple[str, str]:
        """(account id, host) for the fleet rate budget: endpoint and key hashed, never the key."""
        return (account_id(self.options.base_url or DEFAULT_HOST, self._key),
                endpoint_host(self.options.base_url) or DEFAULT_HOST)

    def embed(self, texts: list[str], task: Task) -> list[list[float]]:
        """Embed `texts` with one API call, as queries or as documents."""
        return self.embed_reply(texts, task).vectors

    def embed_reply(self, texts: list[str], task: Task) -> Reply:
        """`embed()`, plus the rate limits and token usage the upstream reported."""
        if self._client is None:
            raise BackendError("backend 'cohere' is not loaded")
        params: dict[str, Any] = {"model": self.options.model, "texts": texts,
                                  "input_type": self.input_types[task],
                                  "embedding_types": ["float"], "truncate": self.options.truncate}
        if self.options.output_dimension is not None:
            params["output_dimension"] = self.options.output_dimension
        error: BackendError | None = None
        try:
            raw = self._client.with_raw_response.embed(**params)
            info = read_cohere_headers(raw.headers)
            reply = raw.data
        except self._errors as exc:
            error = self._map_error(exc)
        if error is not None:
            # Raised outside `except` so no SDK exception (which may quote the key) is chained.
            raise error
        embeddings = getattr(reply, "embeddings", None)
        vectors = getattr(embeddings, "float_", None)
        if not isinstance(vectors, list):
            raise BackendError("cohere upstream returned a reply without float embeddings")
        billed = getattr(getattr(getattr(reply, "meta", None), "billed_units", None), "input_tokens", None)
        info.tokens_used = int(billed) if isinstance(billed, (int, float)) and billed >= 0 else None
        return Reply(check_vectors(vectors, len(texts), self.options.output_dimension, self.name), info)


def _error_message(body: Any) -> str:
    """Return the message of Cohere's `{"message": ...}` error body, or a short form of it."""
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    if body is None:
        return "no details"
    return body if isinstance(body, str) else json.dumps(body)


@hookimpl
def register_backends(register):
    """Register the `cohere` backend."""
    register(CohereBackend)
