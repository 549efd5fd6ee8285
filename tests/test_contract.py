"""Weaviate's text2vec-transformers contract over real HTTP."""
from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest

from conftest import fake_config
from fakebackend import FakeBackend, fake_vector
from goclient import go_json, vec_request

WEAVIATE_BODY = (b'{"text":"Article The London Eye is a ferris wheel","dims":0,"vector":null,"error":"",'
                 b'"config":{"pooling_strategy":"masked_mean","task_type":"passage"}}')


def assert_json_error(reply, status):
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"].strip()
    assert "Traceback" not in body["error"] and "<html" not in reply.body.decode(errors="replace").lower()
    return body["error"]


# -- health and meta ----------------------------------------------------------

def test_live_is_204_and_ready_waits_for_load_and_warmup(serve):
    s = serve(fake_config(load_gate=True), wait=False)
    c = s.client()
    assert c.request("GET", "/.well-known/live").status == 204
    r = c.request("GET", "/.well-known/ready")
    assert_json_error(r, 503)
    meta = c.request("GET", "/meta")  # answers while loading, without waiting
    assert meta.status == 200 and meta.json()["model"]["state"] == "loading"
    FakeBackend.gate.set()
    assert s.state.wait_ready(10)
    r = c.request("GET", "/.well-known/ready")
    assert r.status == 204 and r.body == b""
    assert c.request("GET", "/models/fake/.well-known/ready").status == 204


def test_meta_is_an_object_with_model_facts(serve):
    s = serve(fake_config(dim=24))
    meta = s.client().request("GET", "/meta")
    assert meta.status == 200
    body = meta.json()
    m = body["model"]
    assert m["backend"] == "fake" and m["dimension"] == 24 and m["normalized"] is True
    assert m["long_text"] == "chunk_mean" and len(m["fingerprint"]) == 16
    assert body["vecshim_version"] and any(p["name"].endswith("local") for p in body["plugins"])
    assert s.client().request("GET", "/models/fake/meta").json()["model"]["fingerprint"] == m["fingerprint"]


