"""gunicorn worker that reads each request whole in its event loop before a thread sees it.

gunicorn's `gthread` hands a connection to a pool thread as soon as its
first bytes arrive; the thread then blocks reading headers and body, so a
client that sends slowly (or declares more body than it sends) holds a
thread. Here the poller reads headers and body non-blockingly under a
per-read and a total deadline and a size limit, and only a fully buffered
request reaches the pool, where gunicorn's parser reads it from memory.
Idle keep-alive connections wait in the poller, never in a thread.

Replies the loop sends itself (then closes the connection):
408 a read deadline passed, 413 the body is over `server.max_request_mb`
(Content-Length or chunked; the rest is not read), 400 malformed framing,
431 headers over `HEADER_LIMIT`. TLS and HTTP/2 connections keep gthread's
own behaviour.
"""
from __future__ import annotations

import errno
import json
import logging
import re
import select
import selectors
import socket
import time
from dataclasses import dataclass
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

from .batching import caller_gone

__all__ = ["VecshimWorker", "ReadLimits", "Framing", "FramingError"]

log = logging.getLogger("vecshim.worker")
access = logging.getLogger("vecshim.access")

#: Largest request line plus headers we buffer (431 beyond).
HEADER_LIMIT = 64 * 1024
#: Longest chunk-size line (with extensions) of a chunked body.
CHUNK_LINE_LIMIT = 4096
#: After an error reply, how long and how much we keep discarding input so
#: the client reads the reply instead of a connection reset.
LINGER_S, LINGER_BYTES = 2.0, 1 << 20
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEX = re.compile(rb"^[0-9A-Fa-f]+$")


@dataclass(frozen=True)
class ReadLimits:
    """Deadlines (seconds) and the body limit (bytes) for reading one request."""

    read_timeout: float = 5.0
    total_timeout: float = 30.0
    max_body: int = 16 * 1024 * 1024


