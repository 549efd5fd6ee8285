"""The worker's lean `POST /vectors` path (vecshim/worker.py) against the Flask path it stands in for.

A plain `POST /vectors HTTP/1.1` skips gunicorn's parser and Flask's
dispatch; everything else (other paths, `/vectors/`, query strings, chunked
bodies, Expect, odd headers, servers with `embed_tokens`) takes Flask. The
properties: both paths give byte-identical bodies, the same status and the
same headers for every input; eligibility is decided on exactly the
requests the lean path can answer; connection handling (keep-alive, close,
pipelining) is the same; auth can never be skipped.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from goclient import GoClient
from test_hostile import connect, read_reply, request_bytes
from conftest import free_port
from test_production import fake_model, metric, start, stop
from vecshim.app import create_app
from vecshim.api.weaviate import lean_vectors
from vecshim.framing import Framing, ReadLimits
from vecshim.worker import VecshimWorker

BODIES = [
    b'{"text": "hello world"}',
    '{"text": "caf\u00e9 \u6f22\u5b57 \U0001f600"}'.encode(),
    b'{"text": ""}',
    b'{"text": "   "}',
    b'{"text": 42}',
    b'{"text": null}',
    b'{}',
    b'[]',
    b'',
    b'{"te',
    b'\xff\xfe not utf-8',
    b'{"text": "x", "config": {"task_type": "query"}}',
    b'{"text": "x", "config": {"task_type": "nonsense"}}',
    b'{"text": "x", "config": {"pooling_strategy": "masked_mean"}}',
    b'{"text": "x", "config": {"pooling_strategy": "cls"}}',
    b'{"text": "x", "config": {"pooling_strategy": 7}}',
    b'{"text": "x", "dimensions": 4}',
    b'{"text": "x", "dimensions": 4000}',
    b'{"text": "x", "dimensions": "four"}',
    b'{"text": "x", "unknown": [1, 2, 3]}',
    json.dumps({"text": "y" * 5000}).encode(),
]


@pytest.fixture(scope="module", params=["1", "2"], ids=["in-process", "engine"])
def server(tmp_path_factory, request):
    """One worker with the model in-process, and two workers with the engine."""
    tmp = tmp_path_factory.mktemp("lean")
    proc = start(tmp, {**fake_model(), "cache": {"enabled": False}, "server": {"max_text_chars": 4000}},
                 "--workers", request.param)
    yield proc
    stop(proc)


def exchange(port: int, data: bytes) -> tuple[int, dict, bytes, bool]:
    with connect(port) as s:
        s.sendall(data)
        return read_reply(s)


def comparable(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if k not in ("date", "x-request-id")}


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_the_lean_path_answers_exactly_as_the_flask_path(server, body):
    lean = exchange(server.port, request_bytes(body))
    flask = exchange(server.port, request_bytes(body, path="/models/fake/vectors"))
    slash = exchange(server.port, request_bytes(body, path="/vectors/"))
    assert lean[0] == flask[0] == slash[0]
    assert lean[2] == flask[2] == slash[2]
    assert comparable(lean[1]) == comparable(flask[1]) == comparable(slash[1])
    assert lean[1]["content-type"] == "application/json"
    assert isinstance(json.loads(lean[2]).get("vector" if lean[0] == 200 else "error"), (list, str))


def test_the_server_log_says_the_lean_path_is_on(server):
    server.logfile.flush()
    log = Path(server.logfile.name).read_text(encoding="utf-8", errors="replace")
    assert "lean POST /vectors path on" in log


def test_request_ids_metrics_and_access_lines_are_kept(server):
    status, headers, _, _ = exchange(server.port, request_bytes(b'{"text": "traced"}', headers="X-Request-ID: lean-42\r\n"))
    assert status == 200 and headers["x-request-id"] == "lean-42"
    status, headers, _, _ = exchange(server.port, request_bytes(b'{"text": "traced"}', headers="X-Request-ID: bad id!\r\n"))
    assert status == 200 and headers["x-request-id"] not in ("", "bad id!")
    before = metric(GoClient("127.0.0.1", server.port).request("GET", "/metrics").body.decode(),
                    "vecshim_requests_total", route="/vectors", status="400")
    exchange(server.port, request_bytes(b"{"))
    after = metric(GoClient("127.0.0.1", server.port).request("GET", "/metrics").body.decode(),
                   "vecshim_requests_total", route="/vectors", status="400")
    assert after == before + 1
    server.logfile.flush()
    log = Path(server.logfile.name).read_text(encoding="utf-8", errors="replace")
    assert "POST /vectors 200" in log and "request_id=lean-42" in log


ODD_HEADS = {
    "control-character": "X-Odd: a\x01b\r\n",
    "101-header-lines": "".join(f"X-{i}: v\r\n" for i in range(99)),  # with Host and Content-Length
    "100-header-lines": "".join(f"X-{i}: v\r\n" for i in range(98)),
    "bad-name": "Bad Name: x\r\n",
    "folded": "X-A: a\r\n folded: x\r\n",
    "over-long": "X-Long: " + "v" * 8200 + "\r\n",
    "stray-crlf-first": None,
}


@pytest.mark.parametrize("odd", ODD_HEADS, ids=list(ODD_HEADS))
def test_requests_with_odd_header_lines_are_answered_as_on_the_flask_path(server, odd):
    """Framing notes what the lean path may not take; gunicorn and Flask then answer as for `/vectors/`."""
    body = b'{"text": "odd"}'

    def data(path):
        if ODD_HEADS[odd] is None:
            return b"\r\n" + request_bytes(body, path=path)
        return request_bytes(body, path=path, headers=ODD_HEADS[odd])

    lean, slash = exchange(server.port, data("/vectors")), exchange(server.port, data("/vectors/"))
    assert (lean[0], lean[2]) == (slash[0], slash[2])
    assert comparable(lean[1]) == comparable(slash[1])


def replies(s: socket.socket, n: int) -> list[bytes]:
    """The bodies of the next `n` 200 replies, read through one buffer (they may share a segment)."""
    s.settimeout(30)
    f = s.makefile("rb")
    bodies = []
    for _ in range(n):
        status = int(f.readline().split()[1])
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        assert status == 200
        bodies.append(f.read(length))
    return bodies


def test_keep_alive_close_and_pipelining_behave_as_on_the_flask_path(server):
    one = request_bytes(b'{"text": "a"}')
    with connect(server.port) as s:  # keep-alive: three requests, one connection
        for _ in range(3):
            s.sendall(one)
            status, headers, _, closed = read_reply(s)
            assert status == 200 and headers["connection"] == "keep-alive" and not closed
    with connect(server.port) as s:  # pipelined: both answered, in order
        s.sendall(request_bytes(b'{"text": "first"}') + request_bytes(b'{"text": "second"}'))
        texts = [json.loads(body)["text"] for body in replies(s, 2)]
    assert texts == ["first", "second"]
    status, headers, _, closed = exchange(server.port, request_bytes(b'{"text": "a"}', headers="Connection: close\r\n"))
    assert status == 200 and headers["connection"] == "close" and closed


def test_bearer_tokens_switch_the_lean_path_off(tmp_path):
    proc = start(tmp_path, {**fake_model(), "server": {"auth": {"embed_tokens": ["s3cret-token"]}}},
                 "--workers", "1")
    try:
        status, headers, body, _ = exchange(proc.port, request_bytes(b'{"text": "x"}'))
        assert status == 401 and "error" in json.loads(body)
        status, _, _, _ = exchange(proc.port, request_bytes(b'{"text": "x"}',
                                                            headers="Authorization: Bearer s3cret-token\r\n"))
        assert status == 200
        proc.logfile.flush()
        log = Path(proc.logfile.name).read_text(encoding="utf-8", errors="replace")
        assert "lean POST /vectors path off (server.auth.embed_tokens is set)" in log
    finally:
        stop(proc)


def framed(data: bytes):
    f = Framing(ReadLimits())
    assert f.feed(data)
    return VecshimWorker._lean_request(f, bytearray(data))


def test_eligibility_takes_only_plain_requests():
    body = b'{"text": "x"}'
    assert framed(request_bytes(body)) == (body, None, False)
    assert framed(request_bytes(body, headers="X-Request-ID: abc\r\nConnection: Close\r\n")) == (body, "abc", True)
    pipelined = request_bytes(body) + request_bytes(b'{"text": "next"}')
    assert framed(pipelined) == (body, None, False)  # only the first request's body
    for other in (request_bytes(body, path="/vectors/"), request_bytes(body, path="/vectors?x=1"),
                  request_bytes(body, path="/models/fake/vectors"),
                  request_bytes(body, headers="Expect: 100-continue\r\n"),
                  request_bytes(body, headers="Connection: Upgrade\r\nUpgrade: h2c\r\n"),
                  request_bytes(body, headers="X-Odd: a\x01b\r\n"),
                  request_bytes(body, headers="Bad Name: x\r\n"),
                  request_bytes(body, headers=" folded: x\r\n"),
                  request_bytes(body, headers="".join(f"X-{i}: v\r\n" for i in range(101))),
                  b"POST /vectors HTTP/1.0\r\nContent-Length: 13\r\n\r\n" + body,
                  b"POST /vectors HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n" + body + b"\r\n0\r\n\r\n"):
        assert framed(other) is None, other


def test_lean_vectors_matches_the_flask_view_in_process(tmp_path):
    """The function itself, without a worker: every body, same status, body and headers."""
    from fakebackend import FakePlugin

    app = create_app({**fake_model(), "cache": {"enabled": False}, "server": {"max_text_chars": 4000}},
                     plugins=[FakePlugin()], load_entrypoints=False)
    state = app.extensions["vecshim"]
    assert state.wait_ready(30)
    client = app.test_client()
    try:
        for body in BODIES:
            status, headers, reply = lean_vectors(state, body, "rid-1", "127.0.0.1")
            flask = client.post("/vectors", data=body, headers={"X-Request-ID": "rid-1"})
            assert (status, reply) == (flask.status_code, flask.get_data()), body
            assert dict(headers) == {k: v for k, v in flask.headers.items() if k != "Content-Type"} | \
                {"Content-Type": "application/json"}, body
        assert state.in_flight == 0
    finally:
        state.close(5)


def ready(proc, dial) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            with dial() as s:
                s.sendall(b"GET /.well-known/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                if read_reply(s)[0] == 204:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.2)


def unix_client(path: str, bind=None):
    def dial():
        s = socket.socket(socket.AF_UNIX)
        try:
            if bind is not None:
                s.bind(bind())
            s.connect(path)
        except OSError:
            s.close()
            raise
        return s
    return dial


def own_name(s: socket.socket) -> str:
    """A client socket's name for itself, as text: a TCP client's host; a Unix socket's name, '' if unbound."""
    name = s.getsockname()
    return name[0] if isinstance(name, tuple) else name.decode() if isinstance(name, bytes) else name


