"""Weaviate text2vec-transformers wire format: lenient in, exact out."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadRequest, brief
from . import dumps

__all__ = ["VectorsRequest", "parse_json_body", "parse_json_object", "parse_vectors_request", "render_vectors_reply", "clean_text"]

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class VectorsRequest:
    """What `/vectors` needs from a Weaviate request body."""

    text: str
    task: str
    dimensions: int | None
    pooling_strategy: str | None


def clean_text(text: str) -> str:
    """Replace lone surrogates (legal in JSON escapes, not in UTF-8) with U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


def parse_json_body(raw: bytes) -> Any:
    """Decode a JSON body whatever the Content-Type; 400 with a clear reason if invalid."""
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadRequest(f"request body is not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise BadRequest(f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as err:  # e.g. an integer literal beyond int_max_str_digits
        raise BadRequest(f"request body is not valid JSON: {str(err)[:120]}") from None


def parse_json_object(raw: bytes) -> dict:
    """Decode a body that must be a JSON object (every protocol's requests are)."""
    body = parse_json_body(raw)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _task(value: Any) -> str:
    if value is None or value == "":
        return "passage"
    if value in ("query", "passage"):
        return value
    raise BadRequest(f"config.task_type must be 'query' or 'passage', got {brief(value)}")


def _dimensions(value: Any) -> int | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"config.dimensions must be a positive integer, got {brief(value)}")
    return value


def _pooling(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"config.pooling_strategy must be a string such as 'masked_mean' or 'cls', "
                         f"got {brief(value)}")
    return value


def parse_vectors_request(raw: bytes) -> VectorsRequest:
    """Parse a `/vectors` body; `dims`, `vector`, `error` and unknown keys are ignored."""
    body = parse_json_object(raw)
    text = body.get("text")
    if text is None:
        raise BadRequest("missing field 'text'")
    if not isinstance(text, str):
        raise BadRequest(f"field 'text' must be a string, got {type(text).__name__}")
    if text == "":
        raise BadRequest("field 'text' is empty")
    config = body.get("config")
    if config is None:
        config = {}
    elif not isinstance(config, dict):
        raise BadRequest(f"field 'config' must be an object, got {type(config).__name__}")
    return VectorsRequest(
        text=clean_text(text),
        task=_task(config.get("task_type")),
        dimensions=_dimensions(config.get("dimensions")),
        pooling_strategy=_pooling(config.get("pooling_strategy")),
    )


def render_vectors_reply(text: str, vector: np.ndarray) -> bytes:
    """The 200 body: text echo, float32 vector, and its length as `dim` and `dims`."""
    n = int(vector.shape[0])
    return dumps({"text": text, "vector": vector, "dim": n, "dims": n})
