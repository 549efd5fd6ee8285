"""A stand-in for a team's in-house embedding service, for the `http-service` example plugin.

`POST /encode {"inputs": [...], "kind": "q"|"doc"}` answers
`{"result": [{"vector": [...]}, ...]}`; `POST /one {"text": ...}` answers
`{"embedding": [...]}`. Set `status`, `body` or `delay_s` to misbehave.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def service_vector(text: str, kind: str = "", dim: int = 8) -> list[float]:
    """The unit vector the service gives `text` for `kind`."""
    seed = int.from_bytes(hashlib.sha256(f"{kind}|{text}".encode("utf-8", "surrogatepass")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).tolist()


class InternalService:
    """Threaded HTTP server on 127.0.0.1; records request bodies and headers."""

    def __init__(self, dim: int = 8, token: str | None = None):
        self.dim, self.token = dim, token
        self.status: int | None = None
        self.body: bytes | None = None
        self.delay_s = 0.0
        self.requests: list[tuple[dict, dict]] = []
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                payload = json.loads(raw)
                with service._lock:
                    service.requests.append((payload, {k.lower(): v for k, v in self.headers.items()}))
                if service.delay_s:
                    time.sleep(service.delay_s)
                if service.token and self.headers.get("Authorization") != f"Bearer {service.token}":
                    return self._send(401, b'{"detail": "bad token"}')
                if service.status:
                    return self._send(service.status, b'{"detail": "injected"}', {"Retry-After": "0"})
                if service.body is not None:
                    return self._send(200, service.body)
                if self.path == "/one":
                    out = {"embedding": service_vector(payload["text"], "", service.dim)}
                else:
                    out = {"result": [{"vector": service_vector(t, payload.get("kind", ""), service.dim)}
                                      for t in payload["inputs"]]}
                self._send(200, json.dumps(out).encode())

            def _send(self, code, data, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> InternalService:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