@pytest.mark.parametrize("listen", ["ipv4", "ipv6", "unix"])
def test_the_access_line_names_the_client_as_the_flask_path_does(tmp_path, listen):
    """The JSON access line's `remote` is the client's own name on both paths."""
    sock_path, port, n = str(tmp_path / "v.sock"), free_port(), iter(range(100))
    bind, dials = {
        "ipv4": (f"127.0.0.1:{port}", [lambda: connect(port)]),
        "ipv6": (f"[::1]:{port}", [lambda: socket.create_connection(("::1", port), timeout=30)]),
        "unix": (f"unix:{sock_path}", [unix_client(sock_path),  # unbound: ''
                                       unix_client(sock_path, lambda: str(tmp_path / f"client-{next(n)}")),
                                       unix_client(sock_path, lambda: f"\0vecshim-{time.time_ns()}".encode())]),
    }[listen]
    proc = start(tmp_path, {**fake_model(), "cache": {"enabled": False}, "logging": {"format": "json"}},
                 "--workers", "1", "--bind", bind, ready=False)
    try:
        ready(proc, dials[0])
        names = {}  # request id -> the name of the client socket that sent it
        for i, dial in enumerate(dials):
            for path, which in (("/vectors", "lean"), ("/vectors/", "flask")):
                with dial() as s:
                    names[f"c{i}-{which}"] = own_name(s)
                    s.sendall(request_bytes(b'{"text": "who"}', path=path, headers=f"X-Request-ID: c{i}-{which}\r\n"))
                    assert read_reply(s)[0] == 200
        time.sleep(0.5)
        proc.logfile.flush()
        lines = Path(proc.logfile.name).read_text(encoding="utf-8", errors="replace").splitlines()
        assert any("lean POST /vectors path on" in x for x in lines)
        access = [json.loads(x) for x in lines if x.startswith("{") and '"vecshim.access"' in x]
        assert {a["request_id"]: a["remote"] for a in access if a.get("request_id") in names} == names
        kinds = {"ipv4": {"127.0.0.1"}, "ipv6": {"::1"}, "unix": {"", "path", "abstract"}}[listen]
        assert {"path" if v.startswith(str(tmp_path)) else "abstract" if v.startswith("\0") else v
                for v in names.values()} == kinds
    finally:
        stop(proc)
