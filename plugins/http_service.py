"""Call a team's existing internal HTTP embedding service.

The request body is a JSON template in which the string values `"$texts"`
(the list of texts), `"$text"` (one text: one request per text) and
`"$task"` (the task, mapped through `task_values`) are replaced; the
vectors are read from the reply at `response_path`: dot-separated keys,
list indexes, and `*` for "each item of this list"::

    models:
      internal:
        backend: http-service
        options:
          url: http://embedder.internal:8000/v1/encode
          request: {inputs: "$texts", kind: "$task", normalize: true}
          response_path: result.*.vector       # {"result": [{"vector": [...]}, ...]}
          task_values: {query: q, passage: doc}
          api_key: "${EMBEDDER_TOKEN}"         # sent as "Authorization: Bearer ..."
          model_id: embedder-v3                # names the vector space (fingerprint)

429, 5xx, timeouts and refused connections raise a retryable
`UpstreamError` (the core retries within the model's budget); other
statuses and unusable replies raise a non-retryable one.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, HttpUrl, SecretStr, field_validator, model_validator

from vecshim import Backend, BackendError, BackendOptions, UpstreamError, hookimpl

PLACEHOLDERS = ("$texts", "$text", "$task")
RETRYABLE = frozenset({408, 425, 429})


class HttpServiceOptions(BackendOptions):
    """Options of the `http-service` backend."""

    url: HttpUrl
    request: Any = Field(default_factory=lambda: {"texts": "$texts"})
    response_path: str = "embeddings"
    task_values: dict[str, str] = Field(default_factory=lambda: {"query": "query", "passage": "passage"})
    headers: dict[str, str] = Field(default_factory=dict)
    api_key: SecretStr | None = None
    api_key_header: str = "Authorization"
    api_key_prefix: str = "Bearer "
    timeout_s: float = Field(30.0, gt=0)
    max_batch_size: int = Field(32, ge=1)
    max_input_tokens: int | None = Field(512, ge=1)
    normalized: bool = False
    model_id: str | None = None

    @field_validator("response_path")
    @classmethod
    def _path_syntax(cls, v: str) -> str:
        if any(part == "" for part in v.split(".")) and v != "":
            raise ValueError("empty segment in path (use keys, indexes or * separated by single dots)")
        return v

    @model_validator(mode="after")
    def _template(self) -> HttpServiceOptions:
        found = set(_placeholders(self.request))
        if ("$texts" in found) == ("$text" in found):
            raise ValueError('request must contain exactly one of "$texts" (batch) or "$text" (one per request)')
        if set(self.task_values) != {"query", "passage"}:
            raise ValueError("task_values needs exactly the keys query and passage")
        if any(k.lower() == self.api_key_header.lower() for k in self.headers) and self.api_key is not None:
            raise ValueError(f"headers already sets {self.api_key_header}; use api_key or headers, not both")
        return self


def _placeholders(template: Any):
    if isinstance(template, str) and template in PLACEHOLDERS:
        yield template
    elif isinstance(template, dict):
        for v in template.values():
            yield from _placeholders(v)
    elif isinstance(template, list):
        for v in template:
            yield from _placeholders(v)


def fill(template: Any, values: dict[str, Any]) -> Any:
    """Return `template` with each placeholder string replaced by its value."""
    if isinstance(template, str) and template in values:
        return values[template]
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    return template


def extract(reply: Any, path: str) -> Any:
    """Follow `path` (keys, indexes, `*`) into a parsed JSON reply; raise KeyError if it breaks."""
    parts = path.split(".") if path else []

    def walk(node: Any, i: int) -> Any:
        if i == len(parts):
            return node
        part = parts[i]
        if part == "*":
            if not isinstance(node, list):
                raise KeyError(f"'{'.'.join(parts[:i]) or '(root)'}' is not a list")
            return [walk(item, i + 1) for item in node]
        if isinstance(node, list) and part.lstrip("-").isdigit():
            try:
                return walk(node[int(part)], i + 1)
            except IndexError:
                raise KeyError(f"index {part} out of range") from None
        if isinstance(node, dict) and part in node:
            return walk(node[part], i + 1)
        raise KeyError(f"no '{part}' at '{'.'.join(parts[:i]) or '(root)'}'")

    return walk(reply, 0)


class HttpServiceBackend(Backend):
    """Vectors from an in-house HTTP service, mapped by a request template and a reply path."""

    name = "http-service"
    Options = HttpServiceOptions
    concurrency = 4  # the work is waiting on the network

    def __init__(self, options: HttpServiceOptions):
        super().__init__(options)
        self.max_batch_size = options.max_batch_size
        self.max_input_tokens = options.max_input_tokens
        self.normalized = options.normalized
        found = set(_placeholders(options.request))
        self.per_text = "$text" in found
        self.task_aware = "$task" in found and options.task_values["query"] != options.task_values["passage"]
        self.url = str(options.url)
        self.host = urlsplit(self.url).hostname or ""

    def info(self) -> dict[str, Any]:
        """Model id and host (no path or query, which may carry tokens)."""
        return {"model": self.options.model_id, "host": self.host, "per_text": self.per_text}

    def fingerprint_parts(self) -> dict[str, Any]:
        """The model id names the space; without one, the host and template do."""
        o = self.options
        return {"model": o.model_id or self.host, "request": o.request, "task_values": o.task_values}

    def embed(self, texts, task):
        """One request for the batch (or one per text with `$text`)."""
        value = self.options.task_values[task]
        if self.per_text:
            return [self._call({"$text": t, "$task": value}, 1)[0] for t in texts]
        return self._call({"$texts": list(texts), "$task": value}, len(texts))

    def _call(self, values: dict[str, Any], count: int) -> list[list[float]]:
        o = self.options
        body = json.dumps(fill(o.request, values)).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", **o.headers}
        if o.api_key is not None:
            headers[o.api_key_header] = o.api_key_prefix + o.api_key.get_secret_value()
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=o.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            status = err.code
            retry_after = _seconds(err.headers.get("Retry-After"))
            err.close()
            raise UpstreamError(f"{self.host} answered {status}", upstream_status=status, retry_after=retry_after,
                                retryable=status in RETRYABLE or status >= 500) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise UpstreamError(f"{self.host} unreachable ({type(reason).__name__})", retryable=True) from None
        try:
            vectors = extract(json.loads(raw), o.response_path)
        except ValueError:
            raise BackendError(f"{self.host} answered with a body that is not JSON") from None
        except KeyError as err:
            raise BackendError(f"{self.host} reply has no vectors at {o.response_path!r}: {err.args[0]}") from None
        if self.per_text and isinstance(vectors, list) and vectors and not isinstance(vectors[0], list):
            vectors = [vectors]  # the path led to the single vector itself
        if not isinstance(vectors, list) or len(vectors) != count:
            got = len(vectors) if isinstance(vectors, list) else type(vectors).__name__
            raise BackendError(f"{self.host} returned {got} vectors for {count} texts")
        return vectors


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


@hookimpl
def register_backends(register):
    """Register the `http-service` backend."""
    register(HttpServiceBackend)
