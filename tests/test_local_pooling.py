"""`pooling_strategy` and `dimensions` on the bundled model, against sentence-transformers itself."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REFERENCE_TEXTS, Served, cos
from vecshim.app import create_app

pytestmark = pytest.mark.slow


def st_cls(st_model, texts):
    """CLS pooling computed from sentence-transformers' own token embeddings, then unit length."""
    out = []
    for tokens in st_model.encode(list(texts), output_value="token_embeddings"):
        v = tokens[0].float().numpy() if hasattr(tokens, "float") else np.asarray(tokens[0])
        out.append(v / np.linalg.norm(v))
    return out


@pytest.fixture(scope="module")
def torch_minilm():
    """The bundled model on the torch runtime (the session `minilm` may run ONNX)."""
    app = create_app({"models": {"t": {"backend": "sentence-transformers", "options": {"runtime": "torch"}}}},
                     load_entrypoints=False)
    s = Served(app)
    assert s.state.wait_ready(180), s.state.not_ready_reason()
    yield s
    s.close()


@pytest.mark.parametrize("which", ["minilm", "torch_minilm"])
def test_cls_and_masked_mean_are_honoured(request, which, st_model):
    served = request.getfixturevalue(which)
    c = served.client()
    mean_ref = st_model.encode(REFERENCE_TEXTS)
    cls_ref = st_cls(st_model, REFERENCE_TEXTS)
    for text, m_ref, c_ref in zip(REFERENCE_TEXTS, mean_ref, cls_ref):
        mean = c.vectors(text, pooling="masked_mean").json()["vector"]
        cls = c.vectors(text, pooling="cls").json()["vector"]
        default = c.vectors(text, pooling=None).json()["vector"]
        assert cos(mean, m_ref) >= 0.9999 and default == mean
        assert cos(cls, c_ref) >= 0.9999, text
        assert cos(cls, mean) < 0.99  # a different vector, not the mean served again
    info = c.request("GET", "/meta").json()["model"]
    assert info["pooling_strategies"] == ["masked_mean", "cls"]
    r = c.vectors("x", pooling="max")
    assert r.status == 400 and "supported: masked_mean, cls" in r.json()["error"]


def test_dimensions_follow_sentence_transformers_truncate_dim(minilm, st_model):
    c = minilm.client()
    text = REFERENCE_TEXTS[0]
    for dims in (256, 128):
        ref = st_model.encode([text], truncate_dim=dims, normalize_embeddings=True)[0]
        body = c.vectors(text, dimensions=dims).json()
        assert body["dims"] == dims and len(body["vector"]) == dims
        assert cos(body["vector"], ref) >= 0.9999
        assert abs(np.linalg.norm(body["vector"]) - 1) < 1e-5
    info = c.request("GET", "/meta").json()["model"]
    assert info["matryoshka"] is False and info["dimensions"] == "truncate"
