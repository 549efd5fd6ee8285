"""gunicorn worker that reads each request whole in its event loop before a thread sees it.

gunicorn's `gthread` hands a connection to a pool thread as soon as its
first bytes arrive; the thread then blocks reading headers and body, so a
client that sends slowly (or declares more body than it sends) holds a
thread. Here the poller reads headers and body non-blockingly under a
per-read and a total deadline and a size limit, and only a fully buffered
request reaches the pool, where gunicorn's parser reads it from memory.
Idle keep-alive connections wait in the poller, never in a thread.

A thread that has just answered a kept-alive connection waits a moment
(`NEXT_REQUEST_WAIT_S`) for that client's next request and, if it arrives
whole at once, serves it without the round trip through the loop (which costs
more than the request itself on a cache hit). Anything partial, malformed or
late goes back to the loop, so deadlines and limits stay the loop's. Threads
linger only while at least half the pool is free.

The lean path: a plain `POST /vectors HTTP/1.1` (Content-Length body, no
Expect, well-formed headers, no `embed_tokens`) is answered by
`vecshim.api.weaviate.lean_vectors` directly, without gunicorn's parser,
the WSGI environ and Flask's dispatch, which cost more CPU than the request's
own work (bench/RESULTS.md "Issue 18, fifth pass"). It runs the same code
for the reply, the errors, metrics and the access line; anything else takes
the Flask path.

Replies the loop sends itself (then closes the connection):
408 a read deadline passed, 413 the body is over `server.max_request_mb`
(Content-Length or chunked; the rest is not read), 400 malformed framing,
431 headers over `framing.HEADER_LIMIT`, 503 when the bodies being read at once
exceed `ReadLimits.max_buffered`. TLS and HTTP/2 connections keep gthread's
own behaviour.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import select
import selectors
import socket
import threading
import time
from functools import partial

from gunicorn import SERVER
from gunicorn.util import http_date
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.http import HTTP_STATUS_CODES

from .batching import caller_gone
from .framing import Framing, FramingError, ReadLimits

__all__ = ["VecshimWorker", "read_limits"]

log = logging.getLogger("vecshim.worker")
access = logging.getLogger("vecshim.access")

#: After an error reply, how long and how much we keep discarding input so
#: the client reads the reply instead of a connection reset.
LINGER_S, LINGER_BYTES = 2.0, 1 << 20
#: How long a thread waits for a kept-alive client's next request before
#: handing the connection back to the loop.
NEXT_REQUEST_WAIT_S = 0.02


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
               431: "Request Header Fields Too Large", 503: "Service Unavailable"}
    body = json.dumps({"error": message}).encode()
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\nConnection: close\r\n{retry}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class VecshimWorker(ThreadWorker):
    """gthread, except that requests are read whole in the event loop (see module doc)."""

    def init_process(self):
        self._reading: dict = {}   # conn -> _Reading
        self._lingering: dict = {}  # sock -> (deadline, bytes discarded)
        self._limits = ReadLimits()
        self._buffered = 0  # bytes held by connections being read
        self._in_threads = 0  # threads inside handle(), under _in_lock
        self._in_lock = threading.Lock()
        self._lean = None
        # Fixed for the worker's life; gunicorn's Config lookups are not free per request.
        self._plain_http = not self.cfg.is_ssl and getattr(self.cfg, "http2_cleartext", "off") in ("off", None)
        super().init_process()

    def load_wsgi(self):
        self._pool_size = self.cfg.threads  # read per request: gunicorn's Config lookups are not free
        super().load_wsgi()
        self._limits = read_limits(self.wsgi)
        self._lean = self._lean_handler()
        self._keepalive = bool(self.cfg.keepalive)

    def _lean_handler(self):
        """`lean_vectors` bound to the app's state, or None where the lean path must not run."""
        state = getattr(self.wsgi, "extensions", {}).get("vecshim")
        if state is None:
            return None
        why = ("server.auth.embed_tokens is set" if state.config.server.auth.embed_tokens
               else "TLS or HTTP/2" if not self._plain_http
               else "a gunicorn accesslog is set" if self.cfg.accesslog
               else "proxy_protocol is on" if self.cfg.proxy_protocol not in (None, False, "off") else None)
        log.info("worker %d: lean POST /vectors path %s", self.pid, f"off ({why})" if why else "on")
        if why:
            return None
        from .api.weaviate import lean_vectors
        return partial(lean_vectors, state)

    # -- reading in the loop -------------------------------------------------
    def enqueue_req(self, conn):
        if getattr(conn, "vecshim_buffered", False) or not self._plain_http:
            conn.vecshim_buffered = False
            return super().enqueue_req(conn)
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        state = _Reading(leftover, self._limits)
        conn.sock.setblocking(False)
        self._reading[conn] = state
        self._buffered += len(state.buf)
        if leftover and self._progress(conn, state):
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, _sock):
        state = self._reading.get(conn)
        if state is None:
            return
        data = _recv_some(conn.sock)
        if data is None:
            return
        if not data:  # the client left (or reset) before sending a whole request
            self._drop(conn)
            return
        now = time.monotonic()
        state.last = now
        if state.started is None:
            state.started = now
        state.buf += data
        self._buffered += len(data)
        if self._buffered > self._limits.max_buffered and state.framing.body_pending:
            # Many large bodies arriving at once: refuse this one rather than grow without bound.
            self._refuse(conn, state, 503, "the server is receiving too many large requests; retry later")
            return
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
        self._leave(conn)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass  # complete before it was ever registered (pipelined leftover)
        conn.data_ready = True
        conn.vecshim_continued = state.continued
        if conn.parser is None:
            conn.init()
        self._hand_over(conn, state.framing, state.buf)
        conn.vecshim_buffered = True
        self.enqueue_req(conn)
        return True

    def _refuse(self, conn, state: _Reading, status: int, message: str) -> None:
        """Answer an error from the loop, then linger briefly and close."""
        self._leave(conn)
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

    def _leave(self, conn) -> None:
        state = self._reading.pop(conn, None)
        if state is not None:
            self._buffered -= len(state.buf)

    def _drop(self, conn) -> None:
        self._leave(conn)
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
    def handle(self, conn):
        with self._in_lock:
            self._in_threads += 1
        try:
            keep = self._serve(conn)
            while keep is True and self._plain_http and self._may_linger():
                nxt = self._next_request(conn)
                if nxt is None:
                    break  # nothing yet, or partial: the loop takes over
                if nxt is False:
                    return False  # the client closed the connection
                keep = self._serve(conn)
            return keep
        finally:
            with self._in_lock:
                self._in_threads -= 1

    def _serve(self, conn):
        lean = getattr(conn, "vecshim_lean", None)
        if lean is None:
            return super().handle(conn)
        conn.vecshim_lean = None
        return self._answer_lean(conn, *lean)

    def _answer_lean(self, conn, body: bytes, given_id: str | None, close: bool) -> bool:
        """Answer a lean-path request (see the module doc); whether to keep the connection."""
        conn.sock.setblocking(True)
        conn.init()
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            log.info("Autorestarting worker after current request.")
            self.alive = False
        keep = (self.alive and self._keepalive and not close
                and len(self.keepalived_conns) < self.max_keepalived)
        conn.sock.settimeout(max(self._limits.total_timeout, 30.0))
        token = caller_gone.set(partial(_hung_up, conn.sock))
        try:
            status, headers, reply = self._lean(body, given_id, _peer_name(conn.client))
        finally:
            caller_gone.reset(token)
        head = "".join([f"HTTP/1.1 {status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}\r\n"
                        f"Server: {SERVER}\r\nDate: {_date()}\r\n"
                        f"Connection: {'keep-alive' if keep else 'close'}\r\n",
                        *(f"{k}: {v}\r\n" for k, v in headers), "\r\n"])
        try:
            conn.sock.sendall(head.encode("latin-1") + reply)
        except TimeoutError:
            log.info("a client did not read its reply within %g s; connection closed",
                     conn.sock.gettimeout() or 0)
            return False
        except OSError:
            return False  # the client went away
        return keep

    def _may_linger(self) -> bool:
        return self.alive and self._in_threads * 2 <= self._pool_size

    def _next_request(self, conn):
        """Wait briefly for the next request; True if it was read whole, False if the client left.

        None hands the connection back to the loop, with whatever was read
        left in the parser's buffer (where `enqueue_req` picks it up).
        """
        if conn.parser is None or conn.parser.unreader.buf.getvalue():
            return None  # pipelined bytes already buffered: the loop's path handles them
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        if not poller.poll(NEXT_REQUEST_WAIT_S * 1000):
            return None
        framing, buf, done = Framing(self._limits), bytearray(), False
        conn.sock.setblocking(False)
        try:
            while len(buf) <= self._limits.max_body:
                data = _recv_some(conn.sock)
                if data is None:
                    break
                if not data:
                    if not buf:
                        return False
                    break
                buf += data
                try:
                    done = framing.feed(buf)
                except FramingError:
                    break  # the loop answers it (400/413/431) and lingers as it does
                if done:
                    break
        finally:
            conn.sock.setblocking(True)
        if not done or framing.expect_continue:
            conn.parser.unreader.unread(bytes(buf))
            return None
        self._hand_over(conn, framing, buf)
        conn.vecshim_continued = False
        return True

    def _hand_over(self, conn, framing: Framing, buf) -> None:
        """Leave a whole request for the thread: as the lean path's input, or in gunicorn's parser."""
        lean = self._lean_request(framing, buf) if self._lean is not None else None
        conn.vecshim_lean = lean
        conn.parser.unreader.unread(bytes(buf[framing.end:] if lean is not None else buf))

    @staticmethod
    def _lean_request(framing: Framing, buf) -> tuple | None:
        """(body, X-Request-ID, close) of a request the lean path may answer, else None.

        It reads what framing noted while splitting the headers. Anything
        gunicorn would refuse or treat specially takes gunicorn's path:
        malformed, over-long or control-character header lines, more than
        100 of them (gunicorn's default `limit_request_fields`), upgrades,
        Expect: 100-continue, chunked bodies.
        """
        f = framing
        if (f.request_line != b"POST /vectors HTTP/1.1" or f.chunked or f.expect_continue
                or not f.plain_headers or f.header_count > 100 or f.upgrade):
            return None
        return bytes(buf[f.head_end:f.end]), f.request_id, f.connection_close

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


_dates = {"second": -1, "text": ""}


def _date() -> str:
    """The Date header, formatted once a second."""
    now = int(time.time())
    if _dates["second"] != now:
        _dates["text"], _dates["second"] = http_date(now), now
    return _dates["text"]


def _peer_name(address) -> str:
    """The client as the access line names it, the same as the Flask path's REMOTE_ADDR.

    `address` is what accept() returned: (host, port, ...) for TCP, of which
    the host; for a Unix socket the client's socket name, as text ('' when
    it bound none, which is usual; bytes for an abstract name).
    """
    return address[0] if isinstance(address, tuple) else os.fsdecode(address)


def _recv_some(sock) -> bytes | None:
    """What a non-blocking socket has: None if nothing yet, b"" if the client closed or reset."""
    try:
        return sock.recv(256 * 1024)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


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
