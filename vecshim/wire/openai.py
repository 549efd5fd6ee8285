"""OpenAI embeddings wire format: lenient in, OpenAI-shaped out."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import brief
from .inputs import InvalidField, parse_dimensions, parse_model, parse_texts
from . import dumps
from .weaviate import parse_json_object

__all__ = [
    "EmbeddingsRequest", "parse_embeddings_request", "render_embeddings_reply", "render_model",
    "render_error", "RATE_LIMIT_HEADERS", "ENCODINGS", "INPUT_TYPES",
]

ENCODINGS = ("float", "base64")
#: vecshim extension: which side of an asymmetric model the texts are for.
INPUT_TYPES = ("query", "passage")

#: We do not rate-limit, but Weaviate's text2vec-openai sends one text per
#: request, serially, until it sees positive limits.
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "1000000",
    "x-ratelimit-limit-tokens": "1000000000",
    "x-ratelimit-remaining-requests": "1000000",
    "x-ratelimit-remaining-tokens": "1000000000",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-reset-tokens": "1s",
}

_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
          502: "upstream_error", 503: "unavailable", 504: "timeout"}


@dataclass(frozen=True)
class EmbeddingsRequest:
    """What `/v1/embeddings` needs from an OpenAI-style request body."""

    texts: list[str]
    model: str | None
    dimensions: int | None
    encoding_format: str
    task: str


def _choice(body: dict, field: str, allowed: Sequence[str], default: str) -> str:
    value = body.get(field)
    if value is None:
        return default
    if value not in allowed:
        raise InvalidField(field, f"field '{field}' must be one of {', '.join(allowed)}, got {brief(value)}")
    return value


def parse_embeddings_request(raw: bytes) -> EmbeddingsRequest:
    """Parse a `/v1/embeddings` body; `user` and unknown keys are ignored."""
    body = parse_json_object(raw)
    model = parse_model(body)
    return EmbeddingsRequest(
        texts=parse_texts(body.get("input"), "input"),
        model=model,
        dimensions=parse_dimensions(body.get("dimensions")),
        encoding_format=_choice(body, "encoding_format", ENCODINGS, "float"),
        task=_choice(body, "input_type", INPUT_TYPES, "passage"),
    )


def _encode(vector: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":
        # The OpenAI SDK decodes with np.frombuffer(..., dtype="float32"): little-endian float32.
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.ascontiguousarray(vector, dtype=np.float32)


def render_embeddings_reply(vectors: Sequence[np.ndarray], model: str, encoding_format: str,
                            prompt_tokens: int) -> bytes:
    """The 200 body: `data` in input order with `index`, and token `usage`."""
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)}
            for i, v in enumerate(vectors)]
    return dumps({"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


def render_model(name: str, created: int, root: str) -> dict:
    """One entry of `/v1/models`; `root` is the configured model an alias points to."""
    return {"id": name, "object": "model", "created": created, "owned_by": "vecshim", "root": root}


def render_error(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}
