"""Helpers shared by the hosted-API backends: keys, reply checks, redaction."""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from pydantic import SecretStr

from ..errors import BackendError, ConfigError
from ..logs import redact as redact_known
from ..logs import register_secret

log = logging.getLogger("vecshim.upstream")

#: Things that look like API keys, in case an upstream echoes one back.
_KEY_LIKE = re.compile(r"\b(sk|pk|rk|key)-[A-Za-z0-9_*.\-]{4,}|\bBearer\s+\S+", re.IGNORECASE)
#: Longest upstream detail we copy into an error message.
MAX_DETAIL = 300


def resolve_api_key(api_key: SecretStr | None, api_key_file: Path | None,
                    env_names: Sequence[str], backend: str) -> str | None:
    """Return the key from the option, the key file or the first set env variable,
    and add it to the process's redaction list, wherever it came from.

    An empty `api_key` (say, from an unset `${VAR:-}`) counts as not set.
    """
    key = _find_api_key(api_key, api_key_file, env_names, backend)
    register_secret(key)
    return key


def _find_api_key(api_key: SecretStr | None, api_key_file: Path | None,
                  env_names: Sequence[str], backend: str) -> str | None:
    if api_key is not None and api_key.get_secret_value():
        return api_key.get_secret_value()
    if api_key_file is not None:
        try:
            key = api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"backend {backend!r}: cannot read api_key_file "
                              f"{str(api_key_file)!r}: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"backend {backend!r}: api_key_file {str(api_key_file)!r} is empty")
        return key
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def one_key_source(options):
    """Options validator (`model_validator(mode="after")`): `api_key` or `api_key_file`, not both."""
    if options.api_key is not None and options.api_key_file is not None:
        raise ValueError("set api_key or api_key_file, not both")
    return options


def key_problems(api_key: SecretStr | None, api_key_file: Path | None, env_names: Sequence[str],
                 backend: str, key_optional: bool) -> list[tuple[str, str]]:
    """Backend.preflight for a hosted API: the key resolves (option, file or env) and is not empty."""
    try:
        key = resolve_api_key(api_key, api_key_file, env_names, backend)
    except ConfigError as err:
        return [("api_key_file", err.message)]
    if key is None and not key_optional:
        return [("api_key", f"no API key: set options.api_key, options.api_key_file or "
                        f"{' or '.join(env_names)} (none is set or all are empty)")]
    return []


def endpoint_host(url: Any) -> str | None:
    """Return the host[:port] of `url`, without credentials, path or query."""
    if url is None:
        return None
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def redact(text: str, secret: str | None) -> str:
    """Return `text` without `secret`, any known secret or anything that looks like a key,
    then shortened (redaction first: a cut could leave part of a key unrecognised)."""
    if secret:
        text = text.replace(secret, "[redacted]")
    text = _KEY_LIKE.sub("[redacted]", redact_known(text))
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."


#: What a client is told for an upstream status (the upstream's own text goes only to the log).
_STATUS_TEXT = {400: "the upstream rejected the request", 404: "model or route not found upstream",
                408: "upstream request timeout", 409: "conflict upstream", 413: "request too large for the upstream",
                422: "the upstream rejected the input", 429: "rate limited"}


def upstream_detail(backend: str, status: int, text: str, secret: str | None) -> str:
    """Log an upstream error's (redacted) text; return the vecshim message a client may see.

    Upstream error bodies can echo keys in forms no redaction recognises, so
    their text never reaches a client verbatim.
    """
    log.warning("%s upstream returned %d: %s", backend, status, redact(text, secret))
    if status >= 500:
        return "upstream server error"
    return _STATUS_TEXT.get(status, "upstream error")


def check_vectors(vectors: Sequence[Any], count: int, dimensions: int | None,
                  backend: str) -> list[list[float]]:
    """Return `vectors` as lists, or raise BackendError if the reply is unusable.

    Checks there is one vector per text, that all have the same length (equal
    to `dimensions` when set) and that every value is a finite number.
    """
    if len(vectors) != count:
        raise BackendError(f"{backend} upstream returned {len(vectors)} vector(s) for {count} text(s)")
    out: list[list[float]] = []
    size = dimensions
    for i, vector in enumerate(vectors):
        if not isinstance(vector, (list, tuple)):
            raise BackendError(f"{backend} upstream returned a {type(vector).__name__} "
                               f"instead of a vector at index {i}")
        if size is None:
            size = len(vector)
        if len(vector) != size or not vector:
            raise BackendError(f"{backend} upstream returned a vector of length {len(vector)} "
                               f"at index {i}, expected {size}")
        try:
            # sum() runs in C and is non-finite if any value is; scan only then.
            finite = math.isfinite(sum(vector))
        except TypeError:
            finite = False
        if not finite:
            _check_values(vector, i, backend)
        out.append(vector if isinstance(vector, list) else list(vector))
    return out


def _check_values(vector: Sequence[Any], index: int, backend: str) -> None:
    for value in vector:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BackendError(f"{backend} upstream returned a non-number ({value!r:.20}) "
                               f"in the vector at index {index}")
        if not math.isfinite(value):
            raise BackendError(f"{backend} upstream returned a non-finite value ({value}) "
                               f"in the vector at index {index}")
