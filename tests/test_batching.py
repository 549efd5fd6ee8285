"""The micro-batcher on its own: grouping, fairness, isolation of failures, deadlines, back-pressure."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from conftest import fake_config
from vecshim.batching import Batcher, caller_source, plan_groups
from vecshim.batchqueue import FairQueue, Job, Unit
from vecshim.errors import BackendError, ClientGone, InferenceTimeout, Overloaded, PayloadTooLarge, UpstreamError


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
    while sum(t.is_alive() for t in b._encoders.threads) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sum(t.is_alive() for t in b._encoders.threads) == 1  # the stuck thread retired when it returned
    assert b.close(3)


# -- fairness and bounded work --------------------------------------------------------

def recording_batcher(**kw):
    """A batcher whose calls wait for `gate`, recording each call's texts."""
    calls, gate = [], threading.Event()

    def embed(texts, key):
        gate.wait(10)
        calls.append(list(texts))
        time.sleep(0.005)
        return [f"v:{t}" for t in texts]

    return make(embed, **kw), calls, gate


def test_single_text_requests_are_not_stuck_behind_a_many_window_request():
    b, calls, gate = recording_batcher(max_size=4, max_wait_ms=0, max_queue=1000)
    big = b.submit([f"big{i}" for i in range(200)], [1] * 200, None)
    time.sleep(0.05)  # the first batch (of big's texts) is in the backend call, waiting for the gate
    small = [b.submit([f"small{i}"], [1], None) for i in range(6)]
    gate.set()
    for i, fs in enumerate(small):
        assert b.wait(fs, 10) == [f"v:small{i}"]
    # Every small request went in within the first few calls, while big still had texts queued.
    last_small = max(n for n, call in enumerate(calls) if any(t.startswith("small") for t in call))
    assert last_small <= 3
    assert sum(t.startswith("big") for call in calls[:last_small + 1] for t in call) < 200
    assert b.wait(big, 10) == [f"v:big{i}" for i in range(200)]  # order kept within a request
    b.close()


def test_requests_take_turns_round_robin():
    b, calls, gate = recording_batcher(max_size=3, max_wait_ms=0)
    blocker = b.submit(["blocker"], [1], None)
    time.sleep(0.05)
    a = b.submit(["a0", "a1", "a2", "a3"], [1] * 4, None)
    c = b.submit(["c0", "c1", "c2", "c3"], [1] * 4, None)
    gate.set()
    b.wait(blocker, 10), b.wait(a, 10), b.wait(c, 10)
    assert calls[1] == ["a0", "c0", "a1"]  # one text from each request in turn
    assert calls[2][0] == "c1"            # the request that went second goes first next
    b.close()


def test_a_request_over_the_token_limit_is_refused_at_once_naming_the_limit():
    b, calls, gate = recording_batcher(max_request_tokens=1000)
    with pytest.raises(PayloadTooLarge) as err:
        b.submit(["x"] * 3, [400, 400, 400], None)
    assert err.value.status == 413 and "batch.max_request_tokens" in err.value.message and "1000" in err.value.message
    with pytest.raises(PayloadTooLarge) as err:  # more texts than the queue can ever hold, even empty
        b.submit(["x"] * 101, [1] * 101, None)
    assert "batch.max_queue" in err.value.message
    gate.set()
    assert b.depth == 0 and calls == []
    b.close()


def test_the_queue_token_limit_refuses_heavy_requests_but_not_light_ones():
    b, calls, gate = recording_batcher(max_size=1, max_wait_ms=0, max_request_tokens=1000,
                                       max_queue_tokens=1500, small_tokens=10)
    running = b.submit(["running"], [1], None)
    time.sleep(0.05)
    heavy = b.submit(["h"] * 2, [500, 500], None)
    with pytest.raises(Overloaded) as err:
        b.submit(["h2"] * 2, [500, 500], None)
    assert "batch.max_queue_tokens" in err.value.message and err.value.headers["Retry-After"]
    light = b.submit(["light"], [5], None)  # one text's worth still gets in
    gate.set()
    assert b.wait(light, 10) == ["v:light"] and len(b.wait(heavy, 10)) == 2 and b.wait(running, 10)
    b.close()


