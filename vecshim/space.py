"""Vector-space identity: what a fingerprint covers, the dimension check set, pooling names.

A served vector must come from the configured model's vector space: the same
backend and plugin, the same model, dimension, pooling, prefixes and
normalisation. Everything here is pure and cheap, so `vecshim config check`
can use it without loading a model.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np

from .errors import BackendError, BadRequest, ConfigError, brief

__all__ = ["CHECK_TEXTS", "DEFAULT_POOLING", "identity_problem", "check_texts", "dimension_problem",
           "learn_dimension", "checked_vectors", "space_id", "resolve_pooling", "resolve_dimensions", "truncate", "differences"]

#: Weaviate's default `pooling_strategy`: it sends this unless a collection sets another.
DEFAULT_POOLING = "masked_mean"

#: The dimension check set: a backend must give every one the same length.
CHECK_TEXTS: dict[str, str] = {
    "short": "vecshim",
    "long": " ".join(f"Sentence {i} of a long passage about rivers, lanterns and copper engines "
                     f"that vecshim embeds to learn the model's dimension." for i in range(60)),
    "multilingual": "Москва — столица России. 東京タワーは赤い。Ελληνικά, naïve café, العربية 🙂",
}


def identity_problem(backend) -> str | None:
    """Why a backend cannot be told apart from another (None: its identity is fine)."""
    try:
        parts = backend.fingerprint_parts()
    except Exception as err:  # a plugin bug: name it, keep the traceback out of the message
        return f"backend {backend.name!r}: fingerprint_parts() raised {type(err).__name__}"
    if not isinstance(parts, dict):
        return f"backend {backend.name!r}: fingerprint_parts() must return a dict, got {type(parts).__name__}"
    if not any(v not in (None, "", {}, [], ()) for v in parts.values()):
        return (f"backend {backend.name!r} must say which model it serves: implement info() or "
                f"fingerprint_parts() (model id, revision, options that change the vectors)")
    return None


def require_identity(model_name: str, backend) -> None:
    """Raise ConfigError if the backend's identity is empty."""
    problem = identity_problem(backend)
    if problem:
        raise ConfigError(f"models.{model_name}: {problem}")


def check_texts(backend) -> dict[str, str]:
    """The check set, with the long text cut to what the backend reads in one piece."""
    limit = backend.max_input_tokens
    out = dict(CHECK_TEXTS)
    if limit is not None and backend.count_tokens([out["long"]])[0] > limit:
        out["long"] = backend.split_text(out["long"], limit)[0]
    return out


def dimension_problem(backend_name: str, lengths: dict[str, int], declared: int | None) -> str | None:
    """A reason naming the lengths seen if the check set disagrees (or differs from a declared size)."""
    seen: dict[int, list[str]] = {}
    for label, n in lengths.items():
        seen.setdefault(n, []).append(label)
    if len(seen) == 1 and (declared is None or declared in seen):
        return None
    described = ", ".join(f"{n} ({', '.join(labels)})" for n, labels in sorted(seen.items()))
    if len(seen) == 1:
        return f"backend {backend_name!r} declares dimension {declared} but returned vectors of length {described}"
    return (f"backend {backend_name!r} returned vectors of different lengths for the check texts: {described}; "
            f"vecshim will not guess which is the model's dimension")


def learn_dimension(backend, length_of: Callable[[str], int]) -> int:
    """A declared dimension, checked with the short text; else the one length every check text gets.

    `length_of(text)` embeds one text per call, so a wrong length names its text.
    """
    declared = backend.dimension
    texts = check_texts(backend)
    if declared is not None:
        texts = {"short": texts["short"]}
    lengths = {label: length_of(text) for label, text in texts.items()}
    problem = dimension_problem(backend.name, lengths, declared)
    if problem:
        raise BackendError(problem)
    return next(iter(lengths.values()))


