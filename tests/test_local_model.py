"""The bundled all-MiniLM-L6-v2 through the whole stack, compared to sentence-transformers."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from conftest import REFERENCE_TEXTS, cos, vecshim_serve
from goclient import GoClient, vec_request

pytestmark = pytest.mark.slow

TEXTS = REFERENCE_TEXTS


def test_vectors_match_sentence_transformers(minilm, st_model):
    c = minilm.client()
    ref = st_model.encode(TEXTS)
    for text, expect in zip(TEXTS, ref):
        for task in ("passage", "query"):
            r = c.vectors(text, task_type=task)
            assert r.status == 200
            assert r.json()["dims"] == 384
            assert cos(r.json()["vector"], expect) >= 0.9999


def test_meta_of_the_default_model(minilm):
    m = minilm.client().request("GET", "/meta").json()["model"]
    assert m["backend"] == "sentence-transformers" and m["dimension"] == 384
    assert m["model"]["model"] == "sentence-transformers/all-MiniLM-L6-v2" and m["model"]["bundled"] is True
    assert m["max_input_tokens"] == 254 and m["normalized"] is True and m["long_text"] == "chunk_mean"


def test_long_text_is_mean_of_token_windows(minilm, st_model):
    text = " ".join(f"sentence number {i} talks about topic {i % 13} in some detail." for i in range(120))
    r = minilm.client().vectors(text)
    assert r.status == 200
    backend = minilm.state.models["minilm"].backend
    windows = backend.split_text(text, backend.max_input_tokens)
    assert len(windows) > 2
    counts = backend.count_tokens(windows)
    assert max(counts) <= backend.max_input_tokens
    vecs = st_model.encode(windows)
    mean = (vecs * np.asarray(counts)[:, None]).sum(0)
    assert cos(r.json()["vector"], mean) >= 0.9999
    assert abs(np.linalg.norm(r.json()["vector"]) - 1) < 1e-5
    # truncation by the model alone would give the first window's vector, which differs
    assert cos(r.json()["vector"], vecs[0]) < 0.999


def test_concurrent_clients_get_their_own_vectors(minilm, st_model):
    texts = [f"request {i}: " + "word " * (i % 40) + "end" for i in range(96)]
    ref = st_model.encode(texts)
    bad = []

    def worker(k):
        c = minilm.client()
        for i in range(k, len(texts), 16):
            r = c.vectors(texts[i])
            if r.status != 200 or cos(r.json()["vector"], ref[i]) < 0.9999:
                bad.append(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_real_gunicorn_serve_without_config(tmp_path, st_model):
    with vecshim_serve(log_path=tmp_path / "serve.log") as (proc, port):
        c = GoClient("127.0.0.1", port)
        r = c.request("POST", "/vectors", vec_request(TEXTS[0]))
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        assert cos(r.json()["vector"], st_model.encode(TEXTS[0])) >= 0.9999
        assert c.request("GET", "/.well-known/live").status == 204
        assert json.loads(c.request("GET", "/meta").body)["model"]["dimension"] == 384
        assert c.request("POST", "/vectors", b"{bad").status == 400
        assert c.request("POST", "/vectors", vec_request("still alive")).status == 200
        assert r.headers.get("connection", "keep-alive").lower() != "close"