def test_work_past_its_deadline_is_dropped_not_computed():
    b, calls, gate = recording_batcher(max_size=1, max_wait_ms=0)
    blocker = b.submit(["blocker"], [1], None)
    time.sleep(0.05)
    late = b.submit(["expired0", "expired1"], [1, 1], None, deadline=time.monotonic() + 0.05)
    time.sleep(0.1)
    gate.set()
    b.wait(blocker, 10)
    with pytest.raises(InferenceTimeout):
        b.wait(late, 10)
    assert b.close(5)
    assert not any(t.startswith("expired") for call in calls for t in call)
    assert b.depth == 0


def test_a_caller_that_hung_up_has_its_texts_dropped():
    b, calls, gate = recording_batcher(max_size=1, max_wait_ms=0)
    blocker = b.submit(["blocker"], [1], None)
    time.sleep(0.05)
    left = b.submit([f"gone{i}" for i in range(50)], [1] * 50, None)
    hung_up = threading.Event()
    threading.Timer(0.2, hung_up.set).start()
    with pytest.raises(ClientGone):
        b.wait(left, 10, gone=hung_up.is_set)
    assert b.depth == 0
    gate.set()
    b.wait(blocker, 10)
    assert b.close(5)
    assert not any(t.startswith("gone") for call in calls for t in call)


def test_cancelled_futures_are_not_computed():
    b, calls, gate = recording_batcher(max_size=1, max_wait_ms=0)
    blocker = b.submit(["blocker"], [1], None)
    time.sleep(0.05)
    fs = b.submit(["keep", "drop"], [1, 1], None)
    assert fs[1].cancel()
    gate.set()
    assert fs[0].result(10) == "v:keep"
    b.wait(blocker, 10)
    assert b.close(5)
    assert ["drop"] not in calls


def test_inline_a_text_that_finds_the_model_idle_runs_on_the_callers_thread():
    threads = []
    entered, release = threading.Event(), threading.Event()

    def embed(texts, key):
        threads.append((threading.get_ident(), tuple(texts)))
        if texts == ["first"]:
            entered.set()
            release.wait(5)
        return [f"v:{t}" for t in texts]

    b = make(embed, inline=True)
    me = threading.get_ident()
    assert b.wait(b.submit(["alone"], [1], None), 5) == ["v:alone"]
    assert threads == [(me, ("alone",))]
    assert b.busy == 0

    # While a caller embeds inline, the model is busy: the next text queues for an encoder thread.
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", b.wait(b.submit(["first"], [1], None), 5)))
    first.start()
    assert entered.wait(5)
    second = b.submit(["second"], [1], None)
    release.set()
    assert b.wait(second, 5) == ["v:second"]
    first.join(5)
    assert results["first"] == ["v:first"]
    by_text = {texts: ident for ident, texts in threads}
    assert by_text[("first",)] == first.ident
    assert by_text[("second",)] not in (me, first.ident)
    assert b.busy == 0
    b.close()


def test_without_inline_every_text_runs_on_an_encoder_thread():
    idents = []
    b = make(lambda texts, key: idents.append(threading.get_ident()) or list(texts))
    assert b.wait(b.submit(["alone"], [1], None), 5) == ["alone"]
    assert idents and idents[0] != threading.get_ident()
    b.close()


def test_an_inline_call_that_fails_fails_its_caller_and_frees_the_model():
    def embed(texts, key):
        raise BackendError("broken text")

    b = make(embed, inline=True)
    with pytest.raises(BackendError):
        b.wait(b.submit(["x"], [1], None), 5)
    assert b.busy == 0
    with pytest.raises(BackendError):  # and the next one is served (inline again), not stuck
        b.wait(b.submit(["y"], [1], None), 5)
    b.close()


def test_inline_still_batches_concurrent_callers():
    seen = []

    def embed(texts, key):
        seen.append(len(texts))
        time.sleep(0.02)
        return [f"v:{t}" for t in texts]

    b = make(embed, inline=True)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.setdefault(i, b.wait(b.submit([f"t{i}"], [1], None), 5)[0]))
               for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"v:t{i}" for i in range(24)}
    assert sum(seen) == 24 and max(seen) > 1
    b.close()


