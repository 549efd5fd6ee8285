"""Vector-space integrity: a served vector is the configured model's vector, or an error.

Each case here served a wrong vector (or refused a right one) before the
fingerprint covered the backend's name and plugin, caches were checked and
the dimension was learnt from a check set.
"""
from __future__ import annotations

import struct
import time
import tracemalloc

import numpy as np
import pytest
import redis

from conftest import fake_config
from fakebackend import FakeBackend, FakePlugin, fake_vector
from redisserver import RedisServer
from vecshim import Backend, ConfigError, hookimpl
from vecshim.app import create_app
from vecshim.cache import MemoryCache, cache_key, encode_value
from vecshim.space import space_id


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def cached(cfg: dict, redis_url: str | None = None) -> dict:
    cfg["cache"] = {"memory_items": 1000, "redis_url": redis_url}
    return cfg


def metric(served, name: str, **labels) -> float:
    """A sample's value from the real /metrics endpoint (0 if absent)."""
    text = served.client().request("GET", "/metrics").body.decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- identity -------------------------------------------------------------------

class _Twin(Backend):
    """A backend whose identity (info) is the same as its twin's; only its name differs."""

    def info(self):
        return {"model": "twin", "dim": 8}

    def embed(self, texts, task):
        return np.stack([fake_vector(f"{self.name}|{t}", "passage", 8) for t in texts])


class TwinA(_Twin):
    name = "twin-a"


class TwinB(_Twin):
    name = "twin-b"


class Twins:
    @hookimpl
    def register_backends(self, register):
        register(TwinA)
        register(TwinB)


def twin_config(backend: str, redis_url: str | None = None) -> dict:
    return cached({"models": {"m": {"backend": backend}}}, redis_url)


def test_two_plugins_differing_only_in_name_never_share_a_memory_entry(serve):
    s = serve(cached({"models": {"a": {"backend": "twin-a"}, "b": {"backend": "twin-b"}}}), plugins=[Twins()])
    c = s.client()
    va = c.request("POST", "/models/a/vectors", b'{"text":"same text"}').json()["vector"]
    vb = c.request("POST", "/models/b/vectors", b'{"text":"same text"}').json()["vector"]
    assert np.allclose(va, fake_vector("twin-a|same text", "passage", 8), atol=1e-7)
    assert np.allclose(vb, fake_vector("twin-b|same text", "passage", 8), atol=1e-7)
    meta = c.request("GET", "/meta").json()["models"]
    assert meta["a"]["fingerprint"] != meta["b"]["fingerprint"]


def test_two_plugins_differing_only_in_name_never_share_a_redis_entry(serve, redis_server):
    a = serve(twin_config("twin-a", redis_server.url), plugins=[Twins()])
    b = serve(twin_config("twin-b", redis_server.url), plugins=[Twins()])
    va = a.client().vectors("shared text").json()["vector"]
    vb = b.client().vectors("shared text").json()["vector"]
    assert np.allclose(va, fake_vector("twin-a|shared text", "passage", 8), atol=1e-7)
    assert np.allclose(vb, fake_vector("twin-b|shared text", "passage", 8), atol=1e-7)
    r = redis.Redis.from_url(redis_server.url)
    assert len(r.keys("vecshim:*")) == 2
    r.close()


def test_fallback_between_plugins_differing_only_in_name_is_refused():
    cfg = {"models": {"a": {"backend": "twin-a", "fallbacks": ["b"]}, "b": {"backend": "twin-b"}}}
    with pytest.raises(ConfigError) as info:
        create_app(cfg, plugins=[Twins()], load_entrypoints=False, load=False)
    assert 'models.a.fallbacks: fallback b: backend_name "twin-b" \u2260 "twin-a"' in info.value.message


class Anonymous(Backend):
    """Keeps info() at its default {}: nothing says which model it serves."""

    name = "anonymous"

    def embed(self, texts, task):
        return [[1.0, 0.0] for _ in texts]


class AnonymousPlugin:
    @hookimpl
    def register_backends(self, register):
        register(Anonymous)


def test_backend_with_empty_identity_is_a_config_error_at_start():
    with pytest.raises(ConfigError) as info:
        create_app({"models": {"m": {"backend": "anonymous"}}}, plugins=[AnonymousPlugin()],
                   load_entrypoints=False, load=False)
    assert info.value.message == ("models.m: backend 'anonymous' must say which model it serves: implement "
                                  "info() or fingerprint_parts() (model id, revision, options that change "
                                  "the vectors)")


class VersionedFakePlugin(FakePlugin):
    """The same backend class, registered by a plugin of another version."""

    __version__ = "2.0"


