"""Reranking over real HTTP: reranker-transformers' `/rerank` and Cohere's `/v1|v2/rerank`.

The default config serves a bi-encoder reranker over the bundled MiniLM, so
scores are checked against cosines computed with sentence-transformers itself.
"""
from __future__ import annotations

import contextlib
import json
import threading

import cohere
import httpx
import numpy as np
import pytest

from conftest import cos, fake_config, vecshim_serve
from fakebackend import FakeBackend
from goclient import GoClient, go_json

from vecshim.app import create_app
from vecshim.errors import ConfigError
from vecshim.rerankers.bi_encoder import BiEncoderReranker
from vecshim.testing import RerankerConformance

QUERY = "Which animal jumps over the dog?"
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "",
    "Ünïcödé & <html> \u2028 漢字 🙂",
    "A kangaroo can jump over a sleeping dog in one bound.",
]


def rerank_body(query: str, documents: list[str] | None, prop: str = "") -> bytes:
    """The body Weaviate's reranker-transformers client marshals (struct order, Go escaping)."""
    body = {"query": query, "documents": documents, "property": prop}
    if documents is None:
        del body["documents"]
    return go_json(body)


def post_rerank(client, query, documents, path="/rerank"):
    r = client.request("POST", path, rerank_body(query, documents))
    assert r.headers["content-type"] == "application/json", r.body[:200]
    return r


@contextlib.contextmanager
def cohere_client(url: str, v2: bool = True):
    """The real cohere SDK pointed at vecshim, with an HTTP client we close."""
    http = httpx.Client(timeout=60)
    try:
        yield (cohere.ClientV2 if v2 else cohere.Client)(api_key="unused", base_url=url, httpx_client=http)
    finally:
        http.close()


def expected_cosines(st_model, query, documents):
    q = st_model.encode([query])[0]
    return [cos(q, st_model.encode([d if d else " "])[0]) for d in documents]


# -- reranker-transformers: the embedded default ---------------------------------

def test_reference_shape_scores_in_input_order(minilm, st_model):
    r = post_rerank(minilm.client(), QUERY, DOCS)
    assert r.status == 200
    body = r.json()
    assert set(body) == {"query", "scores", "property", "score", "error"}
    assert body["query"] == QUERY and body["property"] == "" and body["score"] is None
    assert [s["document"] for s in body["scores"]] == DOCS  # input order, empty document included
    scores = [s["score"] for s in body["scores"]]
    assert scores == pytest.approx(expected_cosines(st_model, QUERY, DOCS), abs=1e-4)
    assert max(range(len(DOCS)), key=scores.__getitem__) in (0, 4)
    assert scores[0] > scores[1] and scores[4] > scores[1]


@pytest.mark.slow
def test_real_vecshim_serve_without_config_answers_rerank(tmp_path, st_model):
    with vecshim_serve(log_path=tmp_path / "serve.log") as (proc, port):
        c = GoClient("127.0.0.1", port)
        r = post_rerank(c, QUERY, DOCS)
        assert r.status == 200
        scores = [s["score"] for s in r.json()["scores"]]
        assert scores == pytest.approx(expected_cosines(st_model, QUERY, DOCS), abs=1e-4)
        with cohere_client(f"http://127.0.0.1:{port}") as co:
            ranked = co.rerank(model="minilm-rerank", query=QUERY, documents=DOCS)
        assert sorted(x.index for x in ranked.results) == list(range(len(DOCS)))


def test_per_reranker_path_and_property_mode(minilm):
    c = minilm.client()
    default = post_rerank(c, QUERY, DOCS).json()["scores"]
    named = post_rerank(c, QUERY, DOCS, "/models/minilm-rerank/rerank").json()["scores"]
    assert named == default
    r = c.request("POST", "/rerank", go_json({"query": QUERY, "property": DOCS[0]}))
    assert r.status == 200 and r.json()["scores"] is None
    assert r.json()["score"] == pytest.approx(default[0]["score"], abs=1e-6)


def test_empty_document_list_gives_no_scores(minilm):
    r = post_rerank(minilm.client(), QUERY, [])
    assert r.status == 200 and r.json()["scores"] == []


