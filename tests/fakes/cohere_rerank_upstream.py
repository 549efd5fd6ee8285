"""A fake Cohere rerank API (`POST /v1/rerank`, `/v2/rerank`) beside the fake embed API."""
from __future__ import annotations

import hashlib
import uuid
from typing import Any, Callable

from . import Recorded
from .cohere_upstream import FakeCohere

__all__ = ["FakeCohereRerank", "relevance"]


def relevance(query: str, document: str) -> float:
    """The fake's score: the share of query words in the document, plus a tiny hash tie-breaker, in [0, 1)."""
    words = set(query.lower().split())
    overlap = len(words & set(document.lower().split())) / max(1, len(words))
    tie = int.from_bytes(hashlib.sha256(f"{query}\x00{document}".encode()).digest()[:2], "little") / 65536
    return round(0.9 * overlap + 0.09 * tie, 6)


class FakeCohereRerank(FakeCohere):
    """Cohere's rerank wire format: results sorted by score, `top_n` of them, `document` when asked (v1)."""

    #: Set to spoil replies: "drop" (a document missing), "repeat" (an index twice), "range" (index too large).
    spoil: str | None = None

    def answer(self, request: Recorded, mutate: Callable) -> tuple[int, Any]:
        path = request.path.rstrip("/")
        if request.method != "POST" or path not in ("/v1/rerank", "/v2/rerank"):
            return super().answer(request, mutate)
        body = request.body if isinstance(request.body, dict) else {}
        docs, query = body.get("documents"), body.get("query")
        if not isinstance(query, str) or not query:
            return 400, self.error_body(400, "invalid request: query must be a non-empty string")
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
            return 400, self.error_body(400, "invalid request: documents must be a non-empty list of strings")
        if len(docs) > 1000:
            return 400, self.error_body(400, f"invalid request: at most 1000 documents, received {len(docs)}")
        if path == "/v2/rerank" and not isinstance(body.get("model"), str):
            return 400, self.error_body(400, "invalid request: model is required")
        scores = [relevance(query, d) for d in docs]
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:body.get("top_n") or len(docs)]
        results = [{"index": i, "relevance_score": scores[i]} for i in order]
        if self.spoil == "drop":
            results = results[:-1]
        elif self.spoil == "repeat":
            results[-1] = dict(results[0])
        elif self.spoil == "range":
            results[-1]["index"] = len(docs)
        if body.get("return_documents"):
            for r in results:
                r["document"] = {"text": docs[r["index"]]}
        return 200, {"id": str(uuid.uuid4()), "results": results,
                     "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}
