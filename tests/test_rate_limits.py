"""Rate limits, piece by piece: header parsing, the AIMD window, the budget's stores
(memory, the replica's file, a real redis-server) and the batcher's coalescing gate."""
from __future__ import annotations

import logging
import multiprocessing
import threading
import time

import pytest

from redisserver import RedisServer
from vecshim.batching import Batcher
from vecshim.budget import REQUEST_BURST_S, Budget, BudgetConfig, FileStore, MemoryStore, RateLimit, RedisStore, \
    account_id
from vecshim.errors import UpstreamError
from vecshim.metrics import Stats
from vecshim.ratelimit import UpstreamInfo, Window, parse_duration, read_cohere_headers, read_openai_headers
from vecshim.resilience import CircuitPolicy, Resilience, RetryPolicy


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


# -- what upstreams say -----------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("1s", 1.0), ("6m0s", 360.0), ("17ms", 0.017), ("1h2m3.5s", 3723.5),
                                           ("0.25", 0.25), ("", None), ("soon", None), ("1x", None),
                                           ("-3", None), ("nan", None)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_openai_headers_are_read_case_insensitively():
    info = read_openai_headers({"X-RateLimit-Limit-Requests": "3000", "x-ratelimit-limit-tokens": "1000000",
                                "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "999000",
                                "x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "6m0s",
                                "retry-after-ms": "150"})
    assert (info.requests_per_minute, info.tokens_per_minute) == (3000, 1_000_000)
    assert (info.remaining_requests, info.remaining_tokens) == (0, 999_000)
    assert info.reset_requests_s == pytest.approx(0.02) and info.reset_tokens_s == 360
    assert info.retry_after_s == pytest.approx(0.15)
    # No requests left: wait for their reset (or Retry-After, whichever is longer).
    assert info.pause_s() == pytest.approx(0.15)
    assert UpstreamInfo(remaining_requests=0, reset_requests_s=2.0).pause_s() == 2.0
    assert UpstreamInfo(remaining_requests=5, reset_requests_s=2.0).pause_s() == 0.0


def test_garbage_headers_are_ignored():
    info = read_openai_headers({"x-ratelimit-limit-requests": "lots", "x-ratelimit-limit-tokens": "-5",
                                "x-ratelimit-reset-requests": "whenever", "retry-after": "later"})
    assert info == UpstreamInfo()
    assert read_openai_headers(None) == UpstreamInfo()


def test_cohere_trial_headers_and_retry_after():
    info = read_cohere_headers({"x-trial-endpoint-call-limit": "40", "x-trial-endpoint-call-remaining": "39",
                                "Retry-After": "2"})
    assert (info.requests_per_minute, info.remaining_requests, info.retry_after_s) == (40, 39, 2.0)
    assert read_cohere_headers({"x-endpoint-monthly-call-limit": "1000"}).requests_per_minute is None


def test_account_id_separates_keys_and_hides_them():
    a = account_id("https://api.openai.com/v1", "sk-one-0123456789")
    assert a == account_id("https://api.openai.com/v1", "sk-one-0123456789")
    assert a != account_id("https://api.openai.com/v1", "sk-two-0123456789")
    assert a != account_id("https://other.example/v1", "sk-one-0123456789")
    assert "sk-one" not in a and len(a) == 16


# -- the AIMD window ----------------------------------------------------------

def _round(w: Window, outcome: str, seconds: float) -> None:
    assert w.acquire(1)
    w.observe(outcome, seconds)
    w.release()


def test_window_halves_on_429_once_per_burst_and_grows_back_additively():
    w = Window(8, 8)
    for _ in range(3):  # three 429s from calls that were in flight together
        assert w.acquire(1)
    for _ in range(3):
        w.observe("429", 0.5)
        w.release()
    assert w.limit == 4.0
    time.sleep(0.55)  # the next round trip: a new 429 counts again
    _round(w, "429", 0.05)
    assert w.limit == 2.0
    time.sleep(0.06)
    for _ in range(2):  # a full window of successes adds one call
        _round(w, "ok", 0.05)
    assert w.limit == pytest.approx(2 + 1 / 2 + 1 / 2.5)  # about one more call
    for _ in range(100):
        _round(w, "ok", 0.05)
    assert w.limit == 8.0  # never above the ceiling