# wait() has a path of its own for a request of one text (Weaviate's /vectors); both give the same outcomes.
@pytest.mark.parametrize("n", [1, 3])
def test_wait_outcomes_are_the_same_for_one_text_and_several(n):
    b, calls, gate = recording_batcher(max_size=1, max_wait_ms=0)
    blocker = b.submit(["blocker"], [1], None)
    time.sleep(0.05)  # the blocker is in the backend call; what follows stays queued
    timed_out = b.submit([f"late{i}" for i in range(n)], [1] * n, None)
    with pytest.raises(InferenceTimeout, match="did not answer within"):
        b.wait(timed_out, 0.05)
    hung_up = b.submit([f"gone{i}" for i in range(n)], [1] * n, None)
    with pytest.raises(ClientGone):
        b.wait(hung_up, 10, gone=lambda: True)
    assert b.depth == 0  # both requests left the queue
    cancelled = b.submit([f"cancel{i}" for i in range(n)], [1] * n, None)
    assert all(f.cancel() for f in cancelled)  # they stay queued, to be skipped
    gate.set()
    with pytest.raises(InferenceTimeout, match="cancelled"):
        b.wait(cancelled, 10)
    assert b.wait(blocker, 10) == ["v:blocker"]
    assert b.wait(b.submit([f"ok{i}" for i in range(n)], [1] * n, None), 10) == [f"v:ok{i}" for i in range(n)]
    assert b.close(5)
    assert [t for call in calls for t in call] == ["blocker"] + [f"ok{i}" for i in range(n)]


@pytest.mark.parametrize("n", [1, 3])
def test_wait_raises_the_backend_error_and_drops_the_rest_of_the_request(n):
    def embed(texts, key):
        if any("bad" in t for t in texts):
            raise BackendError("bad text in batch")
        return texts

    b = make(embed, max_size=1, max_wait_ms=0)
    with pytest.raises(BackendError, match="bad text"):
        b.wait(b.submit(["bad"] + [f"t{i}" for i in range(n - 1)], [1] * n, None), 10)
    assert b.depth == 0
    assert b.wait(b.submit(["after"], [1], None), 10) == ["after"]
    b.close()


def test_a_backend_call_reports_how_many_senders_its_texts_came_from():
    seen, gate = [], threading.Event()

    def embed(texts, key):
        gate.wait(10)
        return [f"v:{t}" for t in texts]

    b = make(embed, max_size=8, max_wait_ms=0, on_sources=seen.append)
    gate.set()
    assert b.wait(b.submit(["no sender"], [1], None), 10) == ["v:no sender"]  # e.g. a load-time check
    gate.clear()
    blocker = b.submit(["blocker"], [1], None)
    time.sleep(0.05)  # the blocker is in the backend call: the texts below queue behind it
    results = {}

    def send(source, texts):
        caller_source.set(source)  # this thread's own context
        results[source] = b.wait(b.submit(texts, [1] * len(texts), None), 10)

    senders = [threading.Thread(target=send, args=(pid, [f"{pid}-{i}" for i in range(2)])) for pid in (101, 102)]
    for t in senders:
        t.start()
    while b.depth < 4:
        time.sleep(0.01)
    gate.set()
    for t in senders:
        t.join(10)
    assert b.wait(blocker, 10) == ["v:blocker"]
    assert results == {pid: [f"v:{pid}-0", f"v:{pid}-1"] for pid in (101, 102)}
    assert b.close(5)
    assert seen == [0, 0, 2]  # the texts of both senders shared the third call


def test_the_fair_queue_counts_what_is_left_as_texts_are_taken_dropped_and_expired():
    q = FairQueue()

    def job(key, n, deadline=None):
        j = Job(key, [], deadline)
        j.units = [Unit(f"{key}{i}", 10, Future(), j) for i in range(n)]
        q.add(j, 10 * n)
        return j

    a, b, c = job("k", 3), job("other", 2), job("k", 2)
    b.units[0].future.cancel()
    assert (q.texts, q.tokens) == (7, 70)
    first = q.take(4)  # key "k" only, one text of each request in turn
    assert [u.text for u in first] == ["k0", "k0", "k1", "k1"]
    assert [j.key for j in q.jobs] == ["other", "k"]  # the other key goes next
    assert [u.text for u in q.take(4)] == ["other1"]  # the cancelled text is skipped
    assert (q.texts, q.tokens) == (1, 10) and list(q.jobs) == [a]
    late = job("k", 2, deadline=time.monotonic() - 1)
    assert q.expire(time.monotonic()) == [late] and late.dropped and not c.dropped
    assert (q.texts, q.tokens) == (1, 10) and list(q.jobs) == [a]
    q.drop(a)
    assert (q.texts, q.tokens, list(q.jobs)) == (0, 0, [])
    q.drop(a)  # dropping twice counts once
    assert (q.texts, q.tokens) == (0, 0)
