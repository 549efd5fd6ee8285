"""The OpenAI-compatible API (CONTRACTS.md §2, §7.5): Go-client requests, the real SDK, errors."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import openai
import pytest

from conftest import fake_config
from fakebackend import fake_vector
from goclient import go_json

GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
RATE_LIMIT_NAMES = ("requests", "tokens")


def alias_config(**opts) -> dict:
    cfg = fake_config(**opts)
    cfg["models"]["fake"]["aliases"] = ["text-embedding-3-small"]
    return cfg


def go_openai(client, body: dict, token: str = "sk-weaviate"):
    """POST /v1/embeddings exactly as Weaviate's text2vec-openai client does."""
    return client.request("POST", "/v1/embeddings", go_json(body),
                          {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})


def assert_openai_error(reply, status, param=None, code=None):
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"].strip() and "Traceback" not in err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert err["code"] is None or isinstance(err["code"], str)
    return err["message"]


@pytest.fixture
def sdk(serve):
    """serve(config) -> an openai.OpenAI client pointed at vecshim (no retries)."""
    def _sdk(config=None, api_key="x"):
        s = serve(config or alias_config())
        return s, openai.OpenAI(base_url=s.url + "/v1", api_key=api_key, max_retries=0, timeout=30)
    return _sdk


# -- Weaviate's Go client -----------------------------------------------------

def test_weaviate_batch_request_gets_vectors_in_order_with_usage_and_rate_limits(serve):
    s = serve(alias_config())
    texts = ["Article one <b>", "two & three", "four five six"]
    r = go_openai(s.client(), {"input": texts, "model": "text-embedding-3-small"})
    assert r.status == 200, r.body
    body = r.json()
    assert body["object"] == "list" and body["model"] == "fake"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    for d, text in zip(body["data"], texts):
        assert np.allclose(d["embedding"], fake_vector(text, "passage", 16), atol=1e-7)
    assert body["usage"] == {"prompt_tokens": 3 + 3 + 3, "total_tokens": 9}  # FakeBackend counts words
    for name in RATE_LIMIT_NAMES:
        assert int(r.headers[f"x-ratelimit-limit-{name}"]) >= 1_000_000
        assert int(r.headers[f"x-ratelimit-remaining-{name}"]) >= 1_000_000
        assert GO_DURATION.match(r.headers[f"x-ratelimit-reset-{name}"])


def test_2048_inputs_in_one_request_come_back_in_order(serve):
    s = serve(fake_config(batch={"max_size": 256}))
    texts = [f"text number {i}" for i in range(2048)]
    r = go_openai(s.client(), {"input": texts, "model": "fake"})
    assert r.status == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(2048))
    for i in (0, 1, 777, 2047):
        assert np.allclose(data[i]["embedding"], fake_vector(texts[i], "passage", 16), atol=1e-7)


def test_text_embedding_3_default_dimensions_are_a_clear_400(serve):
    # Weaviate sends dimensions=1536 for text-embedding-3-small unless the collection sets it.
    s = serve(alias_config())
    r = go_openai(s.client(), {"input": ["x"], "model": "text-embedding-3-small", "dimensions": 1536})
    msg = assert_openai_error(r, 400, param="dimensions")
    assert "16" in msg and "1536" in msg
    r = go_openai(s.client(), {"input": ["x"], "model": "text-embedding-3-small", "dimensions": 16})
    assert r.status == 200 and len(r.json()["data"][0]["embedding"]) == 16


def test_dimensions_truncate_a_matryoshka_model(serve):
    s = serve(fake_config(matryoshka=True))
    r = go_openai(s.client(), {"input": ["hello"], "dimensions": 8})
    vec = r.json()["data"][0]["embedding"]
    full = fake_vector("hello", "passage", 16)[:8]
    assert np.allclose(vec, full / np.linalg.norm(full), atol=1e-6)


def test_missing_model_uses_the_default_and_input_may_be_a_string(serve):
    s = serve(fake_config())
    r = s.client().request("POST", "/v1/embeddings", b'{"input":"just one"}')
    assert r.status == 200
    assert np.allclose(r.json()["data"][0]["embedding"], fake_vector("just one", "passage", 16), atol=1e-7)


