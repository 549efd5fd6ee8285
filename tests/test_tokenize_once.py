"""Tokenize once: the ONNX encoder reuses the encodings that counted the texts (issue 18)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import REFERENCE_TEXTS, Served, cos
from vecshim.app import create_app
from vecshim.backends.local import SentenceTransformersBackend as B
from vecshim.backends.onnx_light import STORE_TEXTS, STORE_TOKENS, TokenStore
from vecshim.backends.runtimes import CHECK_TEXTS

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")

TEXTS = list(dict.fromkeys([*REFERENCE_TEXTS, *CHECK_TEXTS, "", " ", "[CLS] literal special tokens [SEP] [PAD]",
         "word " * 700, "🙂" * 40, "tab\tand\nnewline", *(f"text number {i} " * (i % 9 + 1) for i in range(40))]))


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("onnx-cache"))
    B(B.Options(runtime="onnx", onnx_cache_dir=cache)).load()  # exports; the next load is light
    b = B(B.Options(runtime="onnx", onnx_cache_dir=cache))
    b.load()
    assert b._light is not None and b._check["torch_equivalent"]
    return b


def reference_features(backend, texts):
    """What the encoder was fed before tokenize-once: its own tokenizer's padded batch."""
    from tokenizers import Tokenizer

    light = backend._light
    tok = Tokenizer.from_file(str(Path(backend._check["cache"]) / "tokenizer.json"))
    tok.enable_truncation(light.max_seq_length)
    tok.enable_padding(pad_id=light.manifest["pad_id"], pad_token=light.manifest["pad_token"])
    enc = tok.encode_batch(texts)
    return {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
            "token_type_ids": [e.type_ids for e in enc]}


@pytest.mark.parametrize("size", [1, 3, 8, 16])
def test_counted_encodings_are_exactly_what_the_encoder_tokenizer_makes(backend, size):
    light = backend._light
    for i in range(0, len(TEXTS), size):
        chunk = TEXTS[i:i + size]
        ref = reference_features(backend, chunk)
        hits = light.store.hits
        backend.count_tokens(chunk[::2])  # half reused, half tokenized in encode
        feats = light.features(chunk)
        for key, want in ref.items():
            assert feats[key].tolist() == want, key
        assert light.store.hits - hits == len(chunk[::2])


def test_served_batches_reuse_the_counting_tokens_and_vectors_match_torch(backend, st_model):
    light = backend._light
    hits = light.store.hits
    counts = backend.count_tokens(TEXTS)
    vecs = np.asarray(backend.embed(TEXTS, "passage"))
    assert light.store.hits - hits == len(TEXTS)
    assert len(light.store) == 0 and light.store.tokens == 0  # taken, not kept
    want = st_model.encode(TEXTS, convert_to_numpy=True)
    assert min(cos(a, b) for a, b in zip(vecs, want)) >= 0.99999
    assert counts[TEXTS.index("short")] == 1


def test_the_http_path_encodes_the_tokens_it_counted(backend, st_model):
    cfg = {"models": {"minilm": {"backend": "sentence-transformers",
                                 "options": {"runtime": "onnx", "onnx_cache_dir": str(Path(backend._check["cache"]).parent)}}},
           "cache": {"enabled": False}}
    s = Served(create_app(cfg, load_entrypoints=False))
    try:
        assert s.state.wait_ready(120), s.state.not_ready_reason()
        light = s.state.get_model("minilm").backend._light
        assert light is not None
        hits = light.store.hits
        texts = [f"Weaviate object {i}: a ferris wheel on the South Bank" for i in range(12)]
        got = [s.client().vectors(t).json()["vector"] for t in texts]
        assert light.store.hits - hits == len(texts)
        want = st_model.encode(texts, convert_to_numpy=True)
        assert min(cos(a, b) for a, b in zip(got, want)) >= 0.99999
    finally:
        s.close()


def test_a_flood_of_unique_texts_never_encoded_stays_bounded(backend):
    light = backend._light
    for i in range(0, 3 * STORE_TEXTS, 512):
        backend.count_tokens([f"unique text {j} that is counted and then refused" for j in range(i, i + 512)])
        assert len(light.store) <= STORE_TEXTS and light.store.tokens <= STORE_TOKENS
    assert len(light.store) == STORE_TEXTS  # the newest are kept
    backend.count_tokens(["long " * 4000] * 40)  # 40 x 4,000 tokens: the token bound applies
    assert light.store.tokens <= STORE_TOKENS
    assert np.asarray(backend.embed(["unique text 3 that is counted and then refused"], "passage")).shape == (1, 384)


def test_store_bounds_by_texts_and_tokens_oldest_out():
    class Enc:
        def __init__(self, n):
            self.ids = [0] * n

    store = TokenStore(max_texts=3, max_tokens=10)
    store.put(["a", "b", "c", "d"], [Enc(1), Enc(1), Enc(1), Enc(1)])
    assert len(store) == 3 and store.take("a") is None and store.take("d") is not None
    store.put(["e", "f"], [Enc(6), Enc(5)])  # 1 + 1 + 6 + 5 > 10: the oldest go first
    assert store.tokens <= 10 and store.take("f") is not None and store.take("b") is None
    store.put(["huge"], [Enc(11)])  # larger than the whole store: not kept
    assert store.take("huge") is None and store.tokens <= 10


def test_a_prompt_added_after_counting_is_tokenized_with_the_text(backend):
    light = backend._light
    texts = ["prompted text one about harbours", "prompted text two about ferries"]
    backend.count_tokens(texts)
    hits = light.store.hits
    prompted = light.encode(texts, prompt="query: ")
    assert light.store.hits == hits  # the counted (prompt-less) encodings are not what the encoder reads
    want = light.encode(["query: " + t for t in texts])
    plain = light.encode(texts)
    assert min(cos(a, b) for a, b in zip(prompted, want)) >= 0.99999
    assert max(cos(a, b) for a, b in zip(prompted, plain)) < 0.9999
