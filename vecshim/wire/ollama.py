"""Ollama `/api/embed` wire format as text2vec-ollama sends it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .inputs import parse_dimensions, parse_model, parse_texts
from . import dumps
from .weaviate import parse_json_object

__all__ = ["EmbedRequest", "parse_embed_request", "render_embed_reply"]


@dataclass(frozen=True)
class EmbedRequest:
    """What `/api/embed` needs; `truncate`, `options` and `keep_alive` are accepted and ignored."""

    texts: list[str]
    model: str | None
    dimensions: int | None


def parse_embed_request(raw: bytes) -> EmbedRequest:
    """Parse an `/api/embed` body (Weaviate sends it without a Content-Type)."""
    body = parse_json_object(raw)
    model = parse_model(body)
    return EmbedRequest(texts=parse_texts(body.get("input"), "input"), model=model,
                        dimensions=parse_dimensions(body.get("dimensions")))


def render_embed_reply(vectors: Sequence[np.ndarray], model: str, prompt_tokens: int,
                       total_ns: int) -> bytes:
    """The 200 body: `embeddings` in input order, plus Ollama's timing and token fields."""
    return dumps({"model": model, "embeddings": list(vectors),
                  "total_duration": total_ns, "load_duration": 0, "prompt_eval_count": prompt_tokens})
