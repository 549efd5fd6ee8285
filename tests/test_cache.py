"""Vector caches: in-process LRU and a real shared redis-server."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import redis

from conftest import fake_config
from fakebackend import fake_vector
from redisserver import RedisServer
from vecshim.cache import MemoryCache, cache_key


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def cached_config(redis_url=None, **opts):
    cfg = fake_config(**opts)
    cfg["cache"] = {"memory_items": 1000, "redis_url": redis_url}
    return cfg


def backend_texts(served):
    return [t for texts, _ in served.state.models["fake"].backend.calls for t in texts]


def test_memory_lru_is_bounded_by_items_and_bytes():
    c = MemoryCache(max_items=3, max_bytes=10_000)
    vec = np.zeros(4, dtype=np.float32)
    c.set_many([(b"a", vec), (b"b", vec), (b"c", vec)])
    c.get_many([b"a"])  # a is now the most recent
    c.set_many([(b"d", vec)])
    assert [v is not None for v in c.get_many([b"a", b"b", b"c", b"d"])] == [True, False, True, True]
    small = MemoryCache(max_items=100, max_bytes=3 * vec.nbytes)
    small.set_many([(bytes([i]), vec) for i in range(10)])
    assert len(small) == 3


def test_cache_key_separates_fingerprint_task_dimensions_and_text():
    base = cache_key("fp", "query", None, "text")
    assert base != cache_key("fp2", "query", None, "text")
    assert base != cache_key("fp", "passage", None, "text")
    assert base != cache_key("fp", "query", 128, "text")
    assert base != cache_key("fp", "query", None, "text ")
    assert base == cache_key("fp", "query", None, "text")


def test_memory_hit_skips_the_backend(serve):
    s = serve(cached_config())
    c = s.client()
    first = c.vectors("repeat me").json()["vector"]
    second = c.vectors("repeat me").json()["vector"]
    assert first == second
    assert backend_texts(s).count("repeat me") == 1


def test_query_and_passage_are_cached_apart_when_they_differ(serve):
    s = serve(cached_config(task_aware=True))
    c = s.client()
    q = c.vectors("same", task_type="query").json()["vector"]
    p = c.vectors("same", task_type="passage").json()["vector"]
    assert q != p
    assert np.allclose(q, fake_vector("same", "query", 16), atol=1e-7)


def test_redis_is_shared_between_replicas(serve, redis_server):
    a = serve(cached_config(redis_server.url))
    b = serve(cached_config(redis_server.url))
    va = a.client().vectors("shared text").json()["vector"]
    vb = b.client().vectors("shared text").json()["vector"]
    assert va == vb
    assert "shared text" in backend_texts(a) and "shared text" not in backend_texts(b)


def test_config_change_never_serves_stale_vectors(serve, redis_server):
    a = serve(cached_config(redis_server.url))
    b = serve(cached_config(redis_server.url, prefixes={"query": "q: ", "passage": "p: "}))
    a.client().vectors("text")
    vb = b.client().vectors("text").json()["vector"]
    assert "p: text" in backend_texts(b)
    assert np.allclose(vb, fake_vector("p: text", "passage", 16), atol=1e-7)


def test_redis_ttl(serve, redis_server):
    cfg = cached_config(redis_server.url)
    cfg["cache"]["ttl_s"] = 30
    s = serve(cfg)
    s.client().vectors("with ttl")
    r = redis.Redis.from_url(redis_server.url)
    keys = r.keys("vecshim:*")
    assert keys and all(0 < r.ttl(k) <= 30 for k in keys)
    r.close()


def test_redis_down_requests_still_succeed_then_recover(serve, redis_server, caplog):
    s = serve(cached_config(redis_server.url))
    c = s.client()
    assert c.vectors("before").status == 200
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="vecshim.cache"):
        for i in range(5):
            r = c.vectors(f"during outage {i}")
            assert r.status == 200
            assert np.allclose(r.json()["vector"], fake_vector(f"during outage {i}", "passage", 16), atol=1e-7)
    assert s.state.cache.redis.errors >= 1
    assert any("redis cache unavailable" in rec.getMessage() for rec in caplog.records)
    redis_server.start()
    time.sleep(2.2)  # the cache skips Redis for its back-off window after a failure
    c.vectors("after restart")
    r = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 5
    while not r.keys("vecshim:*") and time.monotonic() < deadline:
        c.vectors(f"after restart {time.monotonic()}")
        time.sleep(0.2)
    assert r.keys("vecshim:*")
    r.close()
