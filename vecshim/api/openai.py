"""OpenAI-compatible embeddings API: `/v1/embeddings` and `/v1/models`.

Errors on every `/v1` path are OpenAI-shaped,
`{"error": {"message", "type", "param", "code"}}`: the blueprint's handlers
cover its views, and `wants_openai_errors()` lets the app-level handlers do
the same for 404/405 on `/v1` paths that match no route.
"""
from __future__ import annotations

import logging
import time

from flask import Blueprint, request
from werkzeug.exceptions import HTTPException

from ..errors import UnknownModelError, VecshimError
from ..wire.inputs import InvalidField
from ..wire.openai import (
    RATE_LIMIT_HEADERS, parse_embeddings_request, render_embeddings_reply, render_error, render_model,
)
from .common import check_bearer, get_state, json_response, checked_texts

__all__ = ["bp", "wants_openai_errors", "openai_http_error"]

log = logging.getLogger("vecshim.api.openai")
bp = Blueprint("openai", __name__, url_prefix="/v1")
#: `created` of every listed model: when this process started serving.
STARTED = int(time.time())


def wants_openai_errors(path: str) -> bool:
    """True for paths under `/v1`, whose clients parse OpenAI error objects."""
    return path == "/v1" or path.startswith("/v1/")


@bp.post("/embeddings")
def embeddings():
    """Embed a string or a list of strings; `data` comes back in input order."""
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    req = parse_embeddings_request(request.get_data(cache=False))
    model = state.resolve_model(req.model)
    checked_texts(req.texts, "input")
    try:
        model.check_dimensions(req.dimensions)
    except VecshimError as err:
        raise InvalidField("dimensions", err.message) from None
    vectors = model.embed(req.texts, req.task, req.dimensions)
    tokens = sum(model.backend.count_tokens(req.texts))
    return json_response(render_embeddings_reply(vectors, model.name, req.encoding_format, tokens))


@bp.get("/models")
def list_models():
    """Every configured model, then every alias (with `root` naming its model)."""
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    data = [render_model(name, STARTED, root) for name, root in state.model_names.items()]
    return json_response({"object": "list", "data": data})


@bp.get("/models/<path:model>")
def get_model(model: str):
    """One model or alias, as listed by `/v1/models`."""
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    return json_response(render_model(model, STARTED, state.resolve_model(model).name))


@bp.after_request
def rate_limit_headers(response):
    """Advertise generous limits so Weaviate's text2vec-openai batches."""
    response.headers.update(RATE_LIMIT_HEADERS)
    return response


def _reply(message: str, status: int, param: str | None = None, code: str | None = None, headers=None):
    return json_response(render_error(message, status, param, code), status, headers)


@bp.errorhandler(VecshimError)
def vecshim_error(err: VecshimError):
    """Render a vecshim error OpenAI-style; unknown models are `model_not_found` on `model`."""
    if isinstance(err, UnknownModelError):
        return _reply(err.message, err.status, "model", "model_not_found", err.headers)
    return _reply(err.message, err.status, getattr(err, "param", None), headers=err.headers)


@bp.errorhandler(HTTPException)
def http_error(err: HTTPException):
    """404, 405, 413 and friends from inside the blueprint."""
    return openai_http_error(err)


@bp.errorhandler(Exception)
def unexpected(err: Exception):
    """A bug: log the traceback, tell the client only the exception type."""
    log.exception("unhandled error")
    return _reply(f"internal error ({type(err).__name__}); see the server log", 500)


def openai_http_error(err: HTTPException):
    """An OpenAI-shaped reply for a werkzeug HTTP error (also used by the app for `/v1` 404/405)."""
    headers = {k: v for k, v in err.get_headers() if k.lower() == "allow"}
    message = f"{err.code} {err.name}: {err.description}"
    if err.code in (404, 405):
        message = f"invalid URL ({request.method} {request.path}): {err.name}"
    return _reply(message, err.code or 500, headers=headers)
