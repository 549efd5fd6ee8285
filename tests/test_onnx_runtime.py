"""ONNX runtimes of the local backend (issue 10): vectors, fingerprints, cache, missing extra, /meta."""
from __future__ import annotations

import json

import pytest

from conftest import REFERENCE_TEXTS, Served, cos
from vecshim.app import create_app
from vecshim.backends.local import SentenceTransformersBackend
from vecshim.errors import ConfigError

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")

TEXTS = REFERENCE_TEXTS


def config(runtime: str, cache) -> dict:
    return {"models": {"minilm": {"backend": "sentence-transformers",
                                  "options": {"runtime": runtime, "onnx_cache_dir": str(cache)}}},
            "cache": {"enabled": False}}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def served(cache_dir):
    """torch, onnx and onnx-int8 served side by side (onnx and int8 exported into cache_dir)."""
    apps = {}
    for rt in ("torch", "onnx", "onnx-int8"):
        s = Served(create_app(config(rt, cache_dir), load_entrypoints=False))
        assert s.state.wait_ready(120), s.state.not_ready_reason()
        apps[rt] = s
    yield apps
    for s in apps.values():
        s.close()


def meta(s) -> dict:
    return s.client().request("GET", "/meta").json()["model"]


def test_onnx_vectors_match_torch_over_http(served, st_model):
    ref = st_model.encode(TEXTS)
    c = served["onnx"].client()
    for text, expect in zip(TEXTS, ref):
        for task in ("passage", "query"):
            r = c.vectors(text, task_type=task)
            assert r.status == 200 and r.json()["dims"] == 384
            assert cos(r.json()["vector"], expect) >= 0.9999


def test_int8_vectors_are_close_but_not_the_same_space(served, st_model):
    ref = st_model.encode(TEXTS)
    c = served["onnx-int8"].client()
    got = [cos(c.vectors(t).json()["vector"], e) for t, e in zip(TEXTS, ref)]
    assert min(got) > 0.9 and min(got) < 0.9999


def test_fingerprints_tell_runtimes_apart(served):
    fp = {rt: meta(s)["fingerprint"] for rt, s in served.items()}
    assert fp["onnx"] == fp["torch"]  # passed its check set: same vector space
    assert fp["onnx-int8"] != fp["torch"]


def test_meta_shows_runtime_and_check(served):
    m = {rt: meta(s)["model"] for rt, s in served.items()}
    assert m["torch"]["runtime"] == "torch" and "runtime_check" not in m["torch"]
    assert m["onnx"]["runtime"] == "onnx" and m["onnx"]["vector_space"] == "torch"
    assert m["onnx"]["runtime_check"]["torch_equivalent"] is True
    assert m["onnx"]["runtime_check"]["min_cosine_vs_torch"] >= 0.9999
    assert m["onnx-int8"]["runtime"] == "onnx-int8" and m["onnx-int8"]["vector_space"] == "onnx-int8"
    assert m["onnx-int8"]["runtime_check"]["torch_equivalent"] is False


def test_cache_is_reused_not_exported_again(served, cache_dir):
    exports = sorted(p for p in cache_dir.iterdir())
    assert len(exports) == 2  # one per ONNX runtime
    assert not [p for p in exports if p.name.startswith(".")]  # no temp folder left behind
    mtimes = {p: (p / "model.onnx").stat().st_mtime_ns for p in exports}
    s = Served(create_app(config("onnx", cache_dir), load_entrypoints=False))
    try:
        assert s.state.wait_ready(60), s.state.not_ready_reason()
    finally:
        s.close()
    assert {p: (p / "model.onnx").stat().st_mtime_ns for p in exports} == mtimes
    assert sorted(cache_dir.iterdir()) == exports
    # How fast a cached start is belongs to bench/runtimes.py (bench/RESULTS.md), not to a test.


def test_missing_extra_names_the_pip_command():
    class NoOnnx(SentenceTransformersBackend):
        runtime_modules = {**SentenceTransformersBackend.runtime_modules,
                           "onnx": ("vecshim_no_such_module_onnxruntime",)}

    with pytest.raises(ConfigError) as err:
        NoOnnx(NoOnnx.Options(runtime="onnx"))
    assert str(err.value) == ("backend 'sentence-transformers' runtime 'onnx' needs: "
                              "pip install 'vecshim[onnx]'")
    # auto quietly keeps torch when the extra is missing
    assert NoOnnx(NoOnnx.Options()).runtime == "torch"