def test_input_type_extension_selects_the_task(serve):
    s = serve(fake_config(task_aware=True))
    c = s.client()
    q = go_openai(c, {"input": ["ferris wheel"], "input_type": "query"}).json()["data"][0]["embedding"]
    p = go_openai(c, {"input": ["ferris wheel"]}).json()["data"][0]["embedding"]
    assert np.allclose(q, fake_vector("ferris wheel", "query", 16), atol=1e-7)
    assert np.allclose(p, fake_vector("ferris wheel", "passage", 16), atol=1e-7)


# -- the real openai SDK ---------------------------------------------------------

def test_sdk_float_and_base64_give_the_same_vectors(sdk):
    s, client = sdk()
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    as_float = client.embeddings.create(input=texts, model="fake", encoding_format="float")
    as_b64 = client.embeddings.create(input=texts, model="text-embedding-3-small", encoding_format="base64")
    default = client.embeddings.create(input=texts, model="fake")  # the SDK asks for base64 and decodes it
    for res in (as_float, as_b64, default):
        assert [d.index for d in res.data] == [0, 1, 2]
        for d, text in zip(res.data, texts):
            vec = d.embedding
            if isinstance(vec, str):  # asked for explicitly, base64 reaches the caller undecoded
                vec = np.frombuffer(base64.b64decode(vec), dtype=np.float32)
            assert np.array_equal(np.asarray(vec, dtype=np.float32), fake_vector(text, "passage", 16))
    assert isinstance(as_b64.data[0].embedding, str) and isinstance(default.data[0].embedding, list)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == 6


def test_sdk_base64_is_little_endian_float32(serve):
    s = serve(fake_config())
    r = s.client().request("POST", "/v1/embeddings", b'{"input":["x"],"encoding_format":"base64"}')
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert np.array_equal(np.frombuffer(raw, dtype="<f4"), fake_vector("x", "passage", 16))


def test_sdk_lists_and_retrieves_models_and_aliases(sdk):
    s, client = sdk()
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"fake", "text-embedding-3-small"}
    assert models["text-embedding-3-small"].owned_by == "vecshim"
    assert client.models.retrieve("text-embedding-3-small").id == "text-embedding-3-small"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found"


def test_sdk_unknown_model_is_an_openai_404_listing_the_names(sdk):
    s, client = sdk()
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(input=["x"], model="text-embedding-ada-002")
    body = info.value.body
    assert body["param"] == "model" and body["code"] == "model_not_found" and body["type"] == "invalid_request_error"
    assert "fake" in body["message"] and "text-embedding-3-small" in body["message"]


def test_sdk_bad_dimensions_is_a_bad_request(sdk):
    s, client = sdk()
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input=["x"], model="fake", dimensions=99)
    assert info.value.body["param"] == "dimensions" and "99" in info.value.body["message"]


def test_sdk_bearer_token_auth(sdk):
    cfg = alias_config()
    cfg["server"] = {"auth": {"embed_tokens": ["s3cret-token"]}}
    s, good = sdk(cfg, api_key="s3cret-token")
    assert len(good.embeddings.create(input="x", model="fake").data) == 1
    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.embeddings.create(input="x", model="fake")
    assert info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_openai_error(s.client().request("POST", "/v1/embeddings", b'{"input":"x"}'), 401,
                        code="invalid_api_key")


# -- errors -------------------------------------------------------------------------

@pytest.mark.parametrize("body,param,needle", [
    (b"", None, "empty"),
    (b"not json", None, "JSON"),
    (b"[1]", None, "object"),
    (b"{}", "input", "missing"),
    (b'{"input":null}', "input", "missing"),
    (b'{"input":[]}', "input", "empty"),
    (b'{"input":""}', "input", "empty"),
    (b'{"input":["ok",""]}', "input", "input[1]"),
    (b'{"input":42}', "input", "string"),
    (b'{"input":[1,2,3]}', "input", "token ids"),
    (b'{"input":[[1,2]]}', "input", "token ids"),
    (b'{"input":["x"],"model":7}', "model", "string"),
    (b'{"input":["x"],"dimensions":0}', "dimensions", "positive"),
    (b'{"input":["x"],"dimensions":"8"}', "dimensions", "positive"),
    (b'{"input":["x"],"dimensions":true}', "dimensions", "positive"),
    (b'{"input":["x"],"encoding_format":"int8"}', "encoding_format", "base64"),
    (b'{"input":["x"],"input_type":"search"}', "input_type", "query"),
    (b'{"input":["\xff"]}', None, "UTF-8"),
])
def test_bad_requests_are_openai_400s(serve, body, param, needle):
    s = serve(fake_config())
    msg = assert_openai_error(s.client().request("POST", "/v1/embeddings", body), 400, param=param)
    assert needle.lower() in msg.lower()