def test_the_registering_plugin_and_its_version_are_part_of_the_fingerprint():
    apps = [create_app(fake_config(), plugins=[p], load_entrypoints=False, load=False)
            for p in (FakePlugin(), VersionedFakePlugin(), FakePlugin())]
    models = [a.extensions["vecshim"].models["fake"] for a in apps]
    assert models[0].origin == {"plugin": "fakebackend.FakePlugin", "distribution": None, "version": None}
    assert models[1].origin["version"] == "2.0"
    assert models[0].fingerprint == models[2].fingerprint  # stable across app instances (no id())
    assert models[0].fingerprint != models[1].fingerprint


def test_builtin_backend_origin_is_the_vecshim_distribution():
    from vecshim import __version__
    app = create_app({}, load_entrypoints=False, load=False)
    assert app.extensions["vecshim"].models["minilm"].origin == {
        "plugin": "vecshim.backends.local", "distribution": "vecshim", "version": __version__}


# -- dimension ------------------------------------------------------------------

def test_backend_wrong_only_for_long_texts_is_kept_out_of_ready(serve):
    s = serve(fake_config(bad_length_over_words=40), wait=False)
    m = s.state.models["fake"]
    assert not s.state.wait_ready(5)
    c = s.client()
    r = c.request("GET", "/.well-known/ready")
    assert r.status == 503
    reason = r.json()["error"]
    assert "15 (long)" in reason and "16 (short, multilingual)" in reason, reason
    meta = c.request("GET", "/meta").json()["model"]
    assert meta["state"] == "failed" and "15 (long)" in meta["error"]
    assert c.vectors("a short text").status == 503  # never served on a guessed dimension
    assert m.dimension is None


def test_declared_dimension_is_checked_at_load(serve):
    s = serve(fake_config(declare_dim=32), wait=False)
    assert not s.state.wait_ready(5)
    reason = s.client().request("GET", "/.well-known/ready").json()["error"]
    assert "declares dimension 32 but returned vectors of length 16 (short)" in reason


def test_declared_dimension_needs_one_check_call(serve):
    s = serve(fake_config(declare_dim=16))
    m = s.state.models["fake"]
    assert m.dimension == 16 and len(m.backend.calls) == 1
    undeclared = serve(fake_config())
    calls = [texts for texts, _ in undeclared.state.models["fake"].backend.calls]
    assert len(calls) == 3 and all(len(t) == 1 for t in calls)  # short, long, multilingual: one call each


def test_long_check_text_fits_the_backend_limit(serve):
    s = serve(fake_config(max_input_tokens=12))
    lengths = [len(t.split()) for texts, _ in s.state.models["fake"].backend.calls for t in texts]
    assert max(lengths) <= 12


def test_task_aware_set_in_load_is_honoured(serve):
    s = serve(fake_config(task_aware_in_load=True))
    c = s.client()
    q = c.vectors("what is a ferris wheel", task_type="query").json()["vector"]
    p = c.vectors("what is a ferris wheel", task_type="passage").json()["vector"]
    assert np.allclose(q, fake_vector("what is a ferris wheel", "query", 16), atol=1e-7)
    assert np.allclose(p, fake_vector("what is a ferris wheel", "passage", 16), atol=1e-7)
    assert c.request("GET", "/meta").json()["model"]["task_aware"] is True


# -- caches are checked, not trusted --------------------------------------------

def _key(served, text: str, dims: int | None = None, pooling: str | None = None) -> bytes:
    m = served.state.models["fake"]
    return cache_key(space_id(m.fingerprint, pooling), None, dims, text)


BAD_VALUES = {
    "short": struct.pack("<3f", 1e30, 2.0, float("nan")),  # 12 bytes: the value once served as-is
    "non_finite": lambda sid: encode_value(sid, np.full(16, np.nan, dtype=np.float32)),
    "length": lambda sid: encode_value(sid, np.ones(15, dtype=np.float32)),
    "space": lambda sid: encode_value("0123456789abcdef", np.ones(16, dtype=np.float32) / 4),
    "format": b"\x00" * (32 + 64),
}