def test_window_never_below_two_and_cut_by_latency_growth():
    w = Window(4, 4)
    for _ in range(20):
        _round(w, "ok", 0.06)
    _round(w, "ok", 0.3)  # 5x the baseline: the upstream is queueing us
    assert w.limit == pytest.approx(3.6)
    time.sleep(0.31)
    for _ in range(10):
        time.sleep(0.06)
        _round(w, "429", 0.05)
    assert w.limit == 2.0
    one = Window(1, 1)
    _round(one, "429", 0.05)
    assert one.limit == 1.0


def test_window_blocks_beyond_its_limit():
    w = Window(2, 2)
    assert w.acquire(1) and w.acquire(1)
    assert not w.free and not w.acquire(0.05)
    w.observe("error", 0.01)
    assert not w.free  # an attempt failed but its call still holds the place (retrying)
    w.release()
    assert w.free and w.acquire(0.05)


# -- the budget's stores --------------------------------------------------------

def _grants(run, seconds: float, rr: float) -> int:
    """Reserve as fast as the store allows for `seconds`; return how many were granted."""
    granted, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        wait = run("acct", "reserve", rr, 0.0, 0, 0.0)[0]
        if wait <= 0:
            granted += 1
        else:
            time.sleep(min(wait, max(0.0, stop - time.monotonic())))
    return granted


def _bound(rr: float, seconds: float) -> float:
    """Most grants a schedule at `rr`/s with its burst allowance can give in `seconds`."""
    return rr * (seconds + REQUEST_BURST_S) + 1


@pytest.mark.parametrize("kind", ["memory", "file", "redis"])
def test_every_store_paces_requests_at_the_rate(kind, tmp_path, redis_server):
    store = {"memory": MemoryStore, "file": lambda: FileStore(str(tmp_path)),
             "redis": lambda: RedisStore(redis_server.url, 1.0)}[kind]()
    if kind == "redis":
        store._redis.delete("vecshim:budget:{acct}")
    rr, seconds = 20.0, 1.0
    start = time.monotonic()
    granted = _grants(store.run, seconds, rr)
    assert 1 < granted <= _bound(rr, time.monotonic() - start)


def _store(kind, tmp_path, redis_server):
    return {"memory": MemoryStore, "file": lambda: FileStore(str(tmp_path)),
            "redis": lambda: RedisStore(redis_server.url, 1.0)}[kind]()


@pytest.mark.parametrize("kind", ["memory", "file", "redis"])
def test_stores_agree_on_pause_settle_and_tokens(kind, tmp_path, redis_server):
    store = _store(kind, tmp_path, redis_server)
    acct = f"agree-{kind}-{time.monotonic()}"
    assert store.run(acct, "reserve", 0, 100.0, 50, 0.0)[0] == 0  # 50 tokens at 100/s: 0.5 s ahead
    wait, _, ahead_t = store.run(acct, "reserve", 0, 100.0, 0)  # max_wait < 0: only look
    assert wait == 0 and 0.3 < ahead_t <= 0.5
    assert store.run(acct, "reserve", 0, 100.0, 200, 0.0)[0] == 0  # still within the 1 s allowance
    assert store.run(acct, "reserve", 0, 100.0, 0)[0] > 0.9  # 2.5 s ahead: wait about 1.5 s
    assert store.run(acct, "reserve", 0, 100.0, 10, 0.0)[0] > 0.9  # not booked: too far away
    assert store.run(acct, "reserve", 0, 100.0, 0)[2] <= 2.5
    store.run(acct, "settle", 0, 100.0, -200)  # the call used 200 tokens fewer than reserved
    assert store.run(acct, "reserve", 0, 100.0, 0)[0] == 0
    store.run(acct, "pause", 0, 0, 0.6)
    assert 0.3 < store.run(acct, "reserve", 0, 0, 0, 0.0)[0] <= 0.6  # a pause holds even without limits


