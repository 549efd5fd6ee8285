"""The text2vec-transformers contract: health, /meta and /vectors, per model."""
from __future__ import annotations

from flask import Blueprint, Response, request

from ..wire.weaviate import parse_vectors_request, render_vectors_reply
from .common import check_bearer, checked_texts, get_state, json_response

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
    model = state.get_model(name)
    req = parse_vectors_request(request.get_data(cache=False))
    checked_texts([req.text], "text")
    vector = model.embed([req.text], req.task, req.dimensions, req.pooling_strategy)[0]
    return json_response(render_vectors_reply(req.text, vector))
