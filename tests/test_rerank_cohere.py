"""The `cohere` reranker, through the real SDK against a fake Cohere rerank server on 127.0.0.1."""
from __future__ import annotations

import json

import pytest

from conftest import fake_config
from tests.fakes import reset, status
from tests.fakes.cohere_rerank_upstream import FakeCohereRerank, relevance

from vecshim.config import RerankerConfig
from vecshim.errors import BackendError, ConfigError, UpstreamError
from vecshim.ranking import Ranker
from vecshim.rerankers.cohere_rerank import CohereRerankOptions, CohereReranker
from vecshim.testing import run_reranker_conformance

KEY = "co-rerank-0123456789abcdef"
QUERY = "fox jumps over dog"
DOCS = ["the fox jumps", "Paris is in France", "dog", "a fox jumps over the lazy dog", "nothing here"]


_MADE: list[CohereReranker] = []


@pytest.fixture
def fake():
    with FakeCohereRerank(api_key=KEY) as fake:
        yield fake
    while _MADE:  # close every client a test built
        _MADE.pop().close()


def make(fake, **options) -> CohereReranker:
    r = CohereReranker(CohereRerankOptions(**{"base_url": fake.url, "api_key": KEY, "timeout_s": 2.0, **options}))
    r.load()
    _MADE.append(r)
    return r


def test_scores_come_back_in_input_order(fake):
    r = make(fake)
    assert r.score(QUERY, DOCS) == [relevance(QUERY, d) for d in DOCS]
    (req,) = fake.requests
    assert req.path == "/v2/rerank" and req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body == {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS, "top_n": len(DOCS)}
    assert r.info() == {"model": "rerank-v3.5", "host": f"127.0.0.1:{fake.url.rsplit(':', 1)[1]}",
                        "max_tokens_per_doc": None}


@pytest.mark.parametrize("spoil, needle", [("drop", "scored 4 of 5"), ("repeat", "repeated"), ("range", "index 5")])
def test_a_reply_that_misses_or_repeats_a_document_is_an_error(fake, spoil, needle):
    fake.spoil = spoil
    with pytest.raises(BackendError, match=needle):
        make(fake).score(QUERY, DOCS)


def test_errors_are_mapped_without_the_key(fake):
    r = make(fake)
    fake.inject(status(429, retry_after=3))
    with pytest.raises(UpstreamError) as err:
        r.score(QUERY, DOCS)
    assert err.value.retryable and err.value.upstream_status == 429 and err.value.retry_after == 3
    bad = make(fake, api_key="co-wrong-key-0123456789")
    with pytest.raises(UpstreamError) as err:
        bad.score(QUERY, DOCS)
    assert err.value.upstream_status == 401 and "co-wrong-key" not in err.value.message
    fake.inject(reset())
    with pytest.raises(UpstreamError, match="connection failed") as err:
        r.score(QUERY, DOCS)
    assert err.value.retryable


def test_key_is_required_without_base_url(monkeypatch):
    monkeypatch.delenv("CO_API_KEY", raising=False)
    monkeypatch.delenv("COHERE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs an API key"):
        CohereReranker(CohereRerankOptions()).load()


def test_core_retries_and_splits_large_requests(fake):
    cfg = RerankerConfig(backend="cohere", options={}, retry={"base_delay_s": 0.01, "max_delay_s": 0.05},
                         batch={"max_size": 4})
    ranker = Ranker("co", cfg, make(fake))
    ranker.load()
    fake.clear()
    fake.inject(status(503), times=2)
    docs = [f"doc {i} fox" if i % 3 else f"doc {i}" for i in range(10)]
    scores = ranker.rank("fox", docs)
    assert list(scores) == pytest.approx([relevance("fox", d) for d in docs])
    calls = [r for r in fake.requests if r.path == "/v2/rerank"]
    assert len(calls) == 2 + 3  # two 503s retried, then 10 documents in calls of at most 4
    assert sorted(len(c.body["documents"]) for c in calls[2:]) == [2, 4, 4]
    ranker.close()


def test_conformance_kit(fake):
    run_reranker_conformance(CohereReranker, {"base_url": fake.url, "api_key": KEY}, secret_values=(KEY,),
                             invalid_options=({"max_batch_size": 5000},),
                             failing_options={"base_url": "http://127.0.0.1:9", "api_key": KEY, "timeout_s": 1},
                             threads=4)


def test_served_over_http_beside_the_embedding_model(serve, fake):
    cfg = fake_config()
    cfg["rerankers"] = {"co": {"backend": "cohere", "aliases": ["rerank-v3.5"],
                               "options": {"base_url": fake.url, "api_key": KEY}}}
    s = serve(cfg)
    c = s.client()
    meta = c.request("GET", "/meta").json()["rerankers"]["co"]
    assert meta["score_range"] == [0.0, 1.0] and KEY not in json.dumps(meta)
    r = c.request("POST", "/rerank", json.dumps({"query": QUERY, "documents": DOCS, "property": ""}).encode())
    assert [x["score"] for x in r.json()["scores"]] == [relevance(QUERY, d) for d in DOCS]
    # Weaviate's reranker-cohere pointed at vecshim, with its default model name as an alias.
    r = c.request("POST", "/v2/rerank", json.dumps({"documents": DOCS, "query": QUERY, "model": "rerank-v3.5",
                                                    "return_documents": False}).encode())
    assert sorted(x["index"] for x in r.json()["results"]) == list(range(len(DOCS)))
    fake.always(status(400))
    r = c.request("POST", "/v2/rerank", json.dumps({"documents": DOCS, "query": QUERY}).encode())
    assert r.status == 502 and "cohere upstream returned 400" in r.json()["message"]


def test_fallback_takes_over_when_the_primary_fails(serve, fake):
    with FakeCohereRerank(api_key=KEY) as other:
        cfg = fake_config()
        cfg["rerankers"] = {
            "primary": {"backend": "cohere", "fallbacks": ["spare"], "retry": {"max_attempts": 1},
                        "options": {"base_url": fake.url, "api_key": KEY}},
            "spare": {"backend": "cohere", "options": {"base_url": other.url, "api_key": KEY}},
        }
        s = serve(cfg)
        fake.always(status(500))
        body = json.dumps({"query": QUERY, "documents": DOCS, "property": ""}).encode()
        r = s.client().request("POST", "/rerank", body)
        assert r.status == 200
        assert [x["score"] for x in r.json()["scores"]] == [relevance(QUERY, d) for d in DOCS]
        assert [q.path for q in other.requests][-1] == "/v2/rerank"


def test_fallbacks_must_score_with_the_same_model():
    from fakebackend import FakePlugin
    from vecshim.app import create_app
    cfg = fake_config()
    cfg["rerankers"] = {"a": {"backend": "cohere", "fallbacks": ["b"], "options": {"base_url": "http://x"}},
                        "b": {"backend": "cohere", "options": {"base_url": "http://y", "model": "rerank-other"}}}
    with pytest.raises(ConfigError, match="rerankers.a.fallbacks: 'b' scores with a different model"):
        create_app(cfg, plugins=[FakePlugin()], load_entrypoints=False, load=False)