@pytest.mark.parametrize("kind", ["memory", "file", "redis"])
def test_bookings_queue_up_in_order_at_the_rate(kind, tmp_path, redis_server):
    store = _store(kind, tmp_path, redis_server)
    acct = f"queue-{kind}-{time.monotonic()}"
    waits = [store.run(acct, "reserve", 1.0, 0.0, 0, 50.0)[0] for _ in range(5)]
    assert waits[0] == 0
    # Each booking takes the next 1 s slot: callers wait their turn instead of racing for it
    # (less the time that passed between two bookings).
    gaps = [b - a for a, b in zip(waits, waits[1:])]
    assert all(0.5 < g <= 1.0 + 1e-6 for g in gaps[1:]), waits
    assert store.run(acct, "reserve", 1.0, 0.0, 0, 0.5)[0] > 3  # beyond max_wait: not booked
    assert store.run(acct, "reserve", 1.0, 0.0, 0)[1] < waits[-1] + 1.5  # ...and the schedule did not move


def _hammer_file(folder: str, seconds: float, rr: float, out) -> None:
    out.put(_grants(FileStore(folder).run, seconds, rr))


def test_file_store_is_one_budget_for_the_replicas_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    rr, seconds = 20.0, 1.5
    procs = [ctx.Process(target=_hammer_file, args=(str(tmp_path), seconds, rr, out)) for _ in range(3)]
    start = time.monotonic()
    for p in procs:
        p.start()
    counts = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert all(c >= 1 for c in counts)
    # Three processes together get what one would: the limit is not multiplied.
    assert sum(counts) <= _bound(rr, time.monotonic() - start)


def test_two_replicas_on_one_redis_share_one_budget(redis_server):
    cfg = BudgetConfig(headroom=1.0)
    replicas = [Budget("shared-acct", "up", cfg, redis_url=redis_server.url, local_dir=None) for _ in range(2)]
    for b in replicas:
        b.configure(RateLimit(requests_per_minute=1200))  # 20/s
    replicas[0]._redis._redis.delete("vecshim:budget:{shared-acct}")
    counts = [0, 0]

    def run(i):
        counts[i] = _grants(lambda *a: (replicas[i].reserve(0), 0, 0), 1.5, 20.0)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts[0] >= 1 and counts[1] >= 1
    assert sum(counts) <= _bound(20.0, time.monotonic() - start)
    assert replicas[0].info()["store"] == "redis"


def test_redis_killed_mid_run_falls_back_to_a_share_loudly_and_comes_back(monkeypatch, caplog):
    import vecshim.budget as budget_mod

    monkeypatch.setattr(budget_mod, "RETRY_REDIS_S", 0.2)
    server = RedisServer().start()
    stats = Stats()
    changes = []
    try:
        b = Budget("killed-acct", "up.example", BudgetConfig(expected_replicas=4, headroom=1.0),
                   redis_url=server.url, local_dir=None, stats=stats)
        b.subscribe(lambda: changes.append(b.info()))
        b.configure(RateLimit(requests_per_minute=2400))  # 40/s for the fleet
        assert b.reserve(1) == 0 and b.info()["store"] == "redis"
        server.kill()
        with caplog.at_level(logging.ERROR, logger="vecshim.budget"):
            start = time.monotonic()
            granted = _grants(lambda *a: (b.reserve(0), 0, 0), 1.0, 10.0)
        # Redis is gone: this replica takes 1/4 of 40/s, never the whole fleet's limit.
        assert 1 <= granted <= _bound(10.0, time.monotonic() - start)
        info = b.info()
        assert info["store"] == "process" and "1/4" in info["fallback"]
        assert any("Redis unreachable" in r.getMessage() and "1/4" in r.getMessage() for r in caplog.records)
        assert stats.registry.get_sample_value("vecshim_budget_fallback", {"upstream": "up.example"}) == 1
        assert changes and "fallback" in changes[-1]
        server.start()  # same port
        deadline = time.monotonic() + 10
        while b.info()["store"] != "redis" and time.monotonic() < deadline:
            time.sleep(0.1)
            b.peek()  # each operation tries Redis again once RETRY_REDIS_S has passed
        assert b.info()["store"] == "redis" and "fallback" not in b.info()
        assert stats.registry.get_sample_value("vecshim_budget_fallback", {"upstream": "up.example"}) == 0
    finally:
        server.stop()


