"""Property-based fuzzing of every route with raw bytes: the server never 5xxs on input.

tests/test_openapi.py fuzzes from the OpenAPI spec (well-formed HTTP, bodies
shaped by the schema). This file goes below the spec: hypothesis builds raw
methods, paths, headers and bodies (random JSON, wrong types, deep nesting,
bodies over the size limit, invalid UTF-8, lone surrogates, control
characters, texts beyond the length limit) and sends them over a socket.
For every reply: no 5xx, every error is a JSON object with an `error`, every
200 carries finite vectors; afterwards the server still answers and no
worker died. Run locally with a bigger budget:
`VECSHIM_FUZZ_EXAMPLES=3000 VECSHIM_FUZZ_RANDOM=1 pytest tests/test_fuzz.py`.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fake_config
from test_production import start, stop

EXAMPLES = int(os.environ.get("VECSHIM_FUZZ_EXAMPLES", "400"))
RANDOM = os.environ.get("VECSHIM_FUZZ_RANDOM") == "1"
MAX_MB = 1
MAX_CHARS = 60_000

#: Every route, with the model name filled in; unknown names and paths come from the strategies.
ROUTES = ["/vectors", "/vectors/", "//vectors", "/meta", "/.well-known/ready", "/.well-known/live",
          "/models/fake/vectors", "/models/fake/meta", "/models/fake/.well-known/ready",
          "/models/fake/.well-known/live", "/models/fake/hf", "/hf", "/api/embed", "/v1/embeddings",
          "/v1/models", "/v1/models/fake", "/v1/models/a/b", "/metrics", "/openapi.json", "/docs"]
FIELDS = ["text", "config", "task_type", "dimensions", "pooling_strategy", "input", "inputs", "model",
          "encoding_format", "input_type", "options", "dims", "vector", "error", "user", "truncate"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "FOO"]


def fuzz_config() -> dict:
    cfg = fake_config(dim=8, max_input_tokens=64, task_aware=True, matryoshka=True)
    cfg["models"]["fake"]["aliases"] = ["text-embedding-3-small"]
    cfg["cache"] = {"enabled": True}
    cfg["server"] = {"max_request_mb": MAX_MB, "max_text_chars": MAX_CHARS, "max_texts_per_request": 64}
    return cfg


# -- strategies ---------------------------------------------------------------------

#: Text with everything JSON can carry: controls, lone surrogates, U+FFFF, U+2028, astral.
wild_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["", " ", "\x00", "\ud800", "\udfff x \ud83d", "\u2028\u2029", "\ufeff", "a\x1b[31m", "\U0001F600" * 3,
     "query", "passage", "fake", "text-embedding-3-small", "fake:latest", "base64", "float"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | wild_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(FIELDS) | wild_text, inner,
                                                                max_size=5),
    max_leaves=20)

#: Objects with the fields the routes read, each of a random type.
shaped = st.dictionaries(st.sampled_from(FIELDS), json_values | st.lists(wild_text, min_size=1, max_size=4),
                         max_size=6)


def _encode(value) -> bytes:
    # json.dumps writes NaN/Infinity literals and, with ensure_ascii, lone surrogates as \ud800 escapes.
    return json.dumps(value, ensure_ascii=True).encode()


@st.composite
def special_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["big_int", "deep", "deep_in_field", "huge", "long_text", "long_input", "bad_utf8",
                                 "raw_surrogate", "raw_control", "many_texts", "bom", "truncated", "empty"]))
    if kind == "big_int":
        digits = draw(st.sampled_from([19, 20, 309, 4300, 4301, 10_000]))
        field = draw(st.sampled_from([b"dimensions", b"text", b"input", b"model"]))
        return b'{"input":"x","text":"x","config":{"dimensions":%s},"%s":%s}' % (b"7" * digits, field, b"7" * digits)
    if kind == "deep":
        n = draw(st.sampled_from([50, 900, 990, 1000, 5000, 200_000]))
        return b"[" * n + b"]" * n
    if kind == "deep_in_field":
        field = draw(st.sampled_from(["text", "config", "dimensions", "input", "inputs", "model",
                                      "encoding_format", "input_type", "task_type"]))
        n = draw(st.sampled_from([100, 800, 950, 990, 999]))
        inner = b"[" * n + b"1" + b"]" * n
        if field in ("task_type", "dimensions"):
            return b'{"text":"x","config":{"%s":%s}}' % (field.encode(), inner)
        return b'{"input":"x","text":"x","%s":%s}' % (field.encode(), inner)
    if kind == "huge":
        size = draw(st.sampled_from([MAX_MB * 2**20 + 1, int(MAX_MB * 1.5 * 2**20)]))
        return b'{"text":"' + b"a" * size + b'"}'
    if kind in ("long_text", "long_input"):
        n = draw(st.sampled_from([MAX_CHARS - 10, MAX_CHARS, MAX_CHARS + 1, 3 * MAX_CHARS]))
        text = ("lorem ipsum " * (n // 12 + 1))[:n]
        field = draw(st.sampled_from(["text", "input", "inputs"])) if kind == "long_input" else "text"
        return json.dumps({field: text if field != "inputs" else [text], "text": text}).encode()
    if kind == "bad_utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\xbc", b"\x80", b"\xc0\xaf"]))
        field = draw(st.sampled_from([b"text", b"input", b"inputs", b"model"]))
        return b'{"' + field + b'":"abc' + junk + b'def"}'
    if kind == "raw_surrogate":  # CESU-style bytes of U+D800: not valid UTF-8
        return b'{"text":"a\xed\xa0\x80b","input":"a\xed\xa0\x80b"}'
    if kind == "raw_control":  # unescaped control characters inside a JSON string
        c = draw(st.sampled_from([b"\x00", b"\x01", b"\n", b"\x1f", b"\x7f"]))
        return b'{"text":"a' + c + b'b","input":"a' + c + b'b"}'
    if kind == "many_texts":
        n = draw(st.sampled_from([64, 65, 500]))
        return json.dumps({"input": ["t"] * n, "inputs": ["t"] * n}).encode()
    if kind == "bom":
        return b"\xef\xbb\xbf" + b'{"text":"bom","input":"bom","inputs":"bom"}'
    if kind == "truncated":
        return b'{"text": "abc", "config": {"task_type": "qu'
    return b""


bodies = (st.binary(max_size=200) | json_values.map(_encode) | shaped.map(_encode) | special_bodies()
          | special_bodies() | st.none())

#: Cases every run sends, whatever hypothesis draws: (method, path, body, headers).
EXPLICIT = [
    ("POST", "/vectors", b'{"text":"' + b"a" * (MAX_MB * 2**20 + 1) + b'"}', {}),
    ("POST", "/v1/embeddings", b'{"input":"' + b"a" * (MAX_MB * 2**20) + b'"}', {"Transfer-Encoding": "chunked"}),
    ("POST", "/vectors", json.dumps({"text": "word " * (MAX_CHARS // 5 + 1)}).encode(), {}),
    ("POST", "/api/embed", json.dumps({"input": ["word " * (MAX_CHARS // 5 - 1)]}).encode(), {}),
    ("POST", "/vectors", b"[" * 200_000 + b"]" * 200_000, {}),
    ("POST", "/v1/embeddings", b'{"input":"x","dimensions":' + b"[" * 990 + b"]" * 990 + b"}", {}),
    ("POST", "/vectors", b'{"text":"x","config":{"task_type":' + b"[" * 990 + b"]" * 990 + b"}}", {}),
    ("POST", "/api/embed", b'{"input":"x","model":' + b"[" * 990 + b"]" * 990 + b"}", {}),
    ("POST", "/hf", b'{"inputs":' + b"[" * 990 + b'"x"' + b"]" * 990 + b"}", {}),
    ("POST", "/vectors", b'{"text":"abc\xffdef"}', {}),
    ("POST", "/vectors", b'{"text":"\\ud800 lone \\udc00"}', {}),
    ("POST", "/v1/embeddings", b'{"input":["\\udfff","ok\\u0000\\u001b"]}', {}),
    ("POST", "/vectors", b'{"text":"a\x00b"}', {}),
    ("POST", "/v1/embeddings", json.dumps({"input": ["t"] * 65}).encode(), {}),
    ("GET", "/vectors", None, {}),
    ("DELETE", "/v1/embeddings", None, {}),
    ("POST", "/models/%ff/vectors", b'{"text":"x"}', {}),
    ("POST", "/v1/models/nope", b"{}", {}),
    # Values echoed in error messages must not come back whole.
    ("POST", "/vectors", json.dumps({"text": "x", "config": {"task_type": "q" * 500_000}}).encode(), {}),
    ("POST", "/vectors", json.dumps({"text": "x", "config": {"dimensions": [1] * 100_000}}).encode(), {}),
    ("POST", "/v1/embeddings", json.dumps({"input": "x", "model": "m" * 500_000}).encode(), {}),
    ("POST", "/v1/embeddings", json.dumps({"input": "x", "encoding_format": "e" * 500_000}).encode(), {}),
    ("POST", "/v1/embeddings", json.dumps({"input": "x", "dimensions": {"d": "d" * 500_000}}).encode(), {}),
    ("POST", "/api/embed", json.dumps({"input": "x", "model": "m" * 500_000}).encode(), {}),
    ("POST", "/api/embed", json.dumps({"input": "x", "dimensions": "9" * 500_000}).encode(), {}),
    # Integer literals beyond Python's int_max_str_digits (4300) raise ValueError, not JSONDecodeError.
    ("POST", "/vectors", b'{"text":"x","config":{"dimensions":' + b"9" * 5000 + b"}}", {}),
    ("POST", "/v1/embeddings", b'{"input":"x","dimensions":' + b"1" * 4301 + b"}", {}),
]

path_segment = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).map(lambda s: quote(s, safe=""))
EMBED_ROUTES = ["/vectors", "/models/fake/vectors", "/v1/embeddings", "/api/embed", "/hf", "/models/fake/hf"]
paths = st.sampled_from(EMBED_ROUTES) | st.sampled_from(ROUTES) | st.builds(
    lambda prefix, seg, suffix: prefix + seg + suffix,
    st.sampled_from(["/models/", "/v1/models/", "/", "/v1/", "/models/fake/", "/api/"]),
    path_segment | st.sampled_from(["%ff", "%ed%a0%80", "%00", "..", "%2e%2e", "fake%2fvectors", "%c0%af"]),
    st.sampled_from(["", "/vectors", "/meta", "/hf", "/.well-known/ready", "?x=1", "/"]))

header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                       max_size=40)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                     "application/json; charset=utf-16"]) | header_value,
    "Authorization": header_value,
    "X-Request-ID": header_value,
    "Accept": header_value,
    "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity"]),
    "Transfer-Encoding": st.just("chunked"),
})


# -- sending and checking -----------------------------------------------------------

def send(port: int, method: str, path: str, body: bytes | None, hdrs: dict) -> tuple[int, dict, bytes]:
    """One request on a fresh connection; the status, lower-case headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        chunked = hdrs.get("Transfer-Encoding") == "chunked" and body is not None
        for k, v in hdrs.items():
            conn.putheader(k, v.encode("latin-1"))
        if body is not None and not chunked:
            conn.putheader("Content-Length", str(len(body)))
        try:
            if chunked:
                conn.endheaders()
                conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n")
            else:
                conn.endheaders(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) before reading all of a large body: read that answer
        resp = conn.getresponse()
        data = resp.read() if method != "HEAD" else b""
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def check_reply(method: str, path: str, status: int, hdrs: dict, data: bytes) -> None:
    """The invariants every reply keeps, whatever was sent."""
    where = f"{method} {path} -> {status}: {data[:300]!r}"
    assert status < 500, where
    if method == "HEAD" or status in (204, 304):
        return
    ctype = hdrs.get("content-type", "")
    if status < 400 and not ctype.startswith("application/json"):
        # Only three things answer 2xx in another format: the docs page, the metrics and OPTIONS.
        route = path.split("?")[0]
        assert route in ("/docs", "/metrics") or (method == "OPTIONS" and not data), where
        return
    assert ctype.startswith("application/json"), where
    body = json.loads(data)  # strict: no NaN literals anywhere
    if status < 400 and isinstance(body, list):  # the Hugging Face route answers a bare list of vectors
        assert path.split("?")[0].endswith("/hf"), where
        body = {"embeddings": body}
    assert isinstance(body, dict), where
    if status >= 400:
        err = body.get("error")
        assert isinstance(err, str) or (isinstance(err, dict) and isinstance(err.get("message"), str)), where
        assert "Traceback" not in data.decode("utf-8", "replace"), where
        assert len(data) < 4096, f"error bodies stay short, got {len(data)} bytes for {where[:200]}"
    else:
        for vector in _vectors(body):
            assert vector and all(isinstance(x, float) and math.isfinite(x) for x in vector), where