@pytest.mark.parametrize("reason", sorted(BAD_VALUES))
def test_bad_redis_value_is_rejected_counted_and_recomputed(serve, redis_server, reason):
    s = serve(cached(fake_config(), redis_server.url))
    key = _key(s, "poisoned")
    bad = BAD_VALUES[reason]
    r = redis.Redis.from_url(redis_server.url)
    r.set(key, bad if isinstance(bad, bytes) else bad(s.state.models["fake"].fingerprint))
    reply = s.client().vectors("poisoned")
    assert reply.status == 200
    body = reply.json()
    assert body["dims"] == 16 and np.allclose(body["vector"], fake_vector("poisoned", "passage", 16), atol=1e-7)
    assert "poisoned" in [t for texts, _ in s.state.models["fake"].backend.calls for t in texts]
    assert metric(s, "vecshim_cache_rejected_total", reason=reason) == 1
    fixed = r.get(key)  # overwritten with a checked value for this model
    assert len(fixed) == 32 + 16 * 4 and fixed.startswith(b"vecshim2")
    r.close()


def test_redis_value_records_space_dimension_and_dtype(serve, redis_server):
    s = serve(cached(fake_config(), redis_server.url))
    s.client().vectors("labelled")
    r = redis.Redis.from_url(redis_server.url)
    raw = r.get(_key(s, "labelled"))
    r.close()
    magic, sid, dim, dtype = struct.unpack_from("<8s16sI4s", raw)
    assert (magic, sid.decode(), dim, dtype) == (b"vecshim2", s.state.models["fake"].fingerprint, 16, b"<f4\x00")
    assert np.array_equal(np.frombuffer(raw, "<f4", offset=32), fake_vector("labelled", "passage", 16))


def test_memory_cache_owns_its_rows_and_retains_no_more_than_its_bound():
    dim, rows, batches = 384, 256, 300
    bound = 200 * dim * 4  # 200 vectors' worth
    cache = MemoryCache(max_items=100_000, max_bytes=bound)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for b in range(batches):
            matrix = np.random.default_rng(b).standard_normal((rows, dim)).astype(np.float32)
            cache.set_many([(f"{b}".encode(), matrix[b % rows])])  # one row view per batch
            del matrix
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # Keys, dict slots and array headers add a few hundred bytes a vector; a row view
    # would instead pin its whole 384 KB batch: 200 of them, about 250x the bound.
    assert retained <= 2 * bound, (retained, bound)
    held = cache.get_many(list(cache._data))
    assert len(held) == 200 and all(v.base is None and v.flags.owndata for v in held)
    assert cache.nbytes == sum(v.nbytes for v in held) <= bound


# -- dimensions -------------------------------------------------------------------

def test_dimensions_truncate_any_model_and_key_the_cache_by_size(serve, redis_server):
    s = serve(cached(fake_config(), redis_server.url))
    c = s.client()
    short = c.vectors("sized", dimensions=8).json()["vector"]
    full = c.vectors("sized").json()["vector"]
    again = c.vectors("sized", dimensions=8).json()["vector"]
    ref = fake_vector("sized", "passage", 16)
    assert len(full) == 16 and np.allclose(full, ref, atol=1e-7)
    assert len(short) == 8 and np.allclose(short, ref[:8] / np.linalg.norm(ref[:8]), atol=1e-6)
    assert again == short
    r = redis.Redis.from_url(redis_server.url)
    assert struct.unpack_from("<8s16sI", r.get(_key(s, "sized", dims=8)))[2] == 8
    assert struct.unpack_from("<8s16sI", r.get(_key(s, "sized")))[2] == 16
    r.close()
    info = c.request("GET", "/meta").json()["model"]
    assert info["matryoshka"] is False and info["dimensions"] == "truncate"


# -- pooling_strategy ---------------------------------------------------------------

@pytest.mark.parametrize("value", [b"1", b"true", b"[\"cls\"]", b"{\"mode\":\"cls\"}"])
def test_pooling_strategy_of_the_wrong_json_type_is_400(serve, value):
    s = serve(fake_config())
    r = s.client().request("POST", "/vectors", b'{"text":"x","config":{"pooling_strategy":' + value + b"}}")
    assert r.status == 400
    assert "pooling_strategy must be a string" in r.json()["error"]


def test_fixed_pooling_backend_accepts_weaviates_default_and_names_it_otherwise(serve):
    s = serve(fake_config())
    c = s.client()
    assert c.vectors("x", pooling="masked_mean").status == 200
    r = c.vectors("x", pooling="cls")
    assert r.status == 400
    assert "supported: masked_mean" in r.json()["error"]


def test_pooling_is_honoured_and_cached_apart(serve, redis_server):
    s = serve(cached(fake_config(poolings=["masked_mean", "cls"]), redis_server.url))
    c = s.client()
    mean = c.vectors("pooled", pooling="masked_mean").json()["vector"]
    cls = c.vectors("pooled", pooling="cls").json()["vector"]
    assert np.allclose(mean, fake_vector("pooled", "passage", 16), atol=1e-7)
    assert np.allclose(cls, fake_vector("cls|pooled", "passage", 16), atol=1e-7)
    assert c.vectors("pooled", pooling="cls").json()["vector"] == cls  # from its own cache entry
    r = c.vectors("pooled", pooling="max")
    assert r.status == 400 and "supported: masked_mean, cls" in r.json()["error"]
    rd = redis.Redis.from_url(redis_server.url)
    assert rd.get(_key(s, "pooled", pooling="cls")) is not None
    rd.close()