def test_meta_answers_while_inference_is_saturated(serve):
    s = serve(fake_config(delay_s=0.4, batch={"max_size": 1, "workers": 1}))
    threads = [threading.Thread(target=lambda: s.client().vectors(f"busy {i}")) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    start = time.monotonic()
    assert s.client().request("GET", "/meta").status == 200
    assert time.monotonic() - start < 0.2
    for t in threads:
        t.join()


# -- /vectors success -----------------------------------------------------------

def test_vectors_exact_weaviate_request_without_content_type(serve):
    s = serve(fake_config())
    r = s.client().request("POST", "/vectors", WEAVIATE_BODY)
    assert r.status == 200
    body = r.json()
    assert set(body) == {"text", "vector", "dim", "dims"}
    assert body["text"] == "Article The London Eye is a ferris wheel"
    assert type(body["dims"]) is int and body["dims"] == body["dim"] == 16
    assert all(type(x) is float and math.isfinite(x) for x in body["vector"])
    # Parsed into float32 (as Go's []float32 does), every number is exactly the computed value.
    expect = fake_vector("Article The London Eye is a ferris wheel", "passage", 16)
    assert np.array_equal(np.asarray(body["vector"], dtype=np.float32), expect)


@pytest.mark.parametrize("body", [
    b'{"text":"hello"}',
    b'{"text":"hello","config":null}',
    b'{"text":"hello","config":{}}',
    b'{"text":"hello","config":{"task_type":"passage"}}',
    b'{"text":"hello","config":{"pooling_strategy":"masked_mean"}}',
    b'{"text":"hello","config":{"pooling_strategy":"","dimensions":0}}',
    b'{"text":"hello","config":{"pooling_strategy":null}}',
    b'{"dims":0,"vector":null,"error":"","text":"hello","extra":{"nested":[1,2]}}',
    b'{"text":"hello","dims":384,"vector":[1,2,3],"error":"stale"}',
    b'\xef\xbb\xbf{"text":"hello"}',
])
def test_vectors_lenient_bodies(serve, body):
    s = serve(fake_config())
    r = s.client().request("POST", "/vectors", body)
    assert r.status == 200, r.body
    assert np.allclose(r.json()["vector"], fake_vector("hello", "passage", 16), atol=1e-7)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded"])
def test_vectors_any_content_type_is_parsed_as_json(serve, content_type):
    s = serve(fake_config())
    r = s.client().request("POST", "/vectors", b'{"text":"hello"}', {"Content-Type": content_type})
    assert r.status == 200


def test_task_type_maps_to_backend_mode(serve):
    s = serve(fake_config(task_aware=True))
    c = s.client()
    q = c.vectors("what is a ferris wheel", task_type="query").json()["vector"]
    p = c.vectors("what is a ferris wheel", task_type="passage").json()["vector"]
    none = c.vectors("what is a ferris wheel", task_type=None).json()["vector"]
    assert np.allclose(q, fake_vector("what is a ferris wheel", "query", 16), atol=1e-7)
    assert np.allclose(p, fake_vector("what is a ferris wheel", "passage", 16), atol=1e-7)
    assert none == p  # no task_type (Weaviate <= 1.30) means passage
    backend = s.state.models["fake"].backend
    assert {task for _, task in backend.calls} == {"query", "passage"}
    err = assert_json_error(c.request("POST", "/vectors", b'{"text":"x","config":{"task_type":"search"}}'), 400)
    assert "task_type" in err


def test_configured_prefixes_are_applied_per_task(serve):
    s = serve(fake_config(prefixes={"query": "query: ", "passage": "passage: "}))
    c = s.client()
    c.vectors("ferris wheel", task_type="query")
    c.vectors("ferris wheel", task_type="passage")
    texts = [t for batch, _ in s.state.models["fake"].backend.calls for t in batch if "ferris" in t]
    assert texts == ["query: ferris wheel", "passage: ferris wheel"]


def test_dimensions_on_non_matryoshka_model_truncate_like_the_reference(serve):
    s = serve(fake_config())
    c = s.client()
    assert c.vectors("hello", dimensions=16).status == 200  # the native size is fine
    body = c.vectors("hello", dimensions=8).json()
    full = fake_vector("hello", "passage", 16)[:8]
    assert body["dims"] == 8 and np.allclose(body["vector"], full / np.linalg.norm(full), atol=1e-6)
    assert_json_error(c.vectors("hello", dimensions=32), 400)
    assert_json_error(c.request("POST", "/vectors", b'{"text":"x","config":{"dimensions":"8"}}'), 400)


def test_dimensions_strict_keeps_the_400_on_non_matryoshka_models(serve):
    s = serve(fake_config(dimensions="strict"))
    c = s.client()
    assert c.vectors("hello", dimensions=16).status == 200
    err = assert_json_error(c.vectors("hello", dimensions=8), 400)
    assert "16" in err and "Matryoshka" in err and "strict" in err
    assert s.state.models["fake"].info()["dimensions"] == "strict"


def test_dimensions_truncate_matryoshka_model_and_renormalise(serve):
    s = serve(fake_config(matryoshka=True))
    body = s.client().vectors("hello", dimensions=8).json()
    assert body["dims"] == 8 and len(body["vector"]) == 8
    full = fake_vector("hello", "passage", 16)[:8]
    assert np.allclose(body["vector"], full / np.linalg.norm(full), atol=1e-6)


def test_go_escaped_and_unicode_text_round_trips(serve):
    s = serve(fake_config())
    text = "a <b> & c \u2028 d \u2029 é 漢字 🙂"
    r = s.client().request("POST", "/vectors", vec_request(text))
    assert b"\\u003c" in vec_request(text)
    assert r.status == 200 and r.json()["text"] == text
    assert np.allclose(r.json()["vector"], fake_vector(text, "passage", 16), atol=1e-7)


def test_lone_surrogate_is_replaced_not_a_500(serve):
    s = serve(fake_config())
    r = s.client().request("POST", "/vectors", b'{"text":"bad \\ud800 text"}')
    assert r.status == 200
    assert r.json()["text"] == "bad \ufffd text"


def test_whitespace_only_text_is_embedded(serve):
    s = serve(fake_config())
    assert s.client().vectors(" ").status == 200


def test_same_length_on_every_call_and_trailing_slash_and_double_slash(serve):
    s = serve(fake_config())
    c = s.client()
    lengths = set()
    for path in ("/vectors", "/vectors/", "//vectors", "/models/fake/vectors", "/models/fake/vectors/",
                 "//models/fake//vectors"):
        r = c.request("POST", path, vec_request("same text"))
        assert r.status == 200, (path, r.status)
        lengths.add(len(r.json()["vector"]))
    assert lengths == {16}
    for path in ("//meta", "//.well-known/ready", "/meta/", "//.well-known/live"):
        assert c.request("GET", path).status in (200, 204), path


def test_keep_alive_connection_is_reused(serve):
    s = serve(fake_config())
    c = s.client()
    c.vectors("one")
    sock = c.conn.sock
    for i in range(20):
        assert c.vectors(f"text {i}").status == 200
    assert c.conn.sock is sock


# -- errors ------------------------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    (b"", "empty"),
    (b"not json", "JSON"),
    (b'{"text": "unterminated', "JSON"),
    (b"[1,2,3]", "object"),
    (b'"just a string"', "object"),
    (b"{}", "text"),
    (b'{"text":null}', "text"),
    (b'{"text":42}', "string"),
    (b'{"text":["a","b"]}', "string"),
    (b'{"text":""}', "empty"),
    (b'{"text":"x","config":"cls"}', "config"),
    (b'{"text":"x","config":{"dimensions":-3}}', "dimensions"),
    (b'{"text":"\xff\xfe bad utf8"}', "UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "deep"),
])
def test_bad_requests_get_400_json(serve, body, needle):
    s = serve(fake_config())
    err = assert_json_error(s.client().request("POST", "/vectors", body), 400)
    assert needle.lower() in err.lower()


