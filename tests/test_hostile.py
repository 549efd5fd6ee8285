"""Hostile clients against a real `vecshim serve`: slow and short bodies, bad framing, idle connections.

Every test talks raw sockets (or one keep-alive connection) to a real
gunicorn running vecshim's worker (vecshim/worker.py). The properties are
stated without timing thresholds: a light client is served, with generous
bounded waits, *while* hostile connections are held; a stalled or
malformed request gets its JSON error and its connection closed.
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time

import pytest

from goclient import GoClient, vec_request
from test_production import fake_model, start, stop

pytestmark = pytest.mark.slow

#: Long enough for any loaded machine, short enough to bound the suite.
WAIT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Default read deadlines (5 s per read, 30 s total), a 1 MiB body limit, 64 threads."""
    tmp = tmp_path_factory.mktemp("hostile")
    proc = start(tmp, {**fake_model(), "cache": {"enabled": False}, "server": {"max_request_mb": 1}},
                 "--workers", "1")
    yield proc
    stop(proc)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Short read deadlines, so stalls end within the test."""
    tmp = tmp_path_factory.mktemp("hostile-quick")
    cfg = {**fake_model(), "cache": {"enabled": False},
           "server": {"max_request_mb": 1, "read_timeout_s": 1, "read_total_s": 3}}
    proc = start(tmp, cfg, "--workers", "1")
    yield proc
    stop(proc)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return s


def read_reply(s: socket.socket, timeout: float = WAIT) -> tuple[int, dict, bytes, bool]:
    """Read one response; returns (status, headers, body, closed_after)."""
    s.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError(f"closed before a reply: {buf!r}")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        d = s.recv(65536)
        if not d:
            break
        rest += d
    body, extra = rest[:n], rest[n:]
    closed = False
    if headers.get("connection", "").lower() == "close":
        try:
            closed = not extra and s.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = True
    return status, headers, body, closed


def request_bytes(body: bytes, *, path="/vectors", headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n\r\n").encode() + body


def light_client(port: int, n: int, errors: list, results: list) -> None:
    c = GoClient("127.0.0.1", port, timeout=WAIT)
    try:
        for i in range(n):
            r = c.request("POST", "/vectors", vec_request(f"light request {i}"))
            results.append(r.status)
            if r.status != 200:
                errors.append(r.body)
    except Exception as err:  # the property fails: report it
        errors.append(repr(err))
    finally:
        c.close()


def test_slow_and_short_bodies_hold_no_thread(server):
    """64 short-body and 64 slowloris connections are held open; a light client is served meanwhile."""
    port = server.port
    short, slow = [], []
    for _ in range(64):
        s = connect(port)  # declares 1000 bytes of body, sends 10
        s.sendall(b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"text\":\"a")
        short.append(s)
    for _ in range(64):
        s = connect(port)
        s.sendall(b"P")
        slow.append(s)
    stop_drip = threading.Event()
    line = b"OST /vectors HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 1000

    def drip():  # one header byte per connection every 0.5 s
        i = 0
        while not stop_drip.wait(0.5):
            for s in slow:
                try:
                    s.send(line[i:i + 1])
                except OSError:
                    pass
            i += 1

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        time.sleep(1.0)  # every hostile connection has been accepted and is mid-request
        errors, results = [], []
        light_client(port, 30, errors, results)
        assert errors == [] and results == [200] * 30
        # Every hostile connection is still open: the light client was served while they were held.
        assert all(_still_open(s) for s in short + slow)
    finally:
        stop_drip.set()
        dripper.join()
        for s in short + slow:
            s.close()


def _still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def test_idle_keepalive_connections_wait_in_the_poller(server):
    """200 idle keep-alive connections (each served once) do not delay a new client."""
    port = server.port
    idle = []
    try:
        for i in range(200):
            s = connect(port)
            s.sendall(request_bytes(vec_request(f"idle {i}")))
            status, headers, _, _ = read_reply(s)
            assert status == 200 and headers.get("connection", "keep-alive").lower() != "close"
            idle.append(s)
        errors, results = [], []
        light_client(port, 20, errors, results)
        assert errors == [] and results == [200] * 20
        # The idle connections are still usable.
        for s in idle[:5]:
            s.sendall(request_bytes(vec_request("again")))
            assert read_reply(s)[0] == 200
    finally:
        for s in idle:
            s.close()


def test_a_short_body_gets_a_json_408_and_the_connection_closed(quick):
    s = connect(quick.port)
    s.sendall(b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\":")
    status, headers, body, closed = read_reply(s)
    assert status == 408 and headers["content-type"] == "application/json"
    assert "server.read_timeout_s" in json.loads(body)["error"]
    assert closed
    s.close()


def test_a_slowloris_within_the_per_read_deadline_is_cut_at_the_total_deadline(quick):
    s = connect(quick.port)
    done = threading.Event()

    def drip():
        for ch in b"POST /vectors HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100:
            if done.wait(0.3):
                return
            try:
                s.send(bytes([ch]))
            except OSError:
                return

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        status, headers, body, closed = read_reply(s)
        assert status == 408 and "server.read_total_s" in json.loads(body)["error"]
        assert closed
    finally:
        done.set()
        t.join()
        s.close()


def test_a_silent_new_connection_gets_no_thread_and_no_reply_yet(quick):
    """A connection that sends nothing is idle (keep-alive rules), not a stalled request."""
    s = connect(quick.port)
    try:
        errors, results = [], []
        light_client(quick.port, 3, errors, results)
        assert errors == []
        time.sleep(2.0)  # beyond read_timeout_s: still no 408 for a request never begun
        assert _still_open(s)
    finally:
        s.close()


# -- body framing ----------------------------------------------------------------------

def chunked(*parts: bytes, trailer: bytes = b"") -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return out + b"0\r\n" + trailer + b"\r\n"


CHUNKED_HEAD = b"POST /vectors HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def exchange(port: int, data: bytes, *, then: bytes = b"") -> tuple[int, dict, bytes, bool]:
    s = connect(port)
    try:
        s.sendall(data)
        if then:
            s.sendall(then)
        return read_reply(s)
    finally:
        s.close()


def test_a_chunked_body_is_read_whole_and_embedded(server):
    body = vec_request("a chunked request")
    status, _, reply, _ = exchange(server.port, CHUNKED_HEAD + chunked(body[:7], body[7:20], body[20:],
                                                                         trailer=b"X-Trailer: 1\r\n"))
    assert status == 200 and json.loads(reply)["text"] == "a chunked request"
    ext = b"".join(b"%x;name=value\r\n%s\r\n" % (len(p), p) for p in (body[:5], body[5:])) + b"0\r\n\r\n"
    status, _, reply, _ = exchange(server.port, CHUNKED_HEAD + ext)
    assert status == 200 and json.loads(reply)["text"] == "a chunked request"


@pytest.mark.parametrize("declared", [b"200000", b"ffffffffffffffff"])
def test_a_chunked_body_over_the_limit_is_a_413_without_reading_the_rest(server, declared):
    # One chunk that declares more than the 1 MiB limit: answered before its data arrives.
    status, headers, body, closed = exchange(server.port, CHUNKED_HEAD + declared + b"\r\n" + b"x" * 100)
    assert status == 413 and "server.max_request_mb" in json.loads(body)["error"]
    assert closed


def test_many_small_chunks_over_the_limit_are_a_413(server):
    s = connect(server.port)
    try:
        s.sendall(CHUNKED_HEAD)
        piece = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        status = None
        for _ in range(40):  # 2.5 MiB, more than the 1 MiB limit
            try:
                s.sendall(piece)
            except OSError:  # the server answered and closed: read its reply
                break
        status, _, body, _ = read_reply(s)
        assert status == 413 and "server.max_request_mb" in json.loads(body)["error"]
    finally:
        s.close()


def test_a_content_length_over_the_limit_is_a_413_before_the_body(server):
    status, _, body, closed = exchange(server.port, b"POST /vectors HTTP/1.1\r\nHost: x\r\n"
                                                    b"Content-Length: 5000000\r\n\r\n{\"text\":")
    assert status == 413 and "5000000" in json.loads(body)["error"] and closed


@pytest.mark.parametrize("framing", [
    CHUNKED_HEAD + b"zz\r\nabc\r\n0\r\n\r\n",                          # not hex
    CHUNKED_HEAD + b"3\r\nabcXX0\r\n\r\n",                             # chunk data not followed by CRLF
    CHUNKED_HEAD + b"-3\r\nabc\r\n0\r\n\r\n",                          # negative
    CHUNKED_HEAD + b"1" * 5000,                                        # endless size line
    b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /vectors HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
], ids=["zz", "no-crlf", "negative", "long-line", "cl-abc", "cl-twice", "cl-and-te", "te-gzip"])
def test_malformed_framing_is_a_json_400(server, framing):
    status, headers, body, closed = exchange(server.port, framing)
    assert status == 400, body
    assert headers["content-type"] == "application/json" and json.loads(body)["error"]
    assert closed


def test_pipelined_requests_are_all_answered_in_order(server):
    reqs = b"".join(request_bytes(vec_request(f"pipelined {i}")) for i in range(3))
    s = connect(server.port)
    try:
        s.sendall(reqs + CHUNKED_HEAD + chunked(vec_request("pipelined chunked")))
        s.settimeout(WAIT)
        f = s.makefile("rb")  # one buffer for all four: replies may arrive in one segment
        texts = []
        for _ in range(4):
            status = int(f.readline().split()[1])
            headers = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            assert status == 200
            texts.append(json.loads(f.read(int(headers["content-length"])))["text"])
        assert texts == ["pipelined 0", "pipelined 1", "pipelined 2", "pipelined chunked"]
    finally:
        s.close()


def _reply_text(s: socket.socket) -> str:
    status, _, body, closed = read_reply(s)
    assert status == 200 and not closed, body
    return json.loads(body)["text"]


def test_a_kept_alive_connection_gets_every_next_request_whole_split_or_late(server):
    """The thread that answered waits briefly for the next request: each way it can arrive is served."""
    s = connect(server.port)
    try:
        s.sendall(request_bytes(vec_request("first")))
        assert _reply_text(s) == "first"
        s.sendall(request_bytes(vec_request("at once")))  # whole, right after the reply
        assert _reply_text(s) == "at once"
        split = request_bytes(vec_request("in two parts"))
        s.sendall(split[:20])  # partial: the rest arrives after the thread gave up waiting
        time.sleep(0.3)
        s.sendall(split[20:])
        assert _reply_text(s) == "in two parts"
        time.sleep(0.3)  # back in the poller, idle
        s.sendall(request_bytes(vec_request("after a pause")))
        assert _reply_text(s) == "after a pause"
        s.sendall(CHUNKED_HEAD + chunked(vec_request("chunked next")))
        assert _reply_text(s) == "chunked next"
    finally:
        s.close()


@pytest.mark.parametrize("bad, status", [
    (b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{", 413),
    (b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
], ids=["over-limit", "malformed"])
def test_a_bad_next_request_on_a_kept_alive_connection_gets_its_json_error(server, bad, status):
    s = connect(server.port)
    try:
        s.sendall(request_bytes(vec_request("good")))
        assert _reply_text(s) == "good"
        s.sendall(bad)
        got, headers, body, closed = read_reply(s)
        assert got == status and headers["content-type"] == "application/json" and json.loads(body)["error"]
        assert closed
    finally:
        s.close()


def test_a_next_request_that_stalls_gets_the_408_deadline(quick):
    s = connect(quick.port)
    try:
        s.sendall(request_bytes(vec_request("good")))
        assert _reply_text(s) == "good"
        s.sendall(b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\":")
        status, headers, body, closed = read_reply(s)
        assert status == 408 and "server.read_timeout_s" in json.loads(body)["error"] and closed
    finally:
        s.close()


def test_a_client_that_closes_after_its_reply_frees_the_connection(quick):
    for i in range(20):  # more than a pool's worth of lingering would leak if a close were missed
        s = connect(quick.port)
        s.sendall(request_bytes(vec_request(f"bye {i}")))
        assert _reply_text(s) == f"bye {i}"
        s.close()
    s = connect(quick.port)
    try:
        s.sendall(request_bytes(vec_request("still served")))
        assert _reply_text(s) == "still served"
    finally:
        s.close()


def test_expect_100_continue_gets_one_interim_reply_then_the_answer(server):
    body = vec_request("sent after 100 Continue")
    s = connect(server.port)
    try:
        s.sendall(request_bytes(b"", headers="Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(body)))
        s.settimeout(WAIT)
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += s.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        status, _, reply, _ = read_reply(s)
        assert status == 200 and json.loads(reply)["text"] == "sent after 100 Continue"
    finally:
        s.close()


# -- heavy requests: bounded, fair, never a 503 for light clients -------------------------

def light_loop(port: int, stop: threading.Event, statuses: list, finished_at: list) -> None:
    """A light /vectors client: one request after another until `stop`, at least 3."""
    c = GoClient("127.0.0.1", port, timeout=WAIT * 2)
    try:
        i = 0
        while not stop.is_set() or i < 3:
            r = c.request("POST", "/vectors", vec_request(f"light {i}"))
            statuses.append(r.status)
            finished_at.append(time.monotonic())
            i += 1
    except Exception as err:
        statuses.append(repr(err))
    finally:
        c.close()


def test_a_many_window_request_shares_the_encoder_with_light_requests(tmp_path):
    """Round-robin between requests: light requests finish while a 2000-window request is still running."""
    cfg = {**fake_model(max_input_tokens=2, delay_s=0.01), "cache": {"enabled": False}}
    cfg["models"]["fake"]["batch"] = {"max_size": 8, "workers": 1, "max_wait_ms": 0}
    proc = start(tmp_path, cfg, "--workers", "1")
    try:
        heavy_done, heavy = [], []
        text = " ".join(f"w{i}" for i in range(4000))  # 2000 windows: at least 250 calls of 10 ms

        def send_heavy():
            c = GoClient("127.0.0.1", proc.port, timeout=120)
            heavy.append(c.request("POST", "/vectors", vec_request(text)))
            heavy_done.append(time.monotonic())
            c.close()

        t = threading.Thread(target=send_heavy)
        t.start()
        time.sleep(0.5)  # the heavy request is queued and running
        statuses, finished_at = [], []
        stop_light = threading.Event()
        stop_light.set()  # exactly 3 light requests, one after another
        light_loop(proc.port, stop_light, statuses, finished_at)
        t.join(120)
        assert statuses == [200, 200, 200] and heavy[0].status == 200
        assert max(finished_at) < heavy_done[0], "light requests waited for the whole heavy request"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory):
    """`vecshim serve` with the bundled model and default limits."""
    tmp = tmp_path_factory.mktemp("hostile-minilm")
    proc = start(tmp, {"cache": {"enabled": False}, "plugins": {"entrypoints": False}}, "--workers", "1")
    yield proc
    stop(proc)


def words(n_chars: int, seed: int) -> str:
    """English-like text of exactly `n_chars` characters (about 5 characters per token)."""
    vocab = ("vector database embedding weaviate object property schema module query passage "
             "the quick brown fox jumps over lazy dog river thames london bridge").split()
    rng = random.Random(seed)
    text = " ".join(rng.choices(vocab, k=n_chars // 5))
    while len(text) < n_chars:
        text += " " + " ".join(rng.choices(vocab, k=1000))
    return text[:n_chars]


def test_fifteen_one_million_character_texts_are_answered_and_light_clients_see_no_503(minilm_server):
    """The issue's case: 15 x 1M characters in one /v1/embeddings call (inside every size limit)."""
    port = minilm_server.port
    text = words(1_000_000, 1)
    body = json.dumps({"input": [text[k * 997:] + text[:k * 997] for k in range(15)], "model": "minilm"}).encode()
    assert len(body) < 16 * 1024 * 1024
    stop_light, statuses, finished_at = threading.Event(), [], []
    light = threading.Thread(target=light_loop, args=(port, stop_light, statuses, finished_at))
    light.start()
    try:
        c = GoClient("127.0.0.1", port, timeout=120)
        started = time.monotonic()
        r = c.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        took = time.monotonic() - started
        c.close()
    finally:
        stop_light.set()
        light.join(WAIT * 4)
    assert took < 50, f"answered after {took:.0f} s, past Weaviate's 50 s client timeout"
    assert r.status == 413 and "batch.max_request_tokens" in r.json()["error"]["message"], r.body[:300]
    assert statuses and all(s == 200 for s in statuses), statuses  # no 503, no error
    # One 1M-character text alone is refused the same way (the documented default limit).
    c = GoClient("127.0.0.1", port, timeout=120)
    r = c.request("POST", "/vectors", vec_request(words(1_000_000, 99)))
    assert r.status == 413 and "batch.max_request_tokens" in r.json()["error"]
    assert c.request("POST", "/vectors", vec_request("still serving")).status == 200
    c.close()