def test_go_client_chunking_maps_70_scores_to_the_right_documents(minilm):
    """Weaviate splits 70 documents into chunks of 32, sends them in parallel and concatenates by position."""
    docs = [f"Document {i}: " + ("a fox that jumps" if i % 7 == 0 else f"notes about topic {i} and rivers")
            for i in range(70)]
    chunks = [docs[i:i + 32] for i in range(0, len(docs), 32)]
    assert [len(c) for c in chunks] == [32, 32, 6]
    replies: dict[int, list[float]] = {}
    barrier = threading.Barrier(len(chunks))

    def send(i: int) -> None:
        client = minilm.client()  # one connection per goroutine
        barrier.wait(30)
        r = post_rerank(client, QUERY, chunks[i])
        assert r.status == 200
        replies[i] = [s["score"] for s in r.json()["scores"]]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    scores = [s for i in range(len(chunks)) for s in replies[i]]
    assert len(scores) == 70
    # Each position holds that document's own score, as one request for it alone gives.
    c = minilm.client()
    for i in (0, 1, 7, 31, 32, 33, 63, 64, 69):
        alone = post_rerank(c, QUERY, [docs[i]]).json()["scores"][0]["score"]
        assert scores[i] == pytest.approx(alone, abs=1e-5), i
    jumpers = {i for i in range(70) if i % 7 == 0}
    top = set(sorted(range(70), key=lambda i: -scores[i])[:len(jumpers)])
    assert len(top & jumpers) >= len(jumpers) - 2


@pytest.mark.parametrize("body, status, needle", [
    (b"", 400, "empty"),
    (b"not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"documents": ["a"]}', 400, "query"),
    (b'{"query": 5, "documents": ["a"]}', 400, "query"),
    (b'{"query": "q"}', 400, "documents"),
    (b'{"query": "q", "documents": "a"}', 400, "documents"),
    (b'{"query": "q", "documents": ["a", 3]}', 400, "documents[1]"),
    (b'{"query": "q", "documents": ["a"], "property": 7}', 400, "property"),
])
def test_bad_requests_get_json_errors(minilm, body, status, needle):
    r = minilm.client().request("POST", "/rerank", body)
    assert r.status == status and r.headers["content-type"] == "application/json"
    assert needle in r.json()["error"]


def test_unknown_reranker_and_wrong_method_are_json(minilm):
    c = minilm.client()
    r = post_rerank(c, QUERY, DOCS, "/models/nope/rerank")
    assert r.status == 404 and "configured rerankers: minilm-rerank" in r.json()["error"]
    r = post_rerank(c, QUERY, DOCS, "/models/minilm/rerank")  # an embedding model, not a reranker
    assert r.status == 404 and "unknown reranker 'minilm'" in r.json()["error"]
    r = c.request("GET", "/rerank")
    assert r.status == 405 and "error" in r.json()


def test_meta_and_health_show_the_reranker(minilm):
    c = minilm.client()
    meta = c.request("GET", "/meta").json()
    assert meta["default_reranker"] == "minilm-rerank"
    info = meta["rerankers"]["minilm-rerank"]
    assert info["backend"] == "bi-encoder" and info["state"] == "ready"
    assert info["score_range"] == [-1.0, 1.0]
    assert info["model"] == {"embedding_model": "minilm", "similarity": "cosine",
                             "query_task": "query", "document_task": "passage"}
    one = c.request("GET", "/models/minilm-rerank/meta").json()
    assert one["reranker"]["fingerprint"] == info["fingerprint"]
    assert c.request("GET", "/models/minilm-rerank/.well-known/ready").status == 204
    assert c.request("GET", "/models/minilm-rerank/.well-known/live").status == 204
    assert c.request("GET", "/models/nope/.well-known/live").status == 404


# -- Cohere's API: the SDK and Weaviate's reranker-cohere client -----------------

def test_cohere_sdk_v2_rerank_covers_every_document_sorted(minilm):
    expected = [s["score"] for s in post_rerank(minilm.client(), QUERY, DOCS).json()["scores"]]
    with cohere_client(minilm.url) as co:
        reply = co.rerank(model="minilm-rerank", query=QUERY, documents=DOCS)
        top = co.rerank(model="minilm-rerank", query=QUERY, documents=DOCS, top_n=2)
    indices = [r.index for r in reply.results]
    assert sorted(indices) == list(range(len(DOCS)))
    got = [r.relevance_score for r in reply.results]
    assert got == sorted(got, reverse=True)
    for r in reply.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-9)
    assert [r.index for r in top.results] == indices[:2]


