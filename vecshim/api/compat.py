"""Other self-hosted Weaviate text modules: Ollama's `/api/embed` and a Hugging Face endpoint.

Both embed every text as a passage: neither module tells a query from a
document. Errors keep vecshim's `{"error": "..."}`, which is also what the
Ollama and Hugging Face clients in Weaviate decode.
"""
from __future__ import annotations

import time

from flask import Blueprint, request

from ..errors import UnknownModelError
from ..wire.huggingface import parse_feature_request, render_feature_reply
from ..wire.ollama import parse_embed_request, render_embed_reply
from .common import check_bearer, get_state, json_response, checked_texts

__all__ = ["bp"]

bp = Blueprint("compat", __name__)


def _ollama_model(name: str | None):
    """The model for an Ollama name; `name:latest` also finds `name` (Ollama's default tag)."""
    state = get_state()
    try:
        return state.resolve_model(name)
    except UnknownModelError:
        if name and name.endswith(":latest"):
            return state.resolve_model(name[:-len(":latest")])
        raise


@bp.post("/api/embed")
def ollama_embed():
    """Ollama's embed API: `model` picks the model (absent: the default), `input` is one text or many."""
    start = time.perf_counter_ns()
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    req = parse_embed_request(request.get_data(cache=False))
    model = _ollama_model(req.model)
    vectors = model.embed(checked_texts(req.texts, "input"), "passage", req.dimensions)
    tokens = sum(model.backend.count_tokens(req.texts))
    return json_response(render_embed_reply(vectors, model.name, tokens, time.perf_counter_ns() - start))


@bp.post("/hf")
@bp.post("/models/<name>/hf")
def huggingface(name: str | None = None):
    """A feature-extraction endpoint for text2vec-huggingface's `endpointURL` (the default model at `/hf`)."""
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    model = state.get_model(name)
    texts = checked_texts(parse_feature_request(request.get_data(cache=False)), "inputs")
    return json_response(render_feature_reply(model.embed(texts, "passage")))