def checked_vectors(raw: Any, count: int, dimension: int | None, backend_name: str) -> np.ndarray:
    """A backend's reply to one call as a float32 array, or BackendError: `count` finite
    vectors of one length (of `dimension`, once it is known)."""
    try:
        arr = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as err:
        lengths = _lengths(raw)
        if lengths:
            raise BackendError(f"backend {backend_name!r} returned vectors of different lengths "
                               f"in one call ({', '.join(map(str, lengths))})") from None
        raise BackendError(f"backend {backend_name!r} returned non-numeric vectors") from err
    if arr.ndim != 2 or arr.shape[0] != count:
        raise BackendError(f"backend {backend_name!r} returned {arr.shape[0] if arr.ndim else 0} "
                           f"vectors for {count} texts")
    if arr.shape[1] == 0 or (dimension is not None and arr.shape[1] != dimension):
        raise BackendError(f"backend {backend_name!r} returned vectors of length {arr.shape[1]}, "
                           f"expected {dimension}")
    if not np.isfinite(arr).all():
        raise BackendError(f"backend {backend_name!r} returned non-finite numbers")
    return arr


def _lengths(raw) -> list[int] | None:
    """Each row's length if `raw` is a sequence of sequences, else None."""
    try:
        return [len(r) for r in raw]
    except TypeError:
        return None


def space_id(fingerprint: str, pooling: str | None) -> str:
    """The fingerprint of a model's vectors under a request's pooling (its own: the fingerprint)."""
    if pooling is None:
        return fingerprint
    return hashlib.sha256(f"{fingerprint}\x00pooling={pooling}".encode()).hexdigest()[:16]


def resolve_pooling(model_name: str, supported: tuple[str, ...], requested: Any) -> str | None:
    """The pooling a request asks for: None for the model's own, else one it supports, else 400."""
    if requested is None or requested == "":
        return None
    if not isinstance(requested, str):
        raise BadRequest(f"config.pooling_strategy must be a string, got {brief(requested)}")
    if not supported:
        if requested == DEFAULT_POOLING:  # Weaviate's default: "the model's own pooling"
            return None
        raise BadRequest(f"model {model_name!r} pools as its backend does and cannot honour pooling_strategy "
                         f"{brief(requested)}; supported: {DEFAULT_POOLING} (the model's own pooling)")
    if requested == supported[0]:
        return None
    if requested in supported:
        return requested
    raise BadRequest(f"model {model_name!r} does not support pooling_strategy {brief(requested)}; "
                     f"supported: {', '.join(supported)}")


def resolve_dimensions(model_name: str, native: int | None, requested: Any, matryoshka: bool,
                       strict: bool) -> int | None:
    """The output size a request asks for: None for the native size, else one served by truncation, else 400.

    Below the native size the vector is truncated (and renormalised if the
    model's vectors are unit length), as sentence-transformers' `truncate_dim`
    does, unless the model is configured `dimensions: strict` and is not
    Matryoshka-trained.
    """
    if requested is None or requested == native:
        return None
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise BadRequest(f"dimensions must be a positive integer, got {brief(requested)}")
    if native is not None and requested > native:
        raise BadRequest(f"model {model_name!r} has {native} dimensions; cannot serve {requested}")
    if not matryoshka and strict:
        raise BadRequest(f"model {model_name!r} produces {native} dimensions and does not support "
                         f"truncation (not a Matryoshka model, dimensions: strict); omit dimensions or "
                         f"set it to {native}")
    return requested


def truncate(v: np.ndarray, dims: int, renormalise: bool) -> np.ndarray:
    """The first `dims` values, back to unit length if the model's vectors are (as `truncate_dim` does)."""
    out = np.array(v[:dims], dtype=np.float32, copy=True)
    if renormalise:
        n = float(np.linalg.norm(out))
        if n > 0:
            out /= n
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def differences(mine: dict[str, Any], theirs: dict[str, Any], *, known_only: bool = False) -> list[str]:
    """`key theirs ≠ mine` for each differing leaf (known_only: skip keys missing on either side).

    Before loading, parts decided at load (a learnt dimension, a checked runtime)
    are missing, not None: None is a value ("the model's default").
    """
    a, b = _flatten(mine), _flatten(theirs)
    out = []
    for key in sorted(set(a) | set(b)):
        if known_only and (key not in a or key not in b):
            continue
        x, y = a.get(key), b.get(key)
        if _norm(x) != _norm(y):
            out.append(f"{key} {_show(y)} \u2260 {_show(x)}")
    return out


def _norm(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _show(v: Any) -> str:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else json.dumps(v, default=str)


