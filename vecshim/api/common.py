"""Helpers shared by the blueprints: state lookup, auth, JSON replies."""
from __future__ import annotations

import hmac
import logging

from flask import Response, current_app, request

from ..errors import Unauthorized, VecshimError
from ..wire import dumps
from ..wire.inputs import check_limits

__all__ = ["get_state", "json_response", "check_bearer", "checked_texts", "error_reply"]

_log = logging.getLogger("vecshim.app")


def get_state():
    """The running app's State."""
    return current_app.extensions["vecshim"]


def json_response(data, status: int = 200, headers: dict | None = None) -> Response:
    """A compact JSON reply (bytes are passed through untouched)."""
    body = data if isinstance(data, bytes) else dumps(data)
    return Response(body, status=status, mimetype="application/json", headers=headers)


def error_reply(err: Exception) -> tuple[int, bytes, dict]:
    """(status, JSON body, headers) for an error: a VecshimError's own, else a logged 500 that names
    only the exception's type (its text may hold request data or secrets)."""
    if isinstance(err, VecshimError):
        return err.status, dumps({"error": err.message}), dict(err.headers)
    _log.exception("unhandled error")
    return 500, dumps({"error": f"internal error ({type(err).__name__}); see the server log"}), {}


def check_bearer(tokens: list[str]) -> None:
    """Raise Unauthorized unless the request carries one of `tokens` (no tokens: open)."""
    if not tokens:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    ok = False
    if scheme.lower() == "bearer" and given:
        # Compare against every token so timing says nothing about which matched.
        for token in tokens:
            ok |= hmac.compare_digest(given.strip().encode(), token.encode())
    if not ok:
        raise Unauthorized("missing or invalid bearer token",
                           headers={"WWW-Authenticate": 'Bearer realm="vecshim"'})


def checked_texts(texts: list[str], field: str, state=None) -> list[str]:
    """`texts`, after the server's limits on text count and length (413 beyond them).

    `state`: the app's State where there is no Flask request (the lean /vectors path)."""
    server = (state or get_state()).config.server
    check_limits(texts, field, server.max_texts_per_request, server.max_text_chars)
    return texts
