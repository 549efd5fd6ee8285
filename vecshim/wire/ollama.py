"""Ollama `/api/embed` wire format as text2vec-ollama sends it (CONTRACTS.md §3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import BadRequest
from .inputs import InvalidField, parse_dimensions, parse_texts
from . import dumps
from .weaviate import parse_json_body

__all__ = ["EmbedRequest", "parse_embed_request", "render_embed_reply"]


@dataclass(frozen=True)
class EmbedRequest:
    """What `/api/embed` needs; `truncate`, `options` and `keep_alive` are accepted and ignored."""

    texts: list[str]
    model: str | None
    dimensions: int | None


def parse_embed_request(raw: bytes) -> EmbedRequest:
    """Parse an `/api/embed` body (Weaviate sends it without a Content-Type)."""
    body = parse_json_body(raw)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidField("model", f"field 'model' must be a string, got {type(model).__name__}")
    return EmbedRequest(texts=parse_texts(body.get("input"), "input"), model=model or None,
                        dimensions=parse_dimensions(body.get("dimensions")))


def render_embed_reply(vectors: Sequence[np.ndarray], model: str, prompt_tokens: int,
                       total_ns: int) -> bytes:
    """The 200 body: `embeddings` in input order, plus Ollama's timing and token fields."""
    return dumps({"model": model, "embeddings": list(vectors),
                  "total_duration": total_ns, "load_duration": 0, "prompt_eval_count": prompt_tokens})
