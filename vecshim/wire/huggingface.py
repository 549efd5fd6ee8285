"""Hugging Face feature-extraction wire format as text2vec-huggingface sends it."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .inputs import InvalidField, parse_texts
from . import dumps
from .weaviate import parse_json_object

__all__ = ["parse_feature_request", "render_feature_reply"]


def parse_feature_request(raw: bytes) -> list[str]:
    """The texts of a `{"inputs": ..., "options": {...}}` body; `options` is accepted and ignored."""
    body = parse_json_object(raw)
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise InvalidField("options", f"field 'options' must be an object, got {type(options).__name__}")
    return parse_texts(body.get("inputs"), "inputs")


def render_feature_reply(vectors: Sequence[np.ndarray]) -> bytes:
    """The 200 body: a bare `[[f32, ...], ...]`, the first shape Weaviate's client tries."""
    return dumps(list(vectors))
