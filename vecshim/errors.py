"""Error hierarchy: every failure a client can see is a VecshimError with a status."""
from __future__ import annotations

import reprlib

__all__ = [
    "VecshimError", "ConfigError", "BadRequest", "NotFound", "UnknownModelError",
    "UnknownBackendError", "PayloadTooLarge", "BackendError", "UpstreamError", "BackendUnavailable",
    "Overloaded", "InferenceTimeout", "Unauthorized", "ClientGone", "brief",
]

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 3, 6, 6


def brief(value) -> str:
    """repr() of a client-sent value, cut short: error messages never echo a whole request."""
    return _BRIEF.repr(value)


class VecshimError(Exception):
    """Base class: `status` is the HTTP status, `str(err)` the client-safe message."""

    status = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, status: int | None = None, headers: dict | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if headers:
            self.headers = dict(headers)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(VecshimError):
    """Invalid configuration or a missing optional dependency; raised before serving."""


class BadRequest(VecshimError):
    """The client sent something we cannot embed (400)."""

    status = 400


class Unauthorized(VecshimError):
    """Missing or wrong bearer token (401)."""

    status = 401


class NotFound(VecshimError):
    """Unknown route or resource (404)."""

    status = 404


class UnknownModelError(NotFound):
    """A model name that is not configured; the message lists the configured names."""

    def __init__(self, name: str, available):
        names = ", ".join(sorted(available)) or "(none)"
        super().__init__(f"unknown model {brief(name)}; configured models: {names}")
        self.name = name


class UnknownBackendError(ConfigError, KeyError):
    """A backend name no plugin registered; the message lists the registered names."""

    def __init__(self, name: str, available, kind: str = "backend"):
        names = ", ".join(sorted(available)) or "(none)"
        ConfigError.__init__(self, f"unknown {kind} {name!r}; installed {kind}s: {names}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class PayloadTooLarge(VecshimError):
    """Request body, text count or text length beyond the configured limits (413)."""

    status = 413


class BackendError(VecshimError):
    """The backend failed to embed (upstream error, bad reply, plugin exception)."""

    status = 502


class UpstreamError(BackendError):
    """A hosted API answered with an error or could not be reached.

    `upstream_status` is the provider's HTTP status (None for connection
    errors and timeouts), `retry_after` its Retry-After in seconds, and
    `retryable` whether trying again may help (429, 5xx, timeouts).
    """

    def __init__(self, message: str, *, upstream_status: int | None = None,
                 retry_after: float | None = None, retryable: bool = False):
        super().__init__(message)
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        self.retryable = retryable


class BackendUnavailable(BackendError):
    """The backend is not loaded yet or its circuit is open (503)."""

    status = 503


class Overloaded(VecshimError):
    """The model's queue is full; retry later (503 with Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class InferenceTimeout(VecshimError):
    """The request waited longer than the model's timeout (504)."""

    status = 504


class ClientGone(VecshimError):
    """The client closed its connection while its texts waited; they were dropped (499)."""

    status = 499