def test_cohere_sdk_v1_rerank_returns_documents(minilm):
    with cohere_client(minilm.url, v2=False) as co:
        reply = co.rerank(model="minilm-rerank", query=QUERY, documents=[{"text": d} for d in DOCS[:2]],
                          return_documents=True)
    assert {(r.index, r.document.text) for r in reply.results} == {(0, DOCS[0]), (1, DOCS[1])}


def test_cohere_sdk_sees_errors_as_api_errors(minilm):
    with cohere_client(minilm.url) as co, pytest.raises(cohere.core.ApiError) as err:
        co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS)
    assert err.value.status_code == 404
    assert "configured rerankers: minilm-rerank" in err.value.body["message"]


def test_weaviate_reranker_cohere_request(minilm):
    """Byte-for-byte what Weaviate's reranker-cohere sends with baseURL set; results cover every slot."""
    docs = [f"object {i} " + ("fox jumps" if i == 41 else "is about something else") for i in range(60)]
    body = go_json({"documents": docs, "query": QUERY, "model": "minilm-rerank", "return_documents": False})
    r = minilm.client().request("POST", "/v2/rerank", body, {
        "Authorization": "Bearer anything", "Content-Type": "application/json",
        "Request-Source": "unspecified:weaviate"})
    assert r.status == 200
    results = r.json()["results"]
    slots: list[float | None] = [None] * len(results)  # what the Go client allocates
    for item in results:
        assert "document" not in item
        slots[item["index"]] = item["relevance_score"]
    assert len(results) == 60 and None not in slots
    assert max(range(60), key=slots.__getitem__) == 41


@pytest.mark.parametrize("body, needle", [
    (b'{"query": "q"}', "documents"),
    (b'{"documents": ["a"]}', "query"),
    (b'{"query": "q", "documents": ["a"], "top_n": 0}', "top_n"),
    (b'{"query": "q", "documents": [{"title": "x"}]}', "documents[0]"),
    (b'{"query": "q", "documents": ["a"], "return_documents": "yes"}', "return_documents"),
])
def test_cohere_route_errors_are_cohere_shaped(minilm, body, needle):
    r = minilm.client().request("POST", "/v2/rerank", body)
    assert r.status == 400 and r.headers["content-type"] == "application/json"
    assert needle in r.json()["message"] and "error" not in r.json()


# -- config and the shared model path --------------------------------------------

def test_bi_encoder_uses_the_models_cache(serve):
    cfg = fake_config()
    cfg["cache"] = {"enabled": True}
    s = serve(cfg)
    backend = s.state.models["fake"].backend
    c = s.client()
    first = [x["score"] for x in post_rerank(c, "q", ["a", "b", "c"]).json()["scores"]]
    assert {t for texts, _ in backend.calls for t in texts} >= {"q", "a", "b", "c"}
    calls = len(backend.calls)
    again = [x["score"] for x in post_rerank(c, "q", ["c", "b", "a"]).json()["scores"]]
    assert again == pytest.approx(first[::-1], abs=1e-12)
    assert len(backend.calls) == calls  # every vector came from the cache


def test_bi_encoder_embeds_the_query_as_a_query_when_the_model_tells_them_apart(serve):
    from fakebackend import fake_vector
    s = serve(fake_config(task_aware=True))
    backend = s.state.models["fake"].backend
    backend.calls.clear()
    scores = [x["score"] for x in post_rerank(s.client(), "q", ["a", "b"]).json()["scores"]]
    assert sorted(task for _, task in backend.calls) == ["passage", "query"]
    q = fake_vector("q", "query", 16)
    assert scores == pytest.approx([cos(q, fake_vector(d, "passage", 16)) for d in "ab"], abs=1e-6)
    s2 = serve(fake_config())  # not task-aware: query and documents in one call
    b2 = s2.state.models["fake"].backend
    b2.calls.clear()
    post_rerank(s2.client(), "q", ["a", "b"])
    assert [sorted(texts) for texts, _ in b2.calls] == [["a", "b", "q"]]


def test_no_rerankers_when_the_section_is_empty(serve):
    cfg = fake_config()
    cfg["rerankers"] = {}
    s = serve(cfg)
    r = post_rerank(s.client(), "q", ["a"])
    assert r.status == 404 and "no reranker is configured" in r.json()["error"]
    assert s.client().request("GET", "/meta").json()["rerankers"] == {}


