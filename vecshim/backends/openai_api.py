"""The `openai` backend: OpenAI, Azure OpenAI and any OpenAI-compatible server.

`base_url` points it at TEI, Infinity, vLLM, Ollama, LiteLLM and the like;
`azure_endpoint` switches to Azure OpenAI. The SDK is imported in `load()`
and never retries: `vecshim.resilience` does that for every backend.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator

from ..backend import Backend, BackendOptions, Task
from ..errors import BackendError, ConfigError, UpstreamError
from ..hookspecs import hookimpl
from ..budget import account_id
from ..ratelimit import Reply, read_openai_headers
from ._hosted import check_vectors, endpoint_host, key_problems, redact, resolve_api_key, upstream_detail

__all__ = ["OpenAIBackend", "OpenAIOptions"]

#: Statuses worth another try: timeouts, rate limits and server errors.
RETRYABLE_STATUSES = frozenset({408, 429})
#: Used as the key for servers that need none (TEI, Ollama...): the SDK insists on one.
NO_KEY = "no-key"


class OpenAIOptions(BackendOptions):
    """Options of the `openai` backend."""

    model: str
    dimensions: int | None = Field(None, ge=1)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    base_url: str | None = None
    organization: str | None = None
    timeout_s: float = Field(20.0, gt=0)
    azure_endpoint: str | None = None
    api_version: str | None = None
    azure_deployment: str | None = None
    max_batch_size: int = Field(2048, ge=1)
    # OpenAI caps a request at 300,000 tokens; our count is an estimate, so keep a margin.
    max_batch_tokens: int = Field(285_000, ge=1)
    max_input_tokens: int = Field(8191, ge=1)

    @model_validator(mode="after")
    def _check_combinations(self) -> OpenAIOptions:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        if self.azure_endpoint and self.base_url:
            raise ValueError("set base_url or azure_endpoint, not both")
        if self.azure_endpoint and not self.api_version:
            raise ValueError("azure_endpoint needs api_version")
        if not self.azure_endpoint and (self.api_version or self.azure_deployment):
            raise ValueError("api_version and azure_deployment need azure_endpoint")
        return self


class OpenAIBackend(Backend):
    """Embeddings from `POST /embeddings` of the OpenAI API or a compatible server."""

    name = "openai"
    Options = OpenAIOptions
    requires = ("openai",)
    extra = "openai"
    #: Batcher workers: a hosted API spends its time waiting, so overlap calls.
    concurrency = 4
    task_aware = False

    def __init__(self, options: OpenAIOptions):
        super().__init__(options)
        self.max_batch_size = options.max_batch_size
        self.max_batch_tokens = options.max_batch_tokens
        self.max_input_tokens = options.max_input_tokens
        # text-embedding-3 models are trained so that a prefix is a good embedding.
        self.matryoshka = options.model.startswith("text-embedding-3")
        self.dimension = options.dimensions
        self._client: Any = None
        self._openai: Any = None
        self._key: str | None = None

    def preflight(self) -> list[tuple[str, str]]:
        """A key must come from the options, the key file or the environment (unless base_url is set)."""
        opts = self.options
        env = ("AZURE_OPENAI_API_KEY", "OPENAI_API_KEY") if opts.azure_endpoint else ("OPENAI_API_KEY",)
        return key_problems(opts.api_key, opts.api_key_file, env, self.name, key_optional=bool(opts.base_url))

    def load(self) -> None:
        """Import the SDK and build the client (no network call)."""
        try:
            import openai
        except ImportError:
            raise ConfigError("backend 'openai' needs: pip install 'vecshim[openai]'") from None
        opts = self.options
        azure = bool(opts.azure_endpoint)
        env = ("AZURE_OPENAI_API_KEY", "OPENAI_API_KEY") if azure else ("OPENAI_API_KEY",)
        self._key = resolve_api_key(opts.api_key, opts.api_key_file, env, self.name)
        if self._key is None:
            if not opts.base_url:
                raise ConfigError(f"backend 'openai' needs an API key: set options.api_key, "
                                  f"options.api_key_file or {' or '.join(env)}")
            self._key = NO_KEY
        common = dict(api_key=self._key, organization=opts.organization,
                      timeout=opts.timeout_s, max_retries=0)
        try:
            if azure:
                self._client = openai.AzureOpenAI(
                    azure_endpoint=opts.azure_endpoint, api_version=opts.api_version,
                    azure_deployment=opts.azure_deployment, **common)
            else:
                self._client = openai.OpenAI(base_url=opts.base_url, **common)
        except openai.OpenAIError as exc:
            raise ConfigError(f"backend 'openai': {redact(str(exc), self._key)}") from None
        self._openai = openai

    def info(self) -> dict[str, Any]:
        """Return the model, the upstream host and the dimensions (never the key)."""
        host = endpoint_host(self._client.base_url if self._client else
                             self.options.azure_endpoint or self.options.base_url)
        return {"model": self.options.model, "host": host or "api.openai.com",
                "dimensions": self.options.dimensions}

    def fingerprint_parts(self) -> dict[str, Any]:
        """Return the model and dimensions: the same model elsewhere is the same space."""
        return {"model": self.options.model, "dimensions": self.options.dimensions}

    def rate_account(self) -> tuple[str, str]:
        """(account id, host) for the fleet rate budget: endpoint and key hashed, never the key."""
        opts = self.options
        endpoint = str(self._client.base_url) if self._client else str(opts.azure_endpoint or opts.base_url)
        if opts.azure_endpoint:  # Azure limits each deployment on its own
            endpoint += f"#{opts.azure_deployment or opts.model}"
        return account_id(endpoint, self._key), self.info()["host"]

    def embed(self, texts: list[str], task: Task) -> list[list[float]]:
        """Embed `texts` with one API call; `task` is ignored."""
        return self.embed_reply(texts, task).vectors

    def embed_reply(self, texts: list[str], task: Task) -> Reply:
        """`embed()`, plus the rate limits and token usage the upstream reported."""
        if self._client is None:
            raise BackendError("backend 'openai' is not loaded")
        params: dict[str, Any] = {"input": texts, "model": self.options.model,
                                  "encoding_format": "float"}
        if self.options.dimensions is not None:
            params["dimensions"] = self.options.dimensions
        error: BackendError | None = None
        try:
            raw = self._client.embeddings.with_raw_response.create(**params)
            info = read_openai_headers(raw.headers)
            # The body read directly: the SDK's model objects cost ~0.5 ms per 256-float vector,
            # a third of a 50 ms call at 32 texts.
            reply = json.loads(raw.http_response.content)
        except self._openai.APIError as exc:
            error = self._map_error(exc)
        except ValueError:  # json.loads on a 2xx body that is not JSON
            error = BackendError("openai upstream returned malformed JSON")
        if error is not None:
            # Raised outside `except` so no SDK exception (which may quote the key) is chained.
            raise error
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list):
            raise BackendError("openai upstream returned a reply without a `data` list")
        indexes = [item.get("index") if isinstance(item, dict) else None for item in data]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes):
            raise BackendError("openai upstream returned items without a numeric `index`")
        if sorted(indexes) != list(range(len(data))):
            raise BackendError("openai upstream returned duplicate or missing indexes")
        vectors = [item.get("embedding") for _, item in sorted(zip(indexes, data), key=lambda p: p[0])]
        usage = reply.get("usage")
        usage = usage.get("total_tokens") if isinstance(usage, dict) else None
        info.tokens_used = usage if isinstance(usage, int) and usage >= 0 else None
        return Reply(check_vectors(vectors, len(texts), self.options.dimensions, self.name), info)

    def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _map_error(self, exc: Exception) -> BackendError:
        """Turn an SDK exception into an error whose message never holds the key."""
        openai = self._openai
        if isinstance(exc, openai.APITimeoutError):
            return UpstreamError(f"openai upstream timed out (timeout_s={self.options.timeout_s:g})",
                                 retryable=True)
        if isinstance(exc, openai.APIConnectionError):
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
            return UpstreamError(f"openai upstream connection failed ({cause})", retryable=True)
        if not isinstance(exc, openai.APIStatusError):
            return BackendError(f"openai upstream returned an invalid reply ({type(exc).__name__})")
        status = exc.status_code
        retryable = status in RETRYABLE_STATUSES or status >= 500
        if status in (401, 403):
            # The SDK's message can echo part of the key, so none of it is used.
            detail = "authentication failed" if status == 401 else "permission denied"
        elif status == 429 and _error_code(exc.body) == "insufficient_quota":
            detail, retryable = "insufficient quota", False
        elif status == 429:
            detail = "rate limited"
        else:
            detail = upstream_detail(self.name, status, _error_message(exc.body), self._key)
        info = read_openai_headers(exc.response.headers)
        error = UpstreamError(f"openai upstream returned {status} ({detail})",
                              upstream_status=status, retryable=retryable,
                              retry_after=info.retry_after_s)
        error.info = info
        return error


def _error_code(body: Any) -> str | None:
    error = body.get("error", body) if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _error_message(body: Any) -> str:
    """Return the message of OpenAI's `{"error": {"message": ...}}` body, or a short form of it."""
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)
    return json.dumps(body) if body is not None else "no details"


@hookimpl
def register_backends(register):
    """Register the `openai` backend."""
    register(OpenAIBackend)
