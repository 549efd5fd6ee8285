"""Rerank wire formats: reranker-transformers' `/rerank` and Cohere's `/v1|v2/rerank`."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import BadRequest, brief
from .inputs import InvalidField
from . import dumps
from .weaviate import clean_text, parse_json_object

__all__ = ["RerankRequest", "CohereRerankRequest", "parse_rerank_request", "render_rerank_reply",
           "parse_cohere_request", "render_cohere_reply", "render_cohere_error"]


@dataclass(frozen=True)
class RerankRequest:
    """A reranker-transformers request: documents to score, or one `property` text when there are none."""

    query: str
    documents: list[str] | None
    property: str | None


@dataclass(frozen=True)
class CohereRerankRequest:
    """A Cohere rerank request (v1 or v2)."""

    query: str
    documents: list[str]
    model: str | None
    top_n: int | None
    return_documents: bool


def _query(body: dict, param: str = "query") -> str:
    query = body.get("query")
    if query is None:
        raise InvalidField(param, "missing field 'query'")
    if not isinstance(query, str):
        raise InvalidField(param, f"field 'query' must be a string, got {type(query).__name__}")
    return clean_text(query)


def parse_rerank_request(raw: bytes) -> RerankRequest:
    """Parse a `/rerank` body: `query`, `documents` (empty strings allowed), `property`."""
    body = parse_json_object(raw)
    query = _query(body)
    docs = body.get("documents")
    prop = body.get("property")
    if prop is not None and not isinstance(prop, str):
        raise BadRequest(f"field 'property' must be a string, got {type(prop).__name__}")
    if docs is None:
        if not prop:
            raise BadRequest("missing field 'documents' (a list of strings; or a non-empty 'property' "
                             "to score one text)")
        return RerankRequest(query, None, clean_text(prop))
    if not isinstance(docs, list):
        raise BadRequest(f"field 'documents' must be a list of strings, got {type(docs).__name__}")
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise BadRequest(f"documents[{i}] must be a string, got {type(d).__name__}")
    return RerankRequest(query, [clean_text(d) for d in docs], prop)


def render_rerank_reply(req: RerankRequest, scores: Sequence[float]) -> bytes:
    """Scores in input order, one per document (Weaviate assigns them by position)."""
    if req.documents is None:
        return dumps({"query": req.query, "scores": None, "property": req.property,
                      "score": float(scores[0]), "error": None})
    return dumps({"query": req.query,
                  "scores": [{"document": d, "score": float(s)} for d, s in zip(req.documents, scores)],
                  "property": req.property, "score": None, "error": None})


def _document(item: Any, i: int) -> str:
    # Cohere v1 also takes objects; `text` is the field it ranks by default.
    if isinstance(item, dict):
        item = item.get("text")
        if not isinstance(item, str):
            raise InvalidField("documents", f"documents[{i}] is an object without a string 'text'")
    if not isinstance(item, str):
        raise InvalidField("documents", f"documents[{i}] must be a string, got {type(item).__name__}")
    return clean_text(item)


def parse_cohere_request(raw: bytes) -> CohereRerankRequest:
    """Parse Cohere's rerank body; `max_tokens_per_doc`, `rank_fields` and the like are ignored."""
    body = parse_json_object(raw)
    query = _query(body)
    docs = body.get("documents")
    if not isinstance(docs, list):
        raise InvalidField("documents", "field 'documents' must be a list of strings"
                           if docs is not None else "missing field 'documents'")
    documents = [_document(d, i) for i, d in enumerate(docs)]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidField("model", f"field 'model' must be a string, got {type(model).__name__}")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidField("top_n", f"field 'top_n' must be a positive integer, got {brief(top_n)}")
    ret = body.get("return_documents", False)
    if not isinstance(ret, bool):
        raise InvalidField("return_documents", f"field 'return_documents' must be a boolean, got {brief(ret)}")
    return CohereRerankRequest(query, documents, model or None, top_n, ret)


def render_cohere_reply(req: CohereRerankRequest, scores: Sequence[float], version: str,
                        with_documents: bool) -> bytes:
    """Results sorted by score (ties in input order), `top_n` of them, each index once."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if req.top_n is not None:
        order = order[:req.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if with_documents:
            item["document"] = {"text": req.documents[i]}
        results.append(item)
    return dumps({"id": str(uuid.uuid4()), "results": results,
                  "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}}})


def render_cohere_error(message: str) -> dict:
    """Cohere's error body."""
    return {"id": str(uuid.uuid4()), "message": message}
