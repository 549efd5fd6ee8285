"""Byte-level imitation of Weaviate's Go HTTP client for the load generator.

``http.client`` is used with ``putrequest``/``putheader`` so that exactly the
headers Go's net/http sends go out (no Content-Type for ``/vectors``), and a
small pool reproduces Go's keep-alive behaviour: idle connections beyond
``max_idle`` are closed (Go's ``MaxIdleConnsPerHost`` is 2), and a request
that fails on a *reused* connection before any response is resent up to two
more times after 50 / 250 ms (Weaviate >= 1.38.8, ``CONTRACTS.md`` §0).
"""
from __future__ import annotations

import gzip
import http.client
import json
import threading
import time

__all__ = ["LOCAL_HOSTS", "go_json", "weaviate_body", "openai_body", "ConnectionPool", "request_once"]

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
USER_AGENT = "Go-http-client/1.1"
RESEND_DELAYS_S = (0.05, 0.25)
# Errors Go's retry transport treats as a dead pooled connection.
BROKEN_CONN_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json(obj) -> bytes:
    """Serialise like Go's encoding/json: compact, UTF-8, HTML-escaped."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    # These characters can only occur inside JSON strings here, so a plain
    # replace after dumping equals Go's in-string escaping.
    for char, escape in _GO_ESCAPES.items():
        text = text.replace(char, escape)
    return text.encode("utf-8")


def weaviate_body(text: str, task: str, pooling: str = "masked_mean") -> bytes:
    """The text2vec-transformers request body, fields in Go struct order."""
    return go_json({"text": text, "dims": 0, "vector": None, "error": "",
                    "config": {"pooling_strategy": pooling, "task_type": task}})


def openai_body(text: str, model: str) -> bytes:
    """The text2vec-openai request body for a single text."""
    return go_json({"input": [text], "model": model})


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one local host, Go-transport style."""

    def __init__(self, host: str, port: int, timeout: float, max_idle: int, api_key: str = ""):
        self.host, self.port, self.timeout = host, port, timeout
        self.max_idle = max_idle
        self.api_key = api_key
        self.opened = 0
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """Return an idle connection (reused=True) or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
            self.opened += 1
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout), False

    def put(self, conn: http.client.HTTPConnection) -> None:
        """Return a healthy connection; close it if the idle pool is full."""
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _send(conn: http.client.HTTPConnection, path: str, body: bytes, extra: list[tuple[str, str]]):
    """Send one POST with Go's default header set plus ``extra``; return the response."""
    conn.putrequest("POST", path, skip_accept_encoding=True)
    conn.putheader("User-Agent", USER_AGENT)
    conn.putheader("Content-Length", str(len(body)))
    for name, value in extra:
        conn.putheader(name, value)
    conn.putheader("Accept-Encoding", "gzip")
    conn.endheaders(body)
    return conn.getresponse()


def request_once(pool: ConnectionPool, protocol: str, path: str, text: str, task: str,
                 model: str) -> tuple[int, bytes, int]:
    """POST one text; return (status, decoded body, number of resends)."""
    if protocol == "openai":
        body = openai_body(text, model)
        extra = [("Authorization", f"Bearer {pool.api_key}"), ("Content-Type", "application/json")]
    else:
        body, extra = weaviate_body(text, task), []
    resends = 0
    while True:
        conn, reused = pool.get()
        try:
            resp = _send(conn, path, body, extra)
            data = resp.read()
        except BROKEN_CONN_ERRORS:
            conn.close()
            if not reused or resends >= len(RESEND_DELAYS_S):
                raise
            time.sleep(RESEND_DELAYS_S[resends])
            resends += 1
            continue
        except BaseException:
            conn.close()
            raise
        if resp.getheader("Content-Encoding", "").lower() == "gzip":
            data = gzip.decompress(data)
        if resp.will_close:
            conn.close()
        else:
            pool.put(conn)
        return resp.status, data, resends
