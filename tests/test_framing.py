"""Request framing on its own: where a request ends, fed one byte at a time or whole."""
from __future__ import annotations

import pytest

from vecshim.framing import FIELD_LIMIT, HEADER_LIMIT, Framing, FramingError, ReadLimits

LIMITS = ReadLimits(max_body=1000)


def feed_bytewise(data: bytes) -> tuple[Framing, int]:
    """Feed `data` a byte at a time; return the framing and how many bytes completed it."""
    f, buf = Framing(LIMITS), bytearray()
    for i in range(len(data)):
        buf += data[i:i + 1]
        if f.feed(buf):
            return f, i + 1
    return f, -1


@pytest.mark.parametrize("request_bytes", [
    b"GET /meta HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /vectors HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
    b"POST /vectors HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
])
def test_a_request_ends_exactly_at_its_last_byte(request_bytes):
    f, used = feed_bytewise(request_bytes + b"GET /next HTTP/1.1\r\n\r\n")
    assert used == len(request_bytes) and f.end == len(request_bytes)


def test_expect_100_continue_is_noticed_only_for_http_1_1():
    f = Framing(LIMITS)
    assert not f.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert f.expect_continue and f.body_pending
    f = Framing(LIMITS)
    f.feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert not f.expect_continue


@pytest.mark.parametrize("data, status", [
    (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n", 413),  # 1001 declared
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1f4\r\n" + b"x" * 500 + b"\r\n1f5\r\n", 413),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * HEADER_LIMIT, 431),
])
def test_what_must_be_refused_is_refused_as_soon_as_it_is_known(data, status):
    with pytest.raises(FramingError) as err:
        feed_bytewise(data + b"\r\n" * 4)
    assert err.value.status == status



def facts(data: bytes) -> dict:
    """The header facts framing notes for the lean path; the same whether fed whole or a byte at a time."""
    whole = Framing(LIMITS)
    assert whole.feed(data)
    bytewise, used = feed_bytewise(data)
    assert used == len(data)
    noted = [{k: getattr(f, k) for k in ("header_count", "plain_headers", "upgrade", "connection_close",
                                          "request_id")} for f in (whole, bytewise)]
    assert noted[0] == noted[1]
    return noted[0]


def head(*lines: str | bytes) -> bytes:
    raw = [x.encode("latin-1") if isinstance(x, str) else x for x in lines]
    return b"POST /vectors HTTP/1.1\r\n" + b"".join(x + b"\r\n" for x in raw) + b"Content-Length: 2\r\n\r\n{}"


def test_a_plain_request_is_noted_plain_with_its_request_id_and_connection():
    assert facts(head("Host: x")) == dict(header_count=2, plain_headers=True, upgrade=False,
                                          connection_close=False, request_id=None)
    noted = facts(head("X-Request-ID: first", "x-request-id: \t last one \t", "Connection: keep-alive, Close",
                       "X-Tab: a\tb"))
    assert noted == dict(header_count=5, plain_headers=True, upgrade=False, connection_close=True,
                         request_id="last one")
    assert facts(head("Connection: keep-alive"))["connection_close"] is False
    assert facts(head("X-Request-ID: caf\xe9"))["request_id"] == "caf\xe9"  # latin-1, as gunicorn reads it


@pytest.mark.parametrize("line", ["Connection: keep-alive, Upgrade", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQ"])
def test_upgrades_are_noted(line):
    noted = facts(head(line))
    assert noted["upgrade"] and noted["plain_headers"]


@pytest.mark.parametrize("line", [
    b"X-Odd: a\x01b", b"X-Odd: a\x7fb", b"X-Odd: a\nb", b"X-Odd: a\x00",  # control characters in a value
    b"No colon here", b"Bad Name: x", b" folded: x", b": no name", b"X(y): z",  # not `token: value`
    b"X-Long: " + b"v" * (FIELD_LIMIT - 7),  # one byte over gunicorn's header line limit
])
def test_a_malformed_or_control_character_header_line_is_noted_and_still_framed(line):
    data = head("Host: x", line)
    f = Framing(LIMITS)
    assert f.feed(data) and f.end == len(data) and f.length == 2  # framing itself is unchanged
    assert facts(data)["plain_headers"] is False


def test_a_header_line_at_the_limit_and_a_stray_crlf_first():
    assert facts(head(b"X-Long: " + b"v" * (FIELD_LIMIT - 8)))["plain_headers"] is True
    noted = facts(b"\r\n" + head("Host: x"))
    assert noted["plain_headers"] is False and noted["header_count"] == 2


def test_the_header_count_is_noted_and_over_100_takes_the_flask_path():
    from vecshim.worker import VecshimWorker

    for n, lean in ((99, True), (100, False)):  # with Content-Length: 100 and 101 header lines
        data = head(*(f"X-{i}: v" for i in range(n)))
        f = Framing(LIMITS)
        assert f.feed(data)
        assert f.header_count == n + 1 and f.plain_headers
        assert (VecshimWorker._lean_request(f, bytearray(data)) is not None) is lean