# -- fallbacks ------------------------------------------------------------------------

def test_fallback_whose_dimension_is_known_from_config_names_the_key():
    cfg = fake_config(declare_dim=16, dim=16)
    cfg["models"]["b"] = {"backend": "fake", "options": {"dim": 8, "declare_dim": 8}}
    cfg["models"]["fake"]["fallbacks"] = ["b"]
    with pytest.raises(ConfigError) as info:
        create_app(cfg, plugins=[FakePlugin()], load_entrypoints=False, load=False)
    assert "models.fake.fallbacks: fallback b: " in info.value.message
    assert "dimension 8 \u2260 16" in info.value.message


class Unstated(FakeBackend):
    """Its identity leaves the vector length out: only loading shows it."""

    name = "unstated"

    def info(self):
        return {"model": "unstated"}


class UnstatedPlugin:
    @hookimpl
    def register_backends(self, register):
        register(Unstated)


def test_fallback_dropped_at_start_is_listed_in_meta_with_the_reason(serve):
    cfg = {"models": {"main": {"backend": "unstated", "options": {"dim": 16}, "fallbacks": ["spare"]},
                      "spare": {"backend": "unstated", "options": {"dim": 8}}},
           "cache": {"enabled": False}}
    s = serve(cfg, plugins=[UnstatedPlugin()])  # config alone cannot tell them apart
    deadline = time.monotonic() + 10
    while not s.state.models["main"].dropped_fallbacks and time.monotonic() < deadline:
        time.sleep(0.05)  # the loader compares fallbacks once every model is up
    meta = s.client().request("GET", "/meta").json()["models"]["main"]
    assert meta["fallbacks"] == []
    assert meta["fallbacks_dropped"] == [{"name": "spare",
                                          "reason": "different vector space: dimension 8 \u2260 16"}]


def test_config_check_names_the_differing_key_of_a_fallback(tmp_path):
    from test_cli import run

    path = tmp_path / "fallbacks.yaml"
    path.write_text("plugins: {entrypoints: false}\n"
                    "models:\n"
                    "  e5-a: {backend: openai, options: {model: e5, base_url: 'http://127.0.0.1:9/v1', dimensions: 384},"
                    " fallbacks: [e5-b]}\n"
                    "  e5-b: {backend: openai, options: {model: e5, base_url: 'http://127.0.0.1:9/v1', dimensions: 768}}\n")
    proc = run("config", "check", str(path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "models.e5-a.fallbacks.0: fallback e5-b: " in proc.stderr
    assert "dimension 768 \u2260 384" in proc.stderr and "{" not in proc.stderr


def test_config_check_reports_an_empty_backend_identity(tmp_path):
    from test_cli import run

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "anon.py").write_text(
        "from vecshim import Backend, hookimpl\n\n\n"
        "class Anonymous(Backend):\n    name = 'anonymous'\n\n"
        "    def embed(self, texts, task):\n        return [[1.0, 0.0] for _ in texts]\n\n\n"
        "@hookimpl\ndef register_backends(register):\n    register(Anonymous)\n")
    path = tmp_path / "anon.yaml"
    path.write_text("plugins: {dirs: [plugins], entrypoints: false}\nmodels:\n  m: {backend: anonymous}\n")
    proc = run("config", "check", str(path))
    assert proc.returncode == 2
    assert "models.m: backend 'anonymous' must say which model it serves" in proc.stderr


@pytest.mark.parametrize("opts, said", [
    ({}, "not Matryoshka-trained: dimensions below it are truncated and renormalised"),
    ({"dimensions": "strict"}, "not Matryoshka-trained: dimensions: strict"),
    ({"matryoshka": True}, "(Matryoshka-trained)"),
])
def test_the_start_log_and_meta_say_whether_the_model_is_matryoshka_trained(serve, caplog, opts, said):
    with caplog.at_level("INFO", logger="vecshim.model"):
        s = serve(fake_config(**opts))
    assert any("model 'fake' ready" in r.getMessage() and said in r.getMessage() for r in caplog.records)
    assert s.client().request("GET", "/meta").json()["model"]["matryoshka"] is bool(opts.get("matryoshka"))