def test_learned_limits_lower_configured_ones_win():
    b = Budget("a", "up", BudgetConfig(), redis_url=None, local_dir=None)
    b.configure(RateLimit(requests_per_minute=600))
    b.learn(UpstreamInfo(requests_per_minute=3000, tokens_per_minute=90_000))
    assert b.per_minute() == (600, 90_000)
    b.learn(UpstreamInfo(requests_per_minute=300))
    assert b.per_minute() == (300, 90_000)
    assert b.info()["learned"] == {"requests_per_minute": 300, "tokens_per_minute": 90_000}


# -- retries and coalescing -----------------------------------------------------

def test_retries_run_until_the_time_budget_not_a_fixed_count():
    b = Budget("r", "up", BudgetConfig(), redis_url=None, local_dir=None)
    res = Resilience(RetryPolicy(budget_s=20, base_delay_s=0.001, max_delay_s=0.01), CircuitPolicy(), 2,
                     "test", budget=b)
    errors = [UpstreamError("429", upstream_status=429, retry_after=0.01, retryable=True) for _ in range(12)]

    def fn():
        if errors:
            raise errors.pop()
        return "ok"
    assert res.call(fn) == "ok" and not errors  # 13 attempts, far past the old default of 5


def test_a_429_pauses_every_caller_of_the_account():
    b = Budget("p", "up", BudgetConfig(), redis_url=None, local_dir=None)
    policy = RetryPolicy(budget_s=10, base_delay_s=0.001, max_delay_s=0.001)
    first, second = (Resilience(policy, CircuitPolicy(), 2, n, budget=b) for n in ("one", "two"))
    failed = [UpstreamError("429", upstream_status=429, retry_after=0.5, retryable=True)]

    def fn():
        if failed:
            raise failed.pop()
        return time.monotonic()
    threading.Thread(target=first.call, args=(fn,)).start()
    time.sleep(0.05)
    started = time.monotonic()
    assert not failed  # the 429 happened
    assert second.call(lambda: time.monotonic()) - started >= 0.35
    assert b.peek() == 0


class _Gate:
    """A gate the test opens and closes by hand."""

    def __init__(self):
        self.open = threading.Event()
        self.listeners = []

    def admit(self) -> tuple[bool, float]:
        return (True, 0.0) if self.open.is_set() else (False, float("inf"))

    def subscribe(self, fn):
        self.listeners.append(fn)

    def set(self):
        self.open.set()
        for fn in self.listeners:
            fn()


def test_gate_holds_texts_until_the_upstream_has_room_then_sends_them_together():
    gate, calls = _Gate(), []
    b = Batcher("g", lambda texts, key: (calls.append(list(texts)), [[1.0]] * len(texts))[1], max_size=64,
                max_wait_ms=0, workers=4, max_queue=100, gate=gate)
    try:
        items = b.submit([f"t{i}" for i in range(10)], [1] * 10, None)
        time.sleep(0.2)
        assert calls == []  # the upstream has no room: nothing leaves, texts pile up
        gate.set()
        b.wait(items, 10)
        assert calls == [[f"t{i}" for i in range(10)]]  # one call for all of them
    finally:
        b.close(5)


