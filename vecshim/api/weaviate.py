"""The text2vec-transformers contract: health, /meta and /vectors, per model."""
from __future__ import annotations

import time

from flask import Blueprint, Response, request

from ..wire.weaviate import parse_vectors_request, render_vectors_reply
from .common import check_bearer, checked_texts, error_reply, get_state, json_response

bp = Blueprint("weaviate", __name__)


@bp.get("/.well-known/live")
@bp.get("/models/<name>/.well-known/live")
def live(name: str | None = None):
    """Alive as long as the process answers."""
    if name is not None:
        get_state().check_name(name)
    return Response(status=204)


@bp.get("/.well-known/ready")
@bp.get("/models/<name>/.well-known/ready")
def ready(name: str | None = None):
    """204 once every model (or the named one) is loaded and warmed up, else 503."""
    state = get_state()
    problem = state.not_ready_reason(name)
    if problem:
        return json_response({"error": problem}, 503)
    return Response(status=204)


@bp.get("/meta")
@bp.get("/models/<name>/meta")
def meta(name: str | None = None):
    """Pre-rendered model facts; never waits on inference."""
    return json_response(get_state().meta_bytes(name))


@bp.post("/vectors")
@bp.post("/models/<name>/vectors")
def vectors(name: str | None = None):
    """Embed one text, as Weaviate sends it (no Content-Type, one text per request)."""
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    return json_response(vectors_reply(state, request.get_data(cache=False), name))


def vectors_reply(state, body: bytes, name: str | None = None) -> bytes:
    """The 200 body for one /vectors request body (errors raise VecshimError)."""
    model = state.get_model(name)
    req = parse_vectors_request(body)
    checked_texts([req.text], "text", state)
    vector = model.embed([req.text], req.task, req.dimensions, req.pooling_strategy)[0]
    return render_vectors_reply(req.text, vector)


def lean_vectors(state, body: bytes, given_id: str | None, remote: str | None) -> tuple[int, list, bytes]:
    """`POST /vectors` without Flask, for vecshim's worker (vecshim/worker.py, "lean path").

    The same steps as the Flask view and the request hooks in app.py: request id,
    in-flight count, the reply or the JSON error, metrics and the access line.
    Returns (status, headers, body). Only for servers without `embed_tokens`.
    """
    start = time.perf_counter()
    request_id = state.request_started(given_id)
    try:
        try:
            status, reply, extra = 200, vectors_reply(state, body), {}
        except Exception as err:  # rendered exactly as the Flask error handlers render it
            status, reply, extra = error_reply(err)
        state.request_finished("POST", "/vectors", "/vectors", state.default_model, status,
                               time.perf_counter() - start, remote, len(reply))
    finally:
        state.request_ended()
    headers = [*extra.items(), ("Content-Type", "application/json"), ("Content-Length", str(len(reply))),
               ("X-Request-ID", request_id)]
    return status, headers, reply
