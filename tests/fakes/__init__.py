"""Fake hosted embedding APIs: real HTTP servers on 127.0.0.1 that speak a provider's wire format.

A fake answers with deterministic vectors (`fake.vector(text, salt)`),
records every request, checks the bearer key, and misbehaves on demand::

    with FakeOpenAI(dim=8) as fake:               # or fake.start() ... fake.stop()
        fake.inject(status(429, retry_after=0.2))  # next request only
        fake.inject(status(500), times=3)          # then three 500s
        fake.always(slow(1.0))                     # every request after the queue
        client = OpenAI(base_url=fake.url + "/v1", api_key=fake.api_key)

`rate_limit=20, latency_s=0.05` makes it answer 429 (with Retry-After) beyond
20 accepted calls in any 1 s window, each answer taking 50 ms;
`tokens_per_minute=N` answers 429 once the tokens (words) of accepted calls
in the last 60 s would pass N. Every answer then carries the provider's
rate-limit headers (`limit_headers()`), announcing `rate_limit` as
`60 * rate_limit` requests per minute, as a provider that enforces a per-minute
limit per second does. `retry_after="0.2"` fixes the 429s' Retry-After.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import math
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlsplit

__all__ = ["Fault", "FakeUpstream", "Recorded", "status", "slow", "reset", "malformed",
           "wrong_count", "wrong_length", "nan", "nan_string"]


@dataclass(frozen=True)
class Fault:
    """One misbehaviour; build it with the helpers below."""

    kind: str
    status: int = 500
    retry_after: float | str | None = None
    seconds: float = 0.0
    code: str | None = None


def status(code: int, retry_after: float | str | None = None, error_code: str | None = None) -> Fault:
    """Answer `code` with the provider's error body (carrying `error_code`), and Retry-After if given."""
    return Fault("status", status=code, retry_after=retry_after, code=error_code)


def slow(seconds: float) -> Fault:
    """Wait `seconds` before answering normally (a client timeout if longer than it)."""
    return Fault("slow", seconds=seconds)


def reset() -> Fault:
    """Read the request, then reset the TCP connection without answering."""
    return Fault("reset")


def malformed() -> Fault:
    """Answer 200 with a JSON content type and a truncated JSON body."""
    return Fault("malformed")


def wrong_count() -> Fault:
    """Answer with one vector fewer than texts."""
    return Fault("count")


def wrong_length() -> Fault:
    """Answer with the last vector one value short."""
    return Fault("length")


def nan() -> Fault:
    """Put a bare `NaN` literal (Python's json extension) in the first vector."""
    return Fault("nan")


def nan_string() -> Fault:
    """Put the string "NaN" in the first vector."""
    return Fault("nan_string")


_MUTATIONS: dict[str, Callable[[list[list[Any]]], list[list[Any]]]] = {
    "count": lambda vs: vs[:-1],
    "length": lambda vs: vs[:-1] + [vs[-1][:-1]],
    "nan": lambda vs: [[float("nan")] + vs[0][1:]] + vs[1:],
    "nan_string": lambda vs: [["NaN"] + vs[0][1:]] + vs[1:],
}


