"""The micro-batcher on its own: grouping, isolation of failures, timeouts, back-pressure."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import fake_config
from vecshim.batching import Batcher, plan_groups
from vecshim.errors import BackendError, InferenceTimeout, Overloaded, UpstreamError


def test_plan_groups_respects_limits_and_keeps_every_item():
    tokens = [5, 200, 7, 180, 6, 190, 8, 9]
    groups = plan_groups(tokens, max_size=3, max_tokens=None, cost=None)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(len(g) <= 3 for g in groups)
    groups = plan_groups(tokens, max_size=None, max_tokens=250, cost=None)
    assert all(sum(tokens[i] for i in g) <= 250 or len(g) == 1 for g in groups)


def test_plan_groups_separates_short_from_long_texts_with_a_cost_model():
    tokens = [10] * 12 + [250] * 4
    groups = plan_groups(tokens, max_size=32, max_tokens=None, cost=(0.002, 2.4e-5, 6e-8))
    assert len(groups) == 2
    assert {tokens[i] for i in groups[0]} == {10} and {tokens[i] for i in groups[1]} == {250}
    # with a huge per-call overhead one call is cheaper than two
    assert len(plan_groups(tokens, max_size=32, max_tokens=None, cost=(10.0, 2.4e-5, 0))) == 1


def make(embed, **kw):
    args = dict(max_size=8, max_wait_ms=20, workers=1, max_queue=100)
    args.update(kw)
    return Batcher("t", embed, **args)


def test_each_caller_gets_its_own_result_and_batches_form():
    seen = []

    def embed(texts, key):
        seen.append(len(texts))
        time.sleep(0.02)
        return [f"v:{t}" for t in texts]

    b = make(embed)
    results = {}

    def call(i):
        results[i] = b.wait(b.submit([f"t{i}"], [1], None), 5)[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"v:t{i}" for i in range(24)}
    assert max(seen) > 1 and max(seen) <= 8
    b.close()


def test_a_lone_request_does_not_wait_for_company():
    b = make(lambda texts, key: texts, max_wait_ms=500)
    start = time.monotonic()
    assert b.wait(b.submit(["solo"], [1], None), 5) == ["solo"]
    assert time.monotonic() - start < 0.1
    b.close()


def test_keys_are_never_mixed_in_one_call():
    calls = []
    gate = threading.Event()

    def embed(texts, key):
        gate.wait(5)
        calls.append((key, list(texts)))
        return texts

    b = make(embed, max_size=16)
    first = b.submit(["blocker"], [1], "q")
    time.sleep(0.05)
    items = [b.submit([f"{k}{i}"], [1], k) for i in range(5) for k in ("q", "p")]
    gate.set()
    b.wait(first, 5)
    for it in items:
        b.wait(it, 5)
    for key, texts in calls:
        assert all(t.startswith(key) or t == "blocker" for t in texts)
    b.close()


def test_one_bad_text_fails_alone():
    def embed(texts, key):
        if any("bad" in t for t in texts):
            raise BackendError("bad text in batch")
        return texts

    gate = threading.Event()
    b = make(lambda texts, key: (gate.wait(5), embed(texts, key))[1], max_size=16)
    items = [b.submit([t], [1], None) for t in ["a", "b", "bad", "c", "d", "e"]]
    gate.set()
    ok = [b.wait(it, 5)[0] for i, it in enumerate(items) if i != 2]
    assert ok == ["a", "b", "c", "d", "e"]
    with pytest.raises(BackendError):
        b.wait(items[2], 5)
    b.close()


def test_transient_upstream_errors_are_not_bisected():
    calls = []

    def embed(texts, key):
        calls.append(len(texts))
        raise UpstreamError("upstream 503", upstream_status=503, retryable=True)

    gate = threading.Event()
    b = make(lambda t, k: (gate.wait(5), embed(t, k))[1], max_size=16)
    items = [b.submit([f"x{i}"], [1], None) for i in range(6)]
    gate.set()
    for it in items:
        with pytest.raises(UpstreamError):
            b.wait(it, 5)
    assert len(calls) <= 2  # one call per gathered batch, not one per text
    b.close()


def test_timed_out_callers_are_cancelled_and_skipped():
    embedded = []
    gate = threading.Event()

    def embed(texts, key):
        gate.wait(5)
        embedded.extend(texts)
        return texts

    b = make(embed, max_size=1)
    first = b.submit(["first"], [1], None)
    late = b.submit(["late"], [1], None)
    with pytest.raises(InferenceTimeout):
        b.wait(late, 0.05)
    gate.set()
    assert b.wait(first, 5) == ["first"]
    b.close()
    assert "late" not in embedded


def test_full_queue_is_overloaded():
    gate = threading.Event()
    b = make(lambda t, k: (gate.wait(5), t)[1], max_size=1, max_queue=3)
    b.submit(["running"], [1], None)
    time.sleep(0.05)
    b.submit(["a", "b", "c"], [1, 1, 1], None)
    with pytest.raises(Overloaded) as err:
        b.submit(["d"], [1], None)
    assert err.value.status == 503 and err.value.headers["Retry-After"]
    gate.set()
    b.close()


def test_close_finishes_queued_work():
    b = make(lambda t, k: (time.sleep(0.01), t)[1], max_size=2)
    items = [b.submit([f"t{i}"], [1], None) for i in range(10)]
    assert b.close(5)
    assert all(f.done() and f.exception() is None for batch in items for f in batch)


def test_overloaded_is_a_fast_503_over_http(serve):
    s = serve(fake_config(delay_s=0.3, batch={"max_size": 1, "workers": 1, "max_queue": 2}))
    replies = []

    def call(i):
        replies.append(s.client().vectors(f"text {i}"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status for r in replies)
    assert 200 in statuses and 503 in statuses
    over = next(r for r in replies if r.status == 503)
    assert over.headers["retry-after"] and "queued" in over.json()["error"]


def test_request_timeout_is_a_504_json(serve):
    s = serve(fake_config(delay_s=0.5, timeout_s=0.2))
    r = s.client().vectors("slow")
    assert r.status == 504 and "0.2" in r.json()["error"]
    assert s.client().request("GET", "/meta").status == 200


def test_watchdog_replaces_a_worker_stuck_in_a_hung_call():
    release = threading.Event()

    def embed(texts, key):
        if "HANG" in texts:
            release.wait(10)
        return texts

    b = make(embed, max_size=1, stuck_after_s=0.2)
    hung = b.submit(["HANG"], [1], None)
    with pytest.raises(InferenceTimeout):
        b.wait(hung, 0.1)
    start = time.monotonic()
    assert b.wait(b.submit(["after"], [1], None), 3) == ["after"]  # served by the replacement
    assert 0.1 < time.monotonic() - start < 1.5
    release.set()
    deadline = time.monotonic() + 3
    while sum(t.is_alive() for t in b._threads) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sum(t.is_alive() for t in b._threads) == 1  # the stuck thread retired when it returned
    assert b.close(3)