class FramingError(Exception):
    """The request cannot be read: `status` and a client-safe message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Framing:
    """Incremental HTTP/1.x request framing over a growing buffer.

    `feed(buf)` returns True once `buf` holds a complete request (headers
    and body), raising FramingError for what must be refused. It only finds
    where the request ends; gunicorn's parser still parses it.
    """

    def __init__(self, limits: ReadLimits):
        self.limits = limits
        self.head_end = -1        # index just past the blank line ending the headers
        self.length: int | None = None   # Content-Length body
        self.chunked = False
        self.expect_continue = False
        self.request_line = b""
        self._pos = 0             # chunked: where the next unparsed chunk line starts
        self._body = 0            # chunked: body bytes declared so far
        self._trailers = False    # chunked: past the last chunk, reading trailers
        self.end = -1             # index just past the request

    def feed(self, buf: bytes | bytearray) -> bool:
        if self.head_end < 0:
            idx = buf.find(b"\r\n\r\n")
            if idx < 0:
                if len(buf) > HEADER_LIMIT:
                    raise FramingError(431, f"request headers are over {HEADER_LIMIT} bytes")
                return False
            if idx + 4 > HEADER_LIMIT:
                raise FramingError(431, f"request headers are over {HEADER_LIMIT} bytes")
            self.head_end = idx + 4
            self._headers(bytes(buf[:idx]))
            self._pos = self.head_end
        if self.chunked:
            return self._chunks(buf)
        self.end = self.head_end + (self.length or 0)
        return len(buf) >= self.end

    @property
    def body_pending(self) -> bool:
        """Whether headers are in and body bytes are still expected."""
        return self.head_end >= 0 and (self.chunked or bool(self.length))

    def _headers(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        while lines and not lines[0]:  # stray CRLF before a request line is tolerated
            lines.pop(0)
        self.request_line = lines[0] if lines else b""
        version = self.request_line.rsplit(b" ", 1)[-1]
        lengths, codings = [], []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                continue  # the parser rejects it with a 400 of its own
            name, value = name.lower(), value.strip(b" \t")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif name == b"expect" and value.lower() == b"100-continue" and version != b"HTTP/1.0":
                self.expect_continue = True
        if codings:
            if lengths:
                raise FramingError(400, "a request may not carry both Content-Length and Transfer-Encoding")
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise FramingError(400, "unsupported Transfer-Encoding (only chunked is accepted)")
            self.chunked = True
            return
        if lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
                raise FramingError(400, "invalid Content-Length")
            self.length = int(lengths[0])
            if self.length > self.limits.max_body:
                raise FramingError(413, self._too_large(f"{self.length} bytes"))

    def _too_large(self, what: str) -> str:
        return (f"request body ({what}) is over the server limit of {self.limits.max_body} bytes "
                f"(server.max_request_mb)")

    def _chunks(self, buf) -> bool:
        while True:
            if self._trailers:
                # trailer fields end with an empty line; with none, the CRLF follows at once
                if buf[self._pos:self._pos + 2] == b"\r\n":
                    self.end = self._pos + 2
                    return True
                idx = buf.find(b"\r\n\r\n", self._pos)
                if idx < 0:
                    if len(buf) - self._pos > HEADER_LIMIT:
                        raise FramingError(431, "chunked trailers are too large")
                    return False
                self.end = idx + 4
                return True
            idx = buf.find(b"\r\n", self._pos)
            if idx < 0:
                if len(buf) - self._pos > CHUNK_LINE_LIMIT:
                    raise FramingError(400, "invalid chunk size line (too long)")
                return False
            line = bytes(buf[self._pos:idx])
            size, _, _ext = line.partition(b";")
            size = size.rstrip(b" \t")
            if not _HEX.match(size) or len(size) > 16:
                raise FramingError(400, "invalid chunk size in a chunked body")
            n = int(size, 16)
            self._body += n
            if self._body > self.limits.max_body:
                raise FramingError(413, self._too_large("chunked, over the limit so far"))
            if n == 0:
                self._trailers = True
                self._pos = idx + 2
                continue
            data_end = idx + 2 + n
            if len(buf) < data_end + 2:
                # not all here yet: parse this chunk line again when more arrives
                self._body -= n
                return False
            if buf[data_end:data_end + 2] != b"\r\n":
                raise FramingError(400, "a chunk is not followed by CRLF")
            self._pos = data_end + 2


class _Reading:
    """A connection the loop is reading a request from."""

    __slots__ = ("buf", "framing", "started", "last", "continued")

    def __init__(self, buf: bytes, limits: ReadLimits):
        self.buf = bytearray(buf)
        self.framing = Framing(limits)
        self.started = time.monotonic() if buf else None  # first byte of this request
        self.last = time.monotonic()
        self.continued = False


def _reply(status: int, message: str) -> bytes:
    reasons = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
               431: "Request Header Fields Too Large"}
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class VecshimWorker(ThreadWorker):
    """gthread, except that requests are read whole in the event loop (see module doc)."""

    def init_process(self):
        self._reading: dict = {}   # conn -> _Reading
        self._lingering: dict = {}  # sock -> (deadline, bytes discarded)
        self._limits = ReadLimits()
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        self._limits = read_limits(self.wsgi)

    # -- reading in the loop -------------------------------------------------
    def _plain(self) -> bool:
        return not self.cfg.is_ssl and getattr(self.cfg, "http2_cleartext", "off") in ("off", None)

    def enqueue_req(self, conn):
        if getattr(conn, "vecshim_buffered", False) or not self._plain():
            conn.vecshim_buffered = False
            return super().enqueue_req(conn)
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        state = _Reading(leftover, self._limits)
        conn.sock.setblocking(False)
        self._reading[conn] = state
        if leftover and self._progress(conn, state):
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, _sock):
        state = self._reading.get(conn)
        if state is None:
            return
        try:
            data = conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left (or reset) before sending a whole request
            self._drop(conn)
            return
        now = time.monotonic()
        state.last = now
        if state.started is None:
            state.started = now
        state.buf += data
        self._progress(conn, state)

    def _progress(self, conn, state: _Reading) -> bool:
        """Advance framing; True once the connection left the reading state."""
        try:
            done = state.framing.feed(state.buf)
        except FramingError as err:
            self._refuse(conn, state, err.status, err.message)
            return True
        if not done:
            if state.framing.expect_continue and state.framing.body_pending and not state.continued:
                state.continued = True
                self._send(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        del self._reading[conn]
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass  # complete before it was ever registered (pipelined leftover)
        conn.data_ready = True
        conn.vecshim_continued = state.continued
        if conn.parser is None:
            conn.init()
        conn.parser.unreader.unread(bytes(state.buf))
        conn.vecshim_buffered = True
        self.enqueue_req(conn)
        return True

    def _refuse(self, conn, state: _Reading, status: int, message: str) -> None:
        """Answer an error from the loop, then linger briefly and close."""
        self._reading.pop(conn, None)
        line = state.framing.request_line[:200].decode("latin-1", "replace").split(" ")
        method, path = (line[0], line[1].split("?")[0]) if len(line) >= 2 else ("-", "-")
        access.info("%s %s %d (refused while reading: %s)", method, path, status, message,
                    extra={"method": method, "path": path, "status": status})
        self._send(conn.sock, _reply(status, message))
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.nr_conns -= 1
        self._lingering[conn.sock] = [time.monotonic() + LINGER_S, 0]
        try:
            self.poller.register(conn.sock, selectors.EVENT_READ, self._on_linger)
        except (KeyError, ValueError):  # still registered for reading
            self.poller.modify(conn.sock, selectors.EVENT_READ, self._on_linger)

    def _on_linger(self, sock):
        entry = self._lingering.get(sock)
        if entry is None:
            return
        try:
            data = sock.recv(64 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        entry[1] += len(data)
        if not data or entry[1] > LINGER_BYTES:
            self._close_lingering(sock)

    def _close_lingering(self, sock):
        self._lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError):
            pass
        try:
            sock.close()
        except OSError:
            pass

    @staticmethod
    def _send(sock, data: bytes) -> None:
        """Best-effort non-blocking send of a small reply."""
        try:
            sock.send(data)
        except OSError:
            pass

    def _drop(self, conn) -> None:
        self._reading.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.nr_conns -= 1
        conn.close()

    # -- deadlines -----------------------------------------------------------
    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        lim = self._limits
        for conn, state in list(self._reading.items()):
            if state.started is None:  # idle: waiting for a request to begin
                idle_for = self.cfg.keepalive if self.alive else min(self.cfg.keepalive, 2.0)
                if now - state.last > idle_for:
                    self._drop(conn)
            elif now - state.last > lim.read_timeout:
                self._timeout(conn, state, f"no request data for {lim.read_timeout:g} s "
                                           f"(server.read_timeout_s)")
            elif now - state.started > lim.total_timeout:
                self._timeout(conn, state, f"request not received within {lim.total_timeout:g} s "
                                           f"(server.read_total_s)")
        for sock, (deadline, _) in list(self._lingering.items()):
            if now > deadline:
                self._close_lingering(sock)

    def _timeout(self, conn, state, message):
        self._refuse(conn, state, 408, message)

    def accept(self, listener):
        try:
            super().accept(listener)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            # Out of file descriptors: refuse for a moment rather than kill the worker.
            log.warning("cannot accept a connection (%s); %d open", err.strerror, self.nr_conns)
            time.sleep(0.1)

    # -- in the thread -------------------------------------------------------
    def handle_request(self, req, conn):
        if getattr(conn, "vecshim_continued", False):
            req._expected_100_continue = False  # already sent from the loop
        # A client that does not read its reply must not hold the thread forever.
        conn.sock.settimeout(max(self._limits.total_timeout, 30.0))
        token = caller_gone.set(partial(_hung_up, conn.sock))
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            log.info("a client did not read its reply within %g s; connection closed",
                     conn.sock.gettimeout() or 0)
            return False
        finally:
            caller_gone.reset(token)


def _hung_up(sock) -> bool:
    """Whether the client closed its side (a waiting request's texts are then dropped)."""
    try:
        poller = select.poll()  # not select(): descriptors above 1024 are common here
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def read_limits(app) -> ReadLimits:
    """The read deadlines and body limit from a vecshim app's config (defaults otherwise)."""
    state = getattr(app, "extensions", {}).get("vecshim") if app is not None else None
    server = getattr(getattr(state, "config", None), "server", None)
    if server is None:
        return ReadLimits()
    return ReadLimits(read_timeout=server.read_timeout_s, total_timeout=server.read_total_s,
                      max_body=int(server.max_request_mb * 1024 * 1024))