def test_concurrent_exports_publish_one_folder(tmp_path, st_model):
    """Two processes (like two gunicorn workers) exporting into one empty cache leave one entry."""
    import subprocess
    import sys

    code = ("import sys, json; from vecshim.backends.local import SentenceTransformersBackend as B; "
            "b = B(B.Options(runtime='onnx', onnx_cache_dir=sys.argv[1])); b.concurrency = 1; b.load(); "
            "print(json.dumps([float(x) for x in b.embed(['hello'], 'passage')[0]]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert len(list(tmp_path.iterdir())) == 1
    ref = st_model.encode("hello")
    for out, _ in outs:
        assert cos(json.loads(out.strip().splitlines()[-1]), ref) >= 0.9999


LIGHT_PROBE = r"""
import json, sys
from vecshim.app import create_app
app = create_app(json.loads(sys.argv[1]), load_entrypoints=False)
state = app.extensions["vecshim"]
assert state.wait_ready(60), state.not_ready_reason()
model = state.models["minilm"]
texts = json.loads(sys.argv[2])
# One text per call, as the sequential HTTP requests below are: onnx-int8 quantises
# activations per call, so its vectors shift slightly with their batch mates.
vectors = [model.embed([t], task)[0] for task in ("query", "passage") for t in texts]
print(json.dumps({"torch": "torch" in sys.modules, "st": "sentence_transformers" in sys.modules,
                  "light": model.backend._light is not None, "fingerprint": model.fingerprint,
                  "check": model.backend._check["min_cosine_vs_torch"],
                  "vectors": [v.tolist() for v in vectors]}))
state.close()
"""


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_cached_export_loads_without_torch_and_gives_the_same_vectors(served, cache_dir, runtime):
    """A restart with the export cached never imports torch or sentence-transformers."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LIGHT_PROBE, json.dumps(config(runtime, cache_dir)),
                           json.dumps(TEXTS)], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["light"] and not out["torch"] and not out["st"]
    # The same vectors and the same fingerprint as the process that exported with torch.
    assert out["fingerprint"] == meta(served[runtime])["fingerprint"]
    assert out["check"] == meta(served[runtime])["model"]["runtime_check"]["min_cosine_vs_torch"]
    c = served[runtime].client()
    for i, text in enumerate(TEXTS):
        for j, task in enumerate(("query", "passage")):
            want = c.vectors(text, task_type=task).json()["vector"]
            assert cos(out["vectors"][j * len(TEXTS) + i], want) >= 0.99999


def test_fp32_export_traces_eager_attention_and_keeps_torch_vectors(served, cache_dir, st_model):
    """fp32 `onnx` is traced from eager attention (no sdpa mask ops), its vectors are still
    torch's, and the torch model goes back to its own attention after an export."""
    import onnx

    from vecshim.backends.runtimes import CHECK_TEXTS, _export_fp32

    folder = served["onnx"].state.get_model("minilm").backend._check["cache"]
    ops = {n.op_type for n in onnx.load(f"{folder}/model.onnx").graph.node}
    int8_folder = served["onnx-int8"].state.get_model("minilm").backend._check["cache"]
    int8_ops = {n.op_type for n in onnx.load(f"{int8_folder}/model.onnx").graph.node}
    assert "IsNaN" not in ops and "IsNaN" in int8_ops  # int8 keeps the sdpa trace (its vectors unchanged)
    assert meta(served["onnx"])["model"]["runtime_check"]["min_cosine_vs_torch"] >= 0.99999
    auto = st_model[0].auto_model
    own = auto.config._attn_implementation
    before = st_model.encode(list(CHECK_TEXTS[:4]))
    _export_fp32(st_model, cache_dir / "probe.onnx", eager=True)
    assert auto.config._attn_implementation == own
    after = st_model.encode(list(CHECK_TEXTS[:4]))
    assert min(cos(a, b) for a, b in zip(before, after)) >= 0.999999