def _vectors(body: dict):
    if isinstance(body.get("vector"), list):
        yield body["vector"]
    for key in ("embeddings",):
        for v in body.get(key) or []:
            yield v
    for item in body.get("data") or []:
        if isinstance(item, dict) and isinstance(item.get("embedding"), list):
            yield item["embedding"]


def run_fuzz(port: int, examples: int, budget_s: float, seen: list) -> None:
    deadline = time.monotonic() + budget_s

    @settings(max_examples=examples, deadline=None, database=None, derandomize=not RANDOM,
              suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(["POST"] * 6 + METHODS), path=paths, body=bodies, hdrs=headers)
    def one(method, path, body, hdrs):
        if time.monotonic() > deadline:
            return
        if body is None and method in ("POST", "PUT", "PATCH"):
            hdrs = {k: v for k, v in hdrs.items() if k != "Transfer-Encoding"}
        status, rh, data = send(port, method, path, body, hdrs)
        seen.append(status)
        check_reply(method, path, status, rh, data)

    for method, path, body, hdrs in EXPLICIT:
        status, rh, data = send(port, method, path, body, hdrs)
        seen.append(status)
        check_reply(method, path, status, rh, data)
    one()


def hf_check_alive(port: int) -> None:
    status, _, _ = send(port, "GET", "/.well-known/ready", None, {})
    assert status == 204
    status, _, data = send(port, "POST", "/vectors", b'{"text":"still here"}', {})
    assert status == 200 and len(json.loads(data)["vector"]) == 8