@pytest.mark.parametrize("rerankers, message", [
    ({"r": {"backend": "nope"}}, "rerankers.r.backend: unknown reranker 'nope'; installed rerankers:"),
    ({"r": {"backend": "bi-encoder", "options": {"model": "other"}}},
     "rerankers.r.options.model: 'other' is not a configured embedding model (models: fake)"),
    ({"r": {"backend": "bi-encoder"}}, "rerankers.r.options.model: Field required"),
    ({"r": {"backend": "bi-encoder", "options": {"model": "fake", "x": 1}}}, "rerankers.r.options.x: unknown key"),
    ({"fake": {"backend": "bi-encoder", "options": {"model": "fake"}}}, "rerankers.fake: 'fake' is also the name"),
    ({"r": {"backend": "bi-encoder", "options": {"model": "fake"}, "fallbacks": ["s"]}},
     "rerankers.r.fallbacks: 's' is not another configured reranker"),
    ({"r": {"backend": "bi-encoder", "options": {"model": "fake"}, "long_text": "mean"}}, "rerankers.r.long_text"),
])
def test_config_errors_name_the_path(rerankers, message):
    cfg = fake_config()
    cfg["rerankers"] = rerankers
    from fakebackend import FakePlugin
    with pytest.raises(ConfigError) as err:
        create_app(cfg, plugins=[FakePlugin()], load_entrypoints=False, load=False)
    assert message in err.value.message


def test_default_reranker_must_exist():
    cfg = fake_config()
    cfg["default_reranker"] = "missing"
    from fakebackend import FakePlugin
    with pytest.raises(ConfigError, match="default_reranker: 'missing' is not in rerankers"):
        create_app(cfg, plugins=[FakePlugin()], load_entrypoints=False, load=False)


def test_a_failing_model_fails_the_rerank_as_json(serve):
    s = serve(fake_config(fail_on="boom"))
    r = post_rerank(s.client(), "q", ["fine", "boom here"])
    assert r.status == 502 and "boom" in r.json()["error"]
    assert FakeBackend.name == "fake"


# -- the conformance kit, as a pytest base class, on the bi-encoder ----------------

class _FakeEmbedder:
    """Stands in for a configured Model: `embed()` and `fingerprint_parts()` over FakeBackend."""

    def __init__(self):
        self.backend = FakeBackend(FakeBackend.Options(dim=16))

    def embed(self, texts, task="passage"):
        return list(self.backend.embed(list(texts), task))

    def fingerprint_parts(self):
        return {"backend": self.backend.info()}


class TestBiEncoderConformance(RerankerConformance):
    reranker_class = BiEncoderReranker
    options = {"model": "fake"}
    models = {"fake": _FakeEmbedder()}
    invalid_options = ({"model": "not-configured"}, {"model": "fake", "query_task": "question"})
    tolerance = 1e-6


def test_config_check_reports_reranker_problems(tmp_path):
    from vecshim.check import check_config
    bad = tmp_path / "bad.yaml"
    bad.write_text("default_reranker: q\nrerankers:\n  s: {backend: bi-encoder, options: {model: zzz}}\n")
    assert [f"{p.path}: {p.message}" for p in check_config(bad).errors] == [
        "default_reranker: 'q' is not in rerankers (s)"]
    bad.write_text("rerankers:\n  s: {backend: bi-encoder, options: {model: zzz}}\n")
    assert [f"{p.path}: {p.message}" for p in check_config(bad).errors] == [
        "rerankers.s.options.model: 'zzz' is not a configured embedding model (models: minilm)"]
    bad.write_text("rerankers:\n  s: {backend: cross-encoder, options: {batch_size: 0}}\n")
    assert {p.path for p in check_config(bad).errors} == {"rerankers.s.options.model", "rerankers.s.options.batch_size"}


def test_server_limits_apply_to_documents(serve):
    cfg = fake_config()
    cfg["server"] = {"max_texts_per_request": 3, "max_text_chars": 10}
    c = serve(cfg).client()
    r = post_rerank(c, "q", ["a", "b", "c", "d"])
    assert r.status == 413 and "4 texts in 'documents'; the limit is 3" in r.json()["error"]
    r = post_rerank(c, "q", ["a", "b" * 11])
    assert r.status == 413 and "documents[1] has 11 characters" in r.json()["error"]
    r = c.request("POST", "/v2/rerank", go_json({"query": "q" * 11, "documents": ["a"]}))
    assert r.status == 413 and "query[0] has 11 characters" in r.json()["message"]