def test_a_lone_text_on_an_idle_upstream_goes_at_once_despite_max_wait():
    gate, calls = _Gate(), []
    gate.open.set()
    b = Batcher("g", lambda texts, key: (calls.append(list(texts)), [[1.0]] * len(texts))[1], max_size=64,
                max_wait_ms=1000, workers=4, max_queue=100, gate=gate)
    b.max_wait = 5.0  # beyond the config's ceiling, so waiting it would show
    try:
        start = time.monotonic()
        b.wait(b.submit(["alone"], [1], None), 10)
        b.wait(b.submit(["again"], [1], None), 10)
        assert calls == [["alone"], ["again"]]
        assert time.monotonic() - start < 5.0  # max_wait (5 s each) was not waited
    finally:
        b.close(5)


def test_texts_arriving_while_a_call_is_in_flight_wait_for_it_and_leave_together():
    # The upstream always has room once open, yet texts that arrive one by one while a
    # call is in flight must not go out in concurrent small calls: they wait for that
    # call (at most one observed call duration, here about 3 s) and leave as one.
    gate, calls, release = _Gate(), [], threading.Event()

    def embed(texts, key):
        calls.append(list(texts))
        release.wait(30)
        return [[1.0]] * len(texts)
    b = Batcher("g", embed, max_size=64, max_wait_ms=0, workers=4, max_queue=100, gate=gate)
    try:
        burst = b.submit([f"b{i}" for i in range(12)], [1] * 12, None)
        gate.set()  # 12 texts outstanding in one call: what a full call holds here
        time.sleep(3.0)  # the call lasts ~3 s: the hold's bound
        release.set()
        b.wait(burst, 10)
        time.sleep(3.5)  # longer than a call: the upstream is idle again
        release.clear()
        lone = b.submit(["lone"], [1], None)
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls[1:] == [["lone"]]  # an idle upstream: a lone text went at once
        items = [b.submit([f"t{i}"], [1], None) for i in range(10)]  # one at a time, 3 idle workers
        time.sleep(0.3)
        assert len(calls) == 2  # none left while "lone" was in flight
        release.set()
        b.wait(lone, 10)
        for f in items:
            b.wait(f, 10)
        assert calls[2:] == [[f"t{i}" for i in range(10)]]  # together, in one call
    finally:
        release.set()
        b.close(5)


def test_a_limit_nobody_announced_is_inferred_from_429s_and_probed_upwards():
    b = Budget("quiet", "up", BudgetConfig(), redis_url=None, local_dir=None)
    b.rate_limited()
    b.rate_limited()
    assert b.inferred is None  # no calls to go by yet: only Retry-After paces
    for _ in range(10):
        b.accepted()
    b._429s.clear()
    b.rate_limited()
    assert b.inferred is None  # a stray 429: Retry-After's business
    b.rate_limited()
    assert b.inferred is None  # 2 of 12 calls: still too rare to mean anything
    b.rate_limited()
    assert b.inferred == pytest.approx(10 / 2.0 * 60)  # frequent: what got through lately, per minute
    assert b.info()["inferred_requests_per_minute"] == 300 and b.per_minute() == (None, None)
    b.rate_limited()
    assert b.inferred == pytest.approx(300)  # the same burst of 429s cuts once
    b._changed_at -= 2.0
    b.rate_limited()
    assert b.inferred == pytest.approx(210)  # still calling at that pace: 30 % less
    b._changed_at -= 2.0
    b._recent.clear()
    b.rate_limited()
    assert b.inferred == pytest.approx(210)  # calls go slower than the pace: no sign of it
    b.accepted()
    assert b.inferred == pytest.approx(210 * 1.05 ** 2, rel=0.01)  # probing upwards again
    b.learn(UpstreamInfo(requests_per_minute=600))
    b.rate_limited()
    assert b.per_minute() == (600, None) and "inferred_requests_per_minute" not in b.info()
