"""Reranking routes: reranker-transformers' `/rerank` (per reranker too) and Cohere's `/v1|v2/rerank`.

`/rerank` errors are vecshim's `{"error": "..."}` (Weaviate parses the body
before the status); Cohere's routes answer `{"message": "..."}`, which both
the cohere SDK and Weaviate's reranker-cohere client read.
"""
from __future__ import annotations

import logging

from flask import Blueprint, g, request
from werkzeug.exceptions import HTTPException

from ..errors import NotFound, VecshimError, brief
from ..wire.rerank import (
    parse_cohere_request, parse_rerank_request, render_cohere_error, render_cohere_reply, render_rerank_reply,
)
from .common import check_bearer, checked_texts, get_state, json_response

__all__ = ["bp", "cohere_bp", "get_ranker", "resolve_ranker"]

log = logging.getLogger("vecshim.api.rerank")
bp = Blueprint("rerank", __name__)
cohere_bp = Blueprint("cohere_rerank", __name__)


class UnknownRerankerError(NotFound):
    """A reranker name that is not configured; the message lists the configured names."""

    def __init__(self, name, available):
        names = ", ".join(sorted(available)) or "(none)"
        super().__init__(f"unknown reranker {brief(name)}; configured rerankers: {names}")


def get_ranker(name: str | None):
    """The named reranker (None: the default); unknown names are a 404 listing the rerankers."""
    state = get_state()
    rankers = state.rerankers
    if name is None:
        name = state.config.default_reranker
        if name is None:
            raise NotFound("no reranker is configured (the config has an empty `rerankers:`)")
    if name not in rankers:
        raise UnknownRerankerError(name, rankers)
    g.vecshim_model = name  # labels metrics and the access log
    return rankers[name]


def resolve_ranker(name: str | None):
    """A reranker by configured name or alias (None: the default)."""
    if name is None:
        return get_ranker(None)
    state = get_state()
    if name not in state.rerankers:
        for rname, ranker in state.rerankers.items():
            if name in ranker.cfg.aliases:
                return get_ranker(rname)
        names = [*state.rerankers, *(a for r in state.rerankers.values() for a in r.cfg.aliases)]
        raise UnknownRerankerError(name, names)
    return get_ranker(name)


@bp.post("/rerank")
@bp.post("/models/<name>/rerank")
def rerank(name: str | None = None):
    """Score documents against the query; one score per document, in input order."""
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    ranker = get_ranker(name)
    req = parse_rerank_request(request.get_data(cache=False))
    texts = req.documents if req.documents is not None else [req.property]
    checked_texts([req.query], "query")
    checked_texts(texts, "documents")
    return json_response(render_rerank_reply(req, ranker.rank(req.query, texts)))


def _cohere(version: str):
    state = get_state()
    check_bearer(state.config.server.auth.embed_tokens)
    req = parse_cohere_request(request.get_data(cache=False))
    ranker = resolve_ranker(req.model)
    checked_texts([req.query], "query")
    checked_texts(req.documents, "documents")
    scores = ranker.rank(req.query, req.documents)
    return json_response(render_cohere_reply(req, scores, version, req.return_documents))


@cohere_bp.post("/v1/rerank")
def cohere_v1():
    """Cohere's v1 rerank: `documents` may be strings or `{"text": ...}` objects."""
    return _cohere("1")


@cohere_bp.post("/v2/rerank")
def cohere_v2():
    """Cohere's v2 rerank (reranker-cohere with `baseURL`, the cohere SDK's `ClientV2.rerank`)."""
    return _cohere("2")


@cohere_bp.errorhandler(VecshimError)
def cohere_error(err: VecshimError):
    """Cohere-shaped error body, same status."""
    return json_response(render_cohere_error(err.message), err.status, err.headers)


@cohere_bp.errorhandler(HTTPException)
def cohere_http_error(err: HTTPException):
    """413 and friends from inside the blueprint."""
    return json_response(render_cohere_error(f"{err.code} {err.name}: {err.description}"), err.code or 500)


@cohere_bp.errorhandler(Exception)
def cohere_unexpected(err: Exception):
    """A bug: log the traceback, tell the client only the exception type."""
    log.exception("unhandled error")
    return json_response(render_cohere_error(f"internal error ({type(err).__name__}); see the server log"), 500)