def test_fuzz_raw_requests_against_every_route(serve):
    s = serve(fuzz_config())
    seen: list[int] = []
    run_fuzz(s.port, EXAMPLES, 30, seen)
    assert len(seen) >= min(EXAMPLES, 300), len(seen)
    # The run reached the interesting outcomes, not just 404s.
    assert {200, 400, 404, 405, 413} <= set(seen), sorted(set(seen))
    hf_check_alive(s.port)
    assert s.thread.is_alive() and s.state.not_ready_reason() is None
    assert all(m.batcher and all(t.is_alive() for t in m.batcher._encoders.threads) for m in s.state.models.values())


def _children(pid: int) -> set[int]:
    """The master's children: its HTTP workers and, with two or more workers, the engine."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


@pytest.mark.slow
def test_fuzz_against_gunicorn_kills_no_worker(tmp_path):
    """The same properties through gunicorn's HTTP parser, with two workers."""
    proc = start(tmp_path, fuzz_config(), "--workers", "2")
    try:
        workers = _children(proc.pid)
        assert len(workers) == 3  # two HTTP workers and the engine
        seen: list[int] = []
        run_fuzz(proc.port, max(60, EXAMPLES // 4), 15, seen)
        assert len(seen) >= 60
        hf_check_alive(proc.port)
        assert _children(proc.pid) == workers, "a worker or the engine died or was replaced during the fuzz run"
    finally:
        stop(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log, log[-3000:]