def test_the_texts_of_a_client_that_hung_up_are_dropped_not_computed(tmp_path):
    from test_production import metric

    cfg = {**fake_model(max_input_tokens=1, delay_s=0.05), "cache": {"enabled": False}}
    cfg["models"]["fake"]["batch"] = {"max_size": 1, "workers": 1, "max_wait_ms": 0}
    proc = start(tmp_path, cfg, "--workers", "1")
    try:
        c = GoClient("127.0.0.1", proc.port)

        def embedded() -> float:
            return metric(c.request("GET", "/metrics").body.decode(), "vecshim_batch_size_sum")

        before = embedded()
        s = connect(proc.port)  # 300 one-word windows, one 50 ms call each: at least 15 s of work
        s.sendall(request_bytes(vec_request(" ".join(f"w{i}" for i in range(300)))))
        time.sleep(1.0)
        s.close()  # the client hangs up while its windows are queued
        deadline = time.monotonic() + WAIT
        while metric(c.request("GET", "/metrics").body.decode(), "vecshim_requests_total", status="499") < 1:
            assert time.monotonic() < deadline, "the server never noticed the client had gone"
            time.sleep(0.2)
        dropped_at = embedded()
        time.sleep(1.0)
        assert embedded() <= dropped_at + 1  # at most the call already running finished
        assert dropped_at - before < 300
        assert c.request("POST", "/vectors", vec_request("after")).status == 200
        c.close()
    finally:
        stop(proc)
