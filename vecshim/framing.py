"""Where an HTTP/1.x request ends, found incrementally over a growing buffer.

Used by vecshim's gunicorn worker (vecshim/worker.py) to read requests whole
before a thread sees them: it only finds the end of the request and refuses
what must be refused (FramingError: 400, 413, 431); gunicorn's parser still
parses the request. While it splits the headers it also notes the few facts
the worker's lean `POST /vectors` path decides on (`Framing.plain_headers`
and the attributes next to it), so that path does not split them again.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ReadLimits", "Framing", "FramingError", "HEADER_LIMIT", "CHUNK_LINE_LIMIT", "FIELD_LIMIT"]

#: Largest request line plus headers we buffer (431 beyond).
HEADER_LIMIT = 64 * 1024
#: Longest chunk-size line (with extensions) of a chunked body.
CHUNK_LINE_LIMIT = 4096
#: Longest header line gunicorn accepts by default (its `limit_request_field_size`).
FIELD_LIMIT = 8190
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Control characters (tab excepted) that gunicorn refuses in a header value.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"^[0-9A-Fa-f]+$")


@dataclass(frozen=True)
class ReadLimits:
    """Deadlines (seconds) and the body limit (bytes) for reading one request."""

    read_timeout: float = 5.0
    total_timeout: float = 30.0
    max_body: int = 16 * 1024 * 1024

    @property
    def max_buffered(self) -> int:
        """Bytes all connections of a worker may hold while being read (503 beyond)."""
        return max(256 * 1024 * 1024, 4 * self.max_body)


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
    where the request ends, and notes a few header facts (see `_headers`);
    gunicorn's parser still parses it.
    """

    def __init__(self, limits: ReadLimits):
        self.limits = limits
        self.head_end = -1        # index just past the blank line ending the headers
        self.length: int | None = None   # Content-Length body
        self.chunked = False
        self.expect_continue = False
        self.request_line = b""
        # Noted while splitting the headers, for the worker's lean path (worker._lean_request):
        self.header_count = 0       # header lines after the request line
        self.plain_headers = True   # no stray CRLF first; every line `name: value`, see _headers
        self.upgrade = False        # an Upgrade or HTTP2-Settings header, or Connection: upgrade
        self.connection_close = False   # a Connection header lists close
        self.request_id: str | None = None  # the last X-Request-ID, without surrounding blanks
        self._pos = 0             # chunked: where the next unparsed chunk line starts
        self._body = 0            # chunked: body bytes declared so far
        self._trailers = False    # chunked: past the last chunk, reading trailers
        self.end = -1             # index just past the request
        self._scan = 0            # where the search for a blank line resumes

    def feed(self, buf: bytes | bytearray) -> bool:
        if self.head_end < 0:
            idx = buf.find(b"\r\n\r\n", self._scan)
            if idx < 0:
                if len(buf) > HEADER_LIMIT:
                    raise FramingError(431, f"request headers are over {HEADER_LIMIT} bytes")
                # resume there next time: a byte-at-a-time sender must not cost a rescan per byte
                self._scan = max(0, len(buf) - 3)
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
        """Read what framing needs from the head, and note the lean path's facts.

        `plain_headers` stays True when no stray CRLF came before the request
        line and every header line is `name:value` with a token name, a value
        without control characters (tab allowed), and at most FIELD_LIMIT
        bytes: nothing gunicorn would refuse or treat specially.
        """
        lines = head.split(b"\r\n")
        if lines and not lines[0]:
            self.plain_headers = False
            while lines and not lines[0]:  # stray CRLF before a request line is tolerated
                lines.pop(0)
        self.request_line = lines[0] if lines else b""
        self.header_count = max(0, len(lines) - 1)
        version = self.request_line.rsplit(b" ", 1)[-1]
        lengths, codings = [], []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                self.plain_headers = False
                continue  # the parser rejects it with a 400 of its own
            if len(line) > FIELD_LIMIT or _CTL.search(value):
                self.plain_headers = False
            name, value = name.lower(), value.strip(b" \t")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif name == b"expect" and value.lower() == b"100-continue" and version != b"HTTP/1.0":
                self.expect_continue = True
            elif name == b"x-request-id":
                self.request_id = value.decode("latin-1")
            elif name == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                self.upgrade = self.upgrade or b"upgrade" in tokens
                self.connection_close = self.connection_close or b"close" in tokens
            elif name in (b"upgrade", b"http2-settings"):
                self.upgrade = True
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
                idx = buf.find(b"\r\n\r\n", max(self._pos, self._scan))
                if idx < 0:
                    if len(buf) - self._pos > HEADER_LIMIT:
                        raise FramingError(431, "chunked trailers are too large")
                    self._scan = max(self._pos, len(buf) - 3)
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
