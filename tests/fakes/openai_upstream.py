"""A fake OpenAI embeddings API: `POST /v1/embeddings`, and Azure's deployment route."""
from __future__ import annotations

import base64
import struct
from typing import Any, Callable

from . import FakeUpstream, Recorded, format_duration

__all__ = ["FakeOpenAI"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                429: "requests"}


class FakeOpenAI(FakeUpstream):
    """OpenAI's wire format: any path ending in `/embeddings` answers.

    So `base_url=fake.url + "/v1"` and Azure's
    `/openai/deployments/<name>/embeddings?api-version=...` both work. Vectors
    ignore the model and deployment; `dimensions` in a request sets their size.
    """

    retry_after_ms_header = True
    #: Send `data` items in reverse order (indexes stay right), as a server may.
    reverse_data = False
    #: Answer `dimensions`-long vectors when a request asks (False: ignore it).
    honour_dimensions = True

    def credentials(self, request: Recorded) -> str | None:
        """Accept `Authorization: Bearer <key>` or Azure's `api-key: <key>`."""
        return request.headers.get("api-key") or super().credentials(request)

    def error_body(self, status: int, message: str, code: str | None = None) -> Any:
        """Return `{"error": {"message", "type", "param", "code"}}`."""
        if status == 401:
            code = "invalid_api_key"
            message += ". You can find your API key at https://platform.openai.com/account/api-keys."
        return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                          "param": None, "code": code}}

    def request_tokens(self, request: Recorded) -> int:
        """Words of `input`."""
        texts = request.body.get("input") if isinstance(request.body, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        return sum(len(t.split()) for t in texts if isinstance(t, str)) if isinstance(texts, list) else 0

    def limit_headers(self, limits: dict[str, Any]) -> dict[str, str]:
        """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`."""
        out = {}
        for kind, (limit, remaining, reset) in limits.items():
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = format_duration(reset)
        return out

    def answer(self, request: Recorded, mutate: Callable) -> tuple[int, Any]:
        """Embed `input` the way OpenAI does, in `float` or `base64` encoding."""
        if request.method != "POST" or not request.path.endswith("/embeddings"):
            return 404, self.error_body(404, f"Invalid URL ({request.method} {request.path})")
        body = request.body if isinstance(request.body, dict) else {}
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            return 400, self.error_body(400, "'input' must be a non-empty string or array of strings")
        if not isinstance(body.get("model"), str):
            return 400, self.error_body(400, "you must provide a model parameter")
        dim = (body.get("dimensions") if self.honour_dimensions else None) or self.dim
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return 400, self.error_body(400, f"invalid encoding_format {encoding!r}")
        vectors = mutate([self.vector(t, dim=dim) for t in texts])
        data = [{"object": "embedding", "index": i,
                 "embedding": _b64(v) if encoding == "base64" else v}
                for i, v in enumerate(vectors)]
        if self.reverse_data:
            data.reverse()
        tokens = sum(len(t.split()) for t in texts)
        return 200, {"object": "list", "data": data, "model": body["model"],
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _b64(vector: list[Any]) -> str:
    """Pack float32 little-endian and base64 it, as OpenAI does."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *map(float, vector))).decode()
