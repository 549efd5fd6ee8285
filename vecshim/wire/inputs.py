"""Input parsing shared by the multi-text protocols (OpenAI, Ollama, Hugging Face)."""
from __future__ import annotations

from typing import Any

from ..errors import BadRequest, PayloadTooLarge, brief
from .weaviate import clean_text

__all__ = ["InvalidField", "FieldTooLarge", "parse_texts", "parse_dimensions", "parse_model", "check_limits"]


class InvalidField(BadRequest):
    """A 400 about one request field; `param` names it (OpenAI errors report it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class FieldTooLarge(PayloadTooLarge):
    """A 413 about one request field (too many texts, or a text too long)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def parse_model(body: dict) -> str | None:
    """The optional `model` field: a string naming a configured model, or None."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidField("model", f"field 'model' must be a string, got {type(model).__name__}")
    return model or None


def parse_texts(value: Any, field: str) -> list[str]:
    """A string or a non-empty list of non-empty strings, as a list (lone surrogates replaced)."""
    if value is None:
        raise InvalidField(field, f"missing field '{field}'")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidField(field, f"field '{field}' must be a string or a list of strings, "
                                  f"got {type(value).__name__}")
    if not items:
        raise InvalidField(field, f"field '{field}' is an empty list")
    texts = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            # OpenAI also accepts token-id arrays; we cannot detokenize for an arbitrary backend.
            kind = "token ids" if isinstance(item, (int, list)) and not isinstance(item, bool) else \
                type(item).__name__
            raise InvalidField(field, f"{field}[{i}] must be a string, got {kind}")
        if item == "":
            raise InvalidField(field, f"{field}[{i}] is an empty string")
        texts.append(clean_text(item))
    return texts


def parse_dimensions(value: Any, field: str = "dimensions") -> int | None:
    """An optional positive integer output size (null or absent: the native size)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidField(field, f"field '{field}' must be a positive integer, got {brief(value)}")
    return value


def check_limits(texts: list[str], field: str, max_texts: int, max_chars: int) -> None:
    """413 when a request carries more texts, or a longer text, than the server allows."""
    if len(texts) > max_texts:
        raise FieldTooLarge(field, f"{len(texts)} texts in '{field}'; the limit is {max_texts} per request")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise FieldTooLarge(field, f"{field}[{i}] has {len(text)} characters; the limit is {max_chars}")
