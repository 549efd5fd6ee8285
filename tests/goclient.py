"""A client that sends requests byte-for-byte as Weaviate's Go module client does.

Go's `encoding/json` escapes <, >, & and U+2028/U+2029, writes fields in
struct order, and net/http sends Host, User-Agent, Content-Length and
Accept-Encoding but no Content-Type (CONTRACTS.md §0, §1.4).
"""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass


def go_json(obj) -> bytes:
    """Marshal like Go: compact, non-ASCII as UTF-8, HTML-unsafe characters escaped."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                 ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(a, b)
    return s.encode("utf-8")


def vec_request(text: str, task_type: str | None = "passage", dimensions: int | None = None,
                pooling: str | None = "masked_mean") -> bytes:
    """The exact body Weaviate's transformers client sends (same struct as the reply)."""
    config = {}
    if pooling:
        config["pooling_strategy"] = pooling
    if task_type:
        config["task_type"] = task_type
    if dimensions:
        config["dimensions"] = dimensions
    return go_json({"text": text, "dims": 0, "vector": None, "error": "", "config": config})


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class GoClient:
    """One keep-alive connection, like a pooled Go transport connection."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        self.conn.putrequest(method, path, skip_accept_encoding=True)
        self.conn.putheader("User-Agent", "Go-http-client/1.1")
        if body is not None:
            self.conn.putheader("Content-Length", str(len(body)))
        self.conn.putheader("Accept-Encoding", "gzip")
        for k, v in (headers or {}).items():
            self.conn.putheader(k, v)
        self.conn.endheaders(body)
        resp = self.conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)

    def vectors(self, text: str, base: str = "", **kw) -> Reply:
        return self.request("POST", f"{base}/vectors", vec_request(text, **kw))

    def close(self) -> None:
        self.conn.close()

    __del__ = close  # tests drop clients freely; never leak a socket warning