def test_too_large_body_is_413_json(serve):
    cfg = fake_config()
    cfg["server"] = {"max_request_mb": 0.01}
    s = serve(cfg)
    err = assert_json_error(s.client().request("POST", "/vectors", vec_request("x" * 20000)), 413)
    assert "413" in err


def test_unknown_route_and_method_are_json(serve):
    s = serve(fake_config())
    c = s.client()
    assert_json_error(c.request("GET", "/nope"), 404)
    assert_json_error(c.request("GET", "/vectors"), 405)
    assert_json_error(c.request("PUT", "/meta", b"{}"), 405)
    err = assert_json_error(c.request("POST", "/models/nope/vectors", vec_request("x")), 404)
    assert "fake" in err and "nope" in err
    assert_json_error(c.request("GET", "/models/nope/meta"), 404)
    assert_json_error(c.request("GET", "/models/nope/.well-known/ready"), 404)


def test_no_status_is_ever_a_redirect(serve):
    s = serve(fake_config())
    c = s.client()
    for method, path in [("POST", "/vectors/"), ("POST", "//vectors"), ("GET", "/meta/"), ("GET", "/models/fake"),
                         ("GET", "/models/fake/"), ("GET", "/models"), ("GET", "/")]:
        r = c.request(method, path, vec_request("x") if method == "POST" else None)
        assert not 300 <= r.status < 400, (path, r.status)


def test_backend_failure_is_json_and_server_keeps_serving(serve):
    s = serve(fake_config(fail_on="BOOM"))
    c = s.client()
    err = assert_json_error(c.vectors("please BOOM now"), 502)
    assert "BOOM" in err
    assert c.vectors("fine text").status == 200


def test_wrong_vector_length_from_backend_is_an_error_not_a_vector(serve):
    s = serve(fake_config(bad_length_on="SHORT"))
    c = s.client()
    err = assert_json_error(c.vectors("make it SHORT"), 502)
    assert "length 15" in err and "16" in err
    assert c.vectors("normal").status == 200


