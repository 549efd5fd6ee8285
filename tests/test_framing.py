"""Request framing on its own: where a request ends, fed one byte at a time or whole."""
from __future__ import annotations

import pytest

from vecshim.framing import HEADER_LIMIT, Framing, FramingError, ReadLimits

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

