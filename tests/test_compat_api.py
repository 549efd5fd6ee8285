"""Ollama `/api/embed` and the Hugging Face endpoint, as Weaviate calls them."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import fake_config
from fakebackend import fake_vector
from goclient import go_json

HF_HEADERS = {"Content-Type": "application/json"}


def two_models() -> dict:
    cfg = fake_config()
    cfg["models"]["fake"]["aliases"] = ["nomic-embed-text"]
    cfg["models"]["wide"] = {"backend": "fake", "options": {"dim": 32}}
    return cfg


def assert_plain_error(reply, status):
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"].strip()
    return body["error"]


def ollama(client, body: dict):
    """POST /api/embed exactly as text2vec-ollama does: Go JSON, no Content-Type, no auth."""
    return client.request("POST", "/api/embed", go_json(body))


# -- Ollama ---------------------------------------------------------------------

def test_ollama_weaviate_request_picks_the_model_and_keeps_order(serve):
    s = serve(two_models())
    c = s.client()
    texts = [f"object {i} <b>&</b>" for i in range(10)]  # Weaviate batches 10 texts per request
    r = ollama(c, {"model": "nomic-embed-text", "input": texts})
    assert r.status == 200, r.body
    body = r.json()
    assert body["model"] == "fake" and len(body["embeddings"]) == 10
    for vec, text in zip(body["embeddings"], texts):
        assert np.allclose(vec, fake_vector(text, "passage", 16), atol=1e-7)
    assert body["prompt_eval_count"] == 30 and isinstance(body["total_duration"], int)
    wide = ollama(c, {"model": "wide", "input": ["x"]}).json()["embeddings"]
    assert len(wide[0]) == 32


@pytest.mark.parametrize("body", [
    {"input": "one text"},
    {"model": "fake", "input": "one text"},
    {"model": "fake:latest", "input": ["one text"]},
    {"model": "nomic-embed-text:latest", "input": ["one text"], "truncate": True, "keep_alive": "5m",
     "options": {"num_ctx": 2048}},
    {"model": None, "input": ["one text"], "unknown": [1, 2]},
])
def test_ollama_lenient_bodies(serve, body):
    s = serve(two_models())
    r = ollama(s.client(), body)
    assert r.status == 200, r.body
    assert np.allclose(r.json()["embeddings"][0], fake_vector("one text", "passage", 16), atol=1e-7)


def test_ollama_unknown_model_is_a_404_listing_names(serve):
    s = serve(two_models())
    msg = assert_plain_error(ollama(s.client(), {"model": "llama3", "input": ["x"]}), 404)
    assert "llama3" in msg and "fake" in msg and "wide" in msg and "nomic-embed-text" in msg


@pytest.mark.parametrize("body,needle", [
    (b"", "empty"), (b"nope", "JSON"), (b"[]", "object"), (b'{"model":"fake"}', "input"),
    (b'{"input":[]}', "empty"), (b'{"input":[1]}', "token ids"), (b'{"input":"x","model":3}', "model"),
    (b'{"input":"x","dimensions":-1}', "dimensions"),
])
def test_ollama_bad_requests_are_400(serve, body, needle):
    s = serve(fake_config())
    msg = assert_plain_error(s.client().request("POST", "/api/embed", body), 400)
    assert needle.lower() in msg.lower()


def test_ollama_limits_and_backend_errors(serve):
    cfg = fake_config(fail_on="boom")
    cfg["server"] = {"max_texts_per_request": 2}
    s = serve(cfg)
    c = s.client()
    assert_plain_error(ollama(c, {"input": ["a", "b", "c"]}), 413)
    assert "boom" in assert_plain_error(ollama(c, {"input": ["boom"]}), 502)


# -- Hugging Face ------------------------------------------------------------------

def test_hf_weaviate_request_gets_a_bare_list_of_vectors(serve):
    s = serve(two_models())
    c = s.client()
    texts = ["first text", "second <text>"]
    body = go_json({"inputs": texts, "options": {"use_cache": True}})
    assert body.startswith(b'{"inputs":[')
    r = c.request("POST", "/hf", body, HF_HEADERS)
    assert r.status == 200, r.body
    vecs = r.json()
    assert isinstance(vecs, list) and len(vecs) == 2
    for vec, text in zip(vecs, texts):
        assert np.allclose(vec, fake_vector(text, "passage", 16), atol=1e-7)
    wide = c.request("POST", "/models/wide/hf", body, HF_HEADERS).json()
    assert [len(v) for v in wide] == [32, 32]


def test_hf_string_input_and_all_options(serve):
    s = serve(fake_config())
    body = go_json({"inputs": "solo", "options": {"wait_for_model": True, "use_gpu": True, "use_cache": True}})
    r = s.client().request("POST", "/hf", body, HF_HEADERS)
    assert r.status == 200 and len(r.json()) == 1


def test_hf_bearer_key_is_checked_when_tokens_are_configured(serve):
    cfg = fake_config()
    cfg["server"] = {"auth": {"embed_tokens": ["hf-key-1234"]}}
    s = serve(cfg)
    c = s.client()
    body = go_json({"inputs": ["x"], "options": {"use_cache": True}})
    assert c.request("POST", "/hf", body, {**HF_HEADERS, "Authorization": "Bearer hf-key-1234"}).status == 200
    assert_plain_error(c.request("POST", "/hf", body, HF_HEADERS), 401)


@pytest.mark.parametrize("path,body,status", [
    ("/hf", b'{"inputs":[]}', 400),
    ("/hf", b'{"text":"x"}', 400),
    ("/hf", b'{"inputs":["x"],"options":"fast"}', 400),
    ("/hf", b'{"inputs":[null]}', 400),
    ("/models/nope/hf", b'{"inputs":["x"]}', 404),
])
def test_hf_errors_are_json_with_a_string_error(serve, path, body, status):
    s = serve(fake_config())
    assert_plain_error(s.client().request("POST", path, body, HF_HEADERS), status)