# -- long text ---------------------------------------------------------------------

def test_long_text_default_is_mean_of_chunks(serve):
    s = serve(fake_config(max_input_tokens=4))
    text = "one two three four five six seven"
    v = s.client().vectors(text).json()["vector"]
    a, b = fake_vector("one two three four", "passage", 16), fake_vector("five six seven", "passage", 16)
    mean = (a * 4 + b * 3) / 7
    assert np.allclose(v, mean / np.linalg.norm(mean), atol=1e-6)
    assert s.client().request("GET", "/meta").json()["model"]["long_text"] == "chunk_mean"


def test_long_text_truncate_and_error_policies(serve):
    t = serve(fake_config(max_input_tokens=4, long_text="truncate"))
    v = t.client().vectors("one two three four five six").json()["vector"]
    assert np.allclose(v, fake_vector("one two three four", "passage", 16), atol=1e-7)
    e = serve(fake_config(max_input_tokens=4, long_text="error"))
    err = assert_json_error(e.client().vectors("one two three four five six"), 413)
    assert "6 tokens" in err and "4" in err
    assert e.client().vectors("one two").status == 200


def test_huge_text_within_body_limit_never_fails(serve):
    s = serve(fake_config(max_input_tokens=64))
    text = " ".join(f"w{i}" for i in range(50000))
    r = s.client().vectors(text)
    assert r.status == 200 and len(r.json()["vector"]) == 16


# -- several models ------------------------------------------------------------------

def test_several_models_each_answer_the_whole_contract(serve):
    cfg = {"default_model": "small",
           "models": {"small": {"backend": "fake", "options": {"dim": 8}},
                      "big": {"backend": "fake", "options": {"dim": 32}}},
           "cache": {"enabled": False}}
    s = serve(cfg)
    c = s.client()
    assert len(c.vectors("x").json()["vector"]) == 8
    assert len(c.vectors("x", base="/models/big").json()["vector"]) == 32
    assert len(c.vectors("x", base="/models/small").json()["vector"]) == 8
    assert c.request("GET", "/models/big/meta").json()["model"]["dimension"] == 32
    meta = c.request("GET", "/meta").json()
    assert meta["default_model"] == "small" and set(meta["models"]) == {"small", "big"}
    assert c.request("GET", "/models/big/.well-known/ready").status == 204


# -- concurrency -------------------------------------------------------------------

def test_concurrent_requests_each_get_their_own_vector(serve):
    s = serve(fake_config(task_aware=True, delay_s=0.01))
    errors = []

    def worker(k):
        c = s.client()
        for i in range(25):
            text = f"client {k} text {i} " + "pad " * (i % 7)
            task = "query" if (i + k) % 2 else "passage"
            r = c.vectors(text, task_type=task)
            if r.status != 200 or not np.allclose(r.json()["vector"], fake_vector(text, task, 16), atol=1e-7):
                errors.append((k, i, r.status))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    calls = s.state.models["fake"].backend.calls
    assert max(len(texts) for texts, _ in calls) > 1  # concurrent requests were batched
    for texts, task in calls:  # and query/passage never shared a backend call
        assert all(("query" if (int(t.split()[1]) + int(t.split()[3])) % 2 else "passage") == task
                   for t in texts if t.startswith("client"))


def test_go_json_helper_matches_go_escaping():
    assert go_json({"text": "<&>"}) == b'{"text":"\\u003c\\u0026\\u003e"}'
    assert json.loads(vec_request("x")) == {"text": "x", "dims": 0, "vector": None, "error": "",
                                            "config": {"pooling_strategy": "masked_mean", "task_type": "passage"}}


def test_text_longer_than_the_server_limit_is_413_json(serve):
    cfg = fake_config()
    cfg["server"] = {"max_text_chars": 50}
    s = serve(cfg)
    err = assert_json_error(s.client().vectors("x" * 51), 413)
    assert "51 characters" in err and "50" in err
    assert s.client().vectors("x" * 50).status == 200
