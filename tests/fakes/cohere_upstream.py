"""A fake Cohere embed API: `POST /v2/embed`."""
from __future__ import annotations

import uuid
from typing import Any, Callable

from . import FakeUpstream, Recorded

__all__ = ["FakeCohere"]

INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")


class FakeCohere(FakeUpstream):
    """Cohere's v2 wire format. Vectors depend on the text and the `input_type`
    (`fake.vector(text, "search_query")`); `output_dimension` sets their size.
    """

    def error_body(self, status: int, message: str, code: str | None = None) -> Any:
        """Return `{"id": ..., "message": ...}`."""
        if status == 401:
            message = f"invalid api token ({message})"
        return {"id": str(uuid.uuid4()), "message": message}

    def request_tokens(self, request: Recorded) -> int:
        """Words of `texts`."""
        texts = request.body.get("texts") if isinstance(request.body, dict) else None
        return sum(len(t.split()) for t in texts if isinstance(t, str)) if isinstance(texts, list) else 0

    def limit_headers(self, limits: dict[str, Any]) -> dict[str, str]:
        """Trial keys' per-minute call limit (`x-trial-endpoint-call-limit/-remaining`)."""
        if "requests" not in limits:
            return {}
        limit, remaining, _ = limits["requests"]
        return {"x-trial-endpoint-call-limit": str(limit), "x-trial-endpoint-call-remaining": str(remaining)}

    def answer(self, request: Recorded, mutate: Callable) -> tuple[int, Any]:
        """Embed `texts` as Cohere does, answering `float`, `int8` or `uint8` embeddings."""
        if request.method != "POST" or request.path.rstrip("/") != "/v2/embed":
            return 404, self.error_body(404, f"{request.method} {request.path} not found")
        body = request.body if isinstance(request.body, dict) else {}
        texts = body.get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return 400, self.error_body(400, "invalid request: texts must be a non-empty list of strings")
        if len(texts) > 96:
            return 400, self.error_body(400, f"invalid request: total number of texts must be at most 96 - received {len(texts)}")
        if not isinstance(body.get("model"), str):
            return 400, self.error_body(400, "invalid request: model is required")
        input_type = body.get("input_type")
        if input_type not in INPUT_TYPES:
            return 400, self.error_body(400, f"invalid request: input_type must be one of {INPUT_TYPES}")
        types = body.get("embedding_types") or ["float"]
        if not set(types) <= {"float", "int8", "uint8"}:
            return 400, self.error_body(400, f"invalid request: unsupported embedding_types {types}")
        dim = body.get("output_dimension") or self.dim
        vectors = mutate([self.vector(t, input_type, dim=dim) for t in texts])
        embeddings: dict[str, Any] = {}
        for kind in types:
            if kind == "float":
                embeddings[kind] = vectors
            else:
                offset = 0 if kind == "int8" else 128
                embeddings[kind] = [[max(-128, min(127, round(v * 127))) + offset
                                     for v in vec if isinstance(v, float)] for vec in vectors]
        tokens = sum(len(t.split()) for t in texts)
        return 200, {"id": str(uuid.uuid4()), "texts": texts, "embeddings": embeddings,
                     "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}},
                     "response_type": "embeddings_by_type"}