def test_lenient_on_unknown_keys_user_and_nulls(serve):
    s = serve(fake_config())
    body = b'{"input":["x"],"model":null,"user":"u1","dimensions":null,"encoding_format":null,"extra":{"a":1}}'
    assert s.client().request("POST", "/v1/embeddings", body).status == 200


def test_unrouted_404_405_and_413_are_openai_shaped(serve):
    cfg = fake_config()
    cfg["server"] = {"max_request_mb": 0.01}
    s = serve(cfg)
    c = s.client()
    assert_openai_error(c.request("GET", "/v1/nothing"), 404, code="not_found")
    assert_openai_error(c.request("POST", "/v1/chat/completions", b"{}"), 404)
    r = c.request("GET", "/v1/embeddings")
    assert_openai_error(r, 405, code="method_not_allowed")
    assert "POST" in r.headers["allow"]
    assert_openai_error(c.request("DELETE", "/v1/models"), 405)
    big = go_json({"input": ["x" * 20000]})
    assert_openai_error(c.request("POST", "/v1/embeddings", big, {"Content-Type": "application/json"}), 413)
    # Paths outside /v1 keep vecshim's plain error shape.
    assert isinstance(c.request("GET", "/nothing").json()["error"], str)


def test_text_count_and_length_limits_are_413(serve):
    cfg = fake_config()
    cfg["server"] = {"max_texts_per_request": 3, "max_text_chars": 10}
    s = serve(cfg)
    c = s.client()
    assert go_openai(c, {"input": ["a", "b", "c"]}).status == 200
    msg = assert_openai_error(go_openai(c, {"input": ["a", "b", "c", "d"]}), 413, param="input")
    assert "3" in msg
    msg = assert_openai_error(go_openai(c, {"input": ["a", "x" * 11]}), 413, param="input")
    assert "10" in msg


def test_backend_failure_is_an_openai_server_error(serve):
    s = serve(fake_config(fail_on="boom"))
    msg = assert_openai_error(go_openai(s.client(), {"input": ["a boom"]}), 502)
    assert "boom" in msg


def test_not_ready_is_503(serve):
    s = serve(fake_config(load_gate=True, timeout_s=0.2), wait=False)
    assert_openai_error(go_openai(s.client(), {"input": ["x"]}), 503)


# -- shared pipeline ----------------------------------------------------------------

def test_a_text_embedded_through_any_protocol_is_a_cache_hit_through_the_others(serve):
    cfg = alias_config()
    cfg["cache"] = {"enabled": True}
    s = serve(cfg)
    backend = s.state.models["fake"].backend
    c = s.client()
    text = "shared cache text"
    assert c.vectors(text).status == 200
    calls_after_first = len(backend.calls)
    results = [
        go_openai(c, {"input": [text], "model": "text-embedding-3-small"}).json()["data"][0]["embedding"],
        c.request("POST", "/api/embed", go_json({"model": "fake", "input": [text]})).json()["embeddings"][0],
        c.request("POST", "/hf", go_json({"inputs": [text], "options": {"use_cache": True}}),
                  {"Content-Type": "application/json"}).json()[0],
    ]
    assert len(backend.calls) == calls_after_first  # no new backend call: every path hit the cache
    assert sum(text in batch for batch, _ in backend.calls) == 1
    for vec in results:
        assert np.array_equal(np.asarray(vec, dtype=np.float32), fake_vector(text, "passage", 16))
    assert json.loads(c.request("GET", "/meta").body)["model"]["name"] == "fake"