@dataclass
class Recorded:
    """A request the fake received: headers have lower-case names, body is parsed JSON."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)


class FakeUpstream:
    """Base of the provider fakes: server, recording, auth, faults, rate limit and latency.

    Subclasses implement `credentials(request)`, `error_body(status, message, code)`
    and `answer(request, mutate) -> (status, payload)`.
    """

    #: Also send OpenAI's `retry-after-ms` next to `Retry-After` when rate limiting.
    retry_after_ms_header = False
    #: Echo the presented key in every injected error, in several encodings (leak tests).
    echo_key = False

    def __init__(self, *, dim: int = 8, api_key: str = "test-key", latency_s: float = 0.0,
                 rate_limit: float | None = None, tokens_per_minute: int | None = None,
                 retry_after: str | None = None, send_limits: bool = True):
        self.dim = dim
        self.api_key = api_key
        self.latency_s = latency_s
        self.rate_limit = rate_limit
        self.tokens_per_minute = tokens_per_minute
        self.retry_after = retry_after
        self.send_limits = send_limits
        #: Calls answered 429 by the rate or token limit, and tokens accepted.
        self.limited = 0
        self.tokens_accepted = 0
        self._token_log: collections.deque[tuple[float, int]] = collections.deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: collections.deque[Fault] = collections.deque()
        self._always: Fault | None = None
        self._requests: list[Recorded] = []
        self._accepted: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------
    def start(self) -> FakeUpstream:
        """Serve on an ephemeral 127.0.0.1 port in a daemon thread; return self."""
        self._server = _Server(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Return `http://127.0.0.1:<port>`."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- control and inspection -----------------------------------------
    def inject(self, fault: Fault, times: int = 1) -> None:
        """Apply `fault` to the next `times` requests, after those already queued."""
        with self._lock:
            self._faults.extend([fault] * times)

    def always(self, fault: Fault | None) -> None:
        """Apply `fault` to every request once the queue is empty (None: behave)."""
        self._always = fault

    def clear(self) -> None:
        """Forget faults, recorded requests and the in-flight high-water mark."""
        with self._lock:
            self._faults.clear()
            self._always = None
            self._requests.clear()
            self._accepted.clear()
            self._token_log.clear()
            self.limited = self.tokens_accepted = 0
            self.max_in_flight = self.in_flight

    @property
    def requests(self) -> list[Recorded]:
        """Return a copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def vector(self, text: str, salt: str = "", dim: int | None = None) -> list[float]:
        """Return the unit vector this fake answers for `text` (`salt`: e.g. an input type)."""
        seed = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
        rng = random.Random(seed)
        values = [rng.gauss(0.0, 1.0) for _ in range(dim or self.dim)]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]

    # -- provider hooks --------------------------------------------------
    def credentials(self, request: Recorded) -> str | None:
        """Return the key the request authenticates with."""
        auth = request.headers.get("authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def error_body(self, status: int, message: str, code: str | None = None) -> Any:
        """Return the provider's error payload."""
        raise NotImplementedError

    def answer(self, request: Recorded, mutate: Callable) -> tuple[int, Any]:
        """Return (status, payload) for a request; `mutate` spoils the vectors on demand."""
        raise NotImplementedError

    def request_tokens(self, request: Recorded) -> int:
        """Tokens a request costs (its texts' words, as the fakes' usage counts them)."""
        return 0

    def limit_headers(self, limits: dict[str, Any]) -> dict[str, str]:
        """The provider's rate-limit headers for `limits` (requests/tokens limit, remaining, reset_s)."""
        return {}

    # -- request handling (runs in the server's threads) ------------------
    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else self._always

    def _rate_limited(self, tokens: int = 0) -> float | None:
        """Count an accepted call, or return the seconds until one would be accepted."""
        with self._lock:
            now = time.monotonic()
            while self._accepted and self._accepted[0] <= now - 1.0:
                self._accepted.popleft()
            while self._token_log and self._token_log[0][0] <= now - 60.0:
                self._token_log.popleft()
            waits = []
            if self.rate_limit and len(self._accepted) >= self.rate_limit:
                waits.append(self._accepted[0] + 1.0 - now)
            if self.tokens_per_minute:
                used = sum(n for _, n in self._token_log)
                if used and used + tokens > self.tokens_per_minute:
                    # The oldest calls must expire until this one fits.
                    free, wait = self.tokens_per_minute - used, 0.0
                    for at, n in self._token_log:
                        free += n
                        wait = at + 60.0 - now
                        if free >= tokens:
                            break
                    waits.append(wait)
            if waits:
                self.limited += 1
                return max(waits)
            if self.rate_limit:
                self._accepted.append(now)
            if self.tokens_per_minute:
                self._token_log.append((now, tokens))
            self.tokens_accepted += tokens
            return None

    def _limits(self) -> dict[str, str]:
        """The rate-limit headers for the current windows (none when no limit is set)."""
        if not self.send_limits or not (self.rate_limit or self.tokens_per_minute):
            return {}
        with self._lock:
            now = time.monotonic()
            limits: dict[str, Any] = {}
            if self.rate_limit:
                in_window = [t for t in self._accepted if t > now - 1.0]
                limits["requests"] = (int(self.rate_limit * 60), int(max(0, self.rate_limit - len(in_window)) * 60),
                                      in_window[0] + 1.0 - now if in_window else 0.0)
            if self.tokens_per_minute:
                used = sum(n for t, n in self._token_log if t > now - 60.0)
                oldest = next((t for t, _ in self._token_log if t > now - 60.0), None)
                limits["tokens"] = (self.tokens_per_minute, max(0, self.tokens_per_minute - used),
                                    oldest + 60.0 - now if oldest is not None else 0.0)
        return self.limit_headers(limits)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        parts = urlsplit(handler.path)
        request = Recorded(handler.command, parts.path,
                           {k: v[-1] for k, v in parse_qs(parts.query).items()},
                           {k.lower(): v for k, v in handler.headers.items()}, body)
        with self._lock:
            self._requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._respond(handler, request)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _respond(self, handler: BaseHTTPRequestHandler, request: Recorded) -> None:
        # The answer leaves `latency_s` after the request came in, however long building it took
        # (a reply of 32 vectors takes this fake ~15 ms, which a real upstream's latency includes).
        due = time.monotonic() + self.latency_s

        def send(handler, code: int, payload: Any, headers: dict | None = None, raw: bytes | None = None):
            data = raw if raw is not None else json.dumps(payload).encode()
            time.sleep(max(0.0, due - time.monotonic()))
            _send(handler, code, None, headers, raw=data)
        if self.credentials(request) != self.api_key:
            return send(handler, 401, self.error_body(401, self._auth_message(request)))
        wait = self._rate_limited(self.request_tokens(request))
        if wait is not None:
            headers = {"Retry-After": self.retry_after or str(max(1, math.ceil(wait)))}
            if self.retry_after_ms_header and self.retry_after is None:
                headers["retry-after-ms"] = str(max(1, round(wait * 1000)))
            return send(handler, 429, self.error_body(429, "Rate limit reached", "rate_limit_exceeded"),
                        {**self._limits(), **headers})
        fault = self._next_fault()
        kind = fault.kind if fault else None
        if kind == "status":
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            body = self.error_body(fault.status, self._echo(f"injected {fault.status}", request), fault.code)
            return send(handler, fault.status, body, headers)
        if kind == "slow":
            due += fault.seconds
        if kind == "reset":
            time.sleep(max(0.0, due - time.monotonic()))
            return _reset(handler)
        if kind == "malformed":
            return send(handler, 200, None, raw=b'{"object": "list", "data": [{"embedding": [0.1,')
        mutate = _MUTATIONS.get(kind, lambda vectors: vectors)
        code, payload = self.answer(request, mutate)
        send(handler, code, payload, self._limits())

    def _echo(self, message: str, request: Recorded) -> str:
        """With `echo_key`: the message plus the presented key plain, masked, URL-encoded,
        base64 and JSON-escaped, as careless upstreams and proxies do."""
        key = self.credentials(request)
        if not self.echo_key or not key:
            return message
        masked = f"{key[:8]}****{key[-4:]}"
        return (f"{message}; key {key}; masked {masked}; url {quote(key, safe='')}; "
                f"b64 {base64.b64encode(key.encode()).decode()}; "
                f"json {json.dumps(key).replace('/', chr(92) + '/')}; header Bearer {key}")

    def _auth_message(self, request: Recorded) -> str:
        # Echo the whole presented key, worse than real providers, so leak tests bite.
        return f"Incorrect API key provided: {self.credentials(request)}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Stay quiet: clients that time out or reset are part of the tests."""


def _make_handler(fake: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, the body waits
        # for the client's delayed ACK (~40 ms on Linux) and inflates latency_s.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            fake._handle(self)

        do_GET = do_POST

        def log_message(self, format, *args) -> None:
            """Keep test output clean."""

    return Handler


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `17ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


def _send(handler: BaseHTTPRequestHandler, code: int, payload: Any,
          headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
    # json.dumps writes NaN as a bare literal, which is what the nan() fault wants.
    data = raw if raw is not None else json.dumps(payload).encode()
    try:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
    except OSError:
        handler.close_connection = True  # the client gave up (timeout) first


def _reset(handler: BaseHTTPRequestHandler) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()
    handler.close_connection = True
