"""Retries, circuit breaker and concurrency cap: unit tests, then real backends against fakes."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate

import pydantic
import pytest

from tests.fakes import reset, slow, status
from tests.fakes.cohere_upstream import FakeCohere
from tests.fakes.openai_upstream import FakeOpenAI
from vecshim.backends.cohere_api import CohereBackend, CohereOptions
from vecshim.backends.openai_api import OpenAIBackend, OpenAIOptions
from vecshim.errors import BackendError, BackendUnavailable, UpstreamError
from vecshim.resilience import CircuitPolicy, Resilience, RetryPolicy, parse_retry_after

KEY = "sk-test-key"
FAST = {"base_delay_s": 0.01, "max_delay_s": 0.05}


def make(retry=None, circuit=None, max_concurrency=None):
    """Return (resilience, events) with fast retries unless told otherwise."""
    events = []
    res = Resilience(RetryPolicy(**{**FAST, **(retry or {})}), CircuitPolicy(**(circuit or {})),
                     max_concurrency, "test", on_event=events.append)
    return res, events


def failing(*errors, result="ok"):
    """Return a function raising `errors` one per call, then returning `result`."""
    queue = list(errors)
    calls = []

    def fn(*args):
        calls.append(args)
        if queue:
            raise queue.pop(0)
        return result

    fn.calls = calls
    return fn


def upstream(status=500, retry_after=None, retryable=True):
    return UpstreamError(f"svc upstream returned {status}", upstream_status=status,
                         retry_after=retry_after, retryable=retryable)


# -- policies and Retry-After parsing ------------------------------------------
def test_policies_have_documented_defaults_and_reject_unknown_keys():
    assert RetryPolicy().model_dump() == {"max_attempts": None, "budget_s": 40.0,
                                          "base_delay_s": 0.2, "max_delay_s": 8.0}
    assert CircuitPolicy().model_dump() == {"failures": 5, "reset_s": 10.0}
    with pytest.raises(pydantic.ValidationError):
        RetryPolicy(attempts=3)
    with pytest.raises(pydantic.ValidationError):
        CircuitPolicy(failures=0)


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after": "3"}, 3.0),
    ({"Retry-After": "0.5"}, 0.5),
    ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
    ({"retry-after": "soon"}, None),
    ({}, None),
    (None, None),
])
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date():
    assert 8 < parse_retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert parse_retry_after({"retry-after": formatdate(time.time() - 10, usegmt=True)}) == 0.0


# -- retries -------------------------------------------------------------------
def test_success_passes_arguments_and_result():
    res, events = make()
    assert res.call(lambda a, b=0: a + b, 1, b=2) == 3
    assert events == ["call"]


def test_retryable_errors_are_retried():
    res, events = make()
    fn = failing(upstream(500), upstream(503))
    assert res.call(fn, "x") == "ok"
    assert len(fn.calls) == 3
    assert events == ["call", "retry", "call", "retry", "call"]


@pytest.mark.parametrize("error", [upstream(400, retryable=False), BackendError("bad reply"),
                                   ValueError("bug")])
def test_other_errors_propagate_at_once(error):
    res, events = make()
    fn = failing(error)
    with pytest.raises(type(error)) as caught:
        res.call(fn)
    assert caught.value is error and len(fn.calls) == 1
    assert events == ["call", "failure"]


def test_gives_up_after_max_attempts_naming_status_and_attempts():
    res, events = make({"max_attempts": 3})
    fn = failing(*[upstream(502)] * 5)
    with pytest.raises(UpstreamError, match=r"^svc upstream returned 502 after 3 attempts in \d+\.\d s$") as caught:
        res.call(fn)
    assert len(fn.calls) == 3 and caught.value.upstream_status == 502
    assert events.count("retry") == 2 and events[-1] == "failure"


def test_waits_at_least_retry_after():
    res, events = make()
    fn = failing(upstream(429, retry_after=0.3))
    start = time.monotonic()
    assert res.call(fn) == "ok"
    assert time.monotonic() - start >= 0.3
    assert events == ["call", "429", "retry", "call"]


def test_retry_after_beyond_the_budget_gives_up_at_once():
    res, _ = make({"budget_s": 1.0})
    fn = failing(upstream(429, retry_after=30))
    start = time.monotonic()
    with pytest.raises(UpstreamError, match="returned 429 after 1 attempt in .* not fit the 1 s budget") as caught:
        res.call(fn)
    assert time.monotonic() - start < 0.5
    assert caught.value.retry_after == 30 and caught.value.headers == {"Retry-After": "30"}


class PlannedClock:
    """`time` as vecshim.resilience sees it: a sleep moves the clock by exactly what was asked.

    What is checked is then the retry policy's plan, not how late a loaded machine wakes a
    sleeper (a 0.05 s sleep that oversleeps by 2 ms used to start the last attempt at 0.501 s).
    """

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_budget_bounds_total_time(monkeypatch):
    import vecshim.resilience

    clock = PlannedClock()
    monkeypatch.setattr(vecshim.resilience, "time", clock)
    res, _ = make({"max_attempts": 1000, "budget_s": 0.5, "base_delay_s": 0.05, "max_delay_s": 0.1},
                  {"failures": 1000})
    fn = failing(*[upstream(503)] * 1000)
    starts = []
    start = clock.monotonic()

    def timed(*args):
        starts.append(clock.monotonic() - start)
        return fn(*args)

    with pytest.raises(UpstreamError, match=r"returned 503 after \d+ attempts"):
        res.call(timed)
    # The property is the policy's, not the machine's: no attempt starts once the budget is spent.
    assert starts[-1] <= 0.5
    assert len(fn.calls) > 3 and len(fn.calls) < 1000


def test_no_new_attempt_that_would_overrun_the_budget():
    res, _ = make({"budget_s": 0.5})

    def slow_failure():
        time.sleep(0.3)
        raise upstream(504)

    # One 0.3 s attempt leaves 0.2 s, less than another attempt is known to take: no second one.
    with pytest.raises(UpstreamError, match=r"after 1 attempt in \d+\.\d s"):
        res.call(slow_failure)


# -- circuit breaker -----------------------------------------------------------
def test_circuit_opens_fails_fast_and_recovers_through_a_probe():
    res, events = make({"max_attempts": 1}, {"failures": 3, "reset_s": 0.2})
    fn = failing(*[upstream(503)] * 3)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            res.call(fn)
    assert res.state == "open" and events.count("circuit_open") == 1
    with pytest.raises(BackendUnavailable, match=r"circuit open .* retry in 1 s") as caught:
        res.call(fn)
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
    assert len(fn.calls) == 3  # failed fast, never called
    time.sleep(0.2)
    assert res.state == "half-open"
    assert res.call(fn) == "ok" and res.state == "closed"


def test_failed_probe_reopens_the_circuit():
    res, events = make({"max_attempts": 1}, {"failures": 2, "reset_s": 0.1})
    fn = failing(*[upstream(500)] * 3)
    for _ in range(2):
        with pytest.raises(UpstreamError):
            res.call(fn)
    time.sleep(0.1)
    with pytest.raises(UpstreamError):  # the probe
        res.call(fn)
    assert res.state == "open" and events.count("circuit_open") == 2
    with pytest.raises(BackendUnavailable):
        res.call(fn)
    assert len(fn.calls) == 3


def test_circuit_opening_mid_call_stops_the_retries():
    res, _ = make({"max_attempts": 10}, {"failures": 2, "reset_s": 5})
    fn = failing(*[upstream(500)] * 10)
    with pytest.raises(BackendUnavailable, match="circuit open"):
        res.call(fn)
    assert len(fn.calls) == 2


def test_rate_limits_and_client_errors_do_not_open_the_circuit():
    res, events = make({"max_attempts": 1}, {"failures": 2})
    for error in [upstream(429), upstream(429), upstream(400, retryable=False), upstream(429)]:
        with pytest.raises(UpstreamError):
            res.call(failing(error))
    assert res.state == "closed" and "circuit_open" not in events


def test_success_resets_the_failure_count():
    res, _ = make({"max_attempts": 1}, {"failures": 2})
    for fn in [failing(upstream()), failing(), failing(upstream()), failing()]:
        try:
            res.call(fn)
        except UpstreamError:
            pass
    assert res.state == "closed"


def test_half_open_lets_one_probe_through():
    res, _ = make({"max_attempts": 1}, {"failures": 1, "reset_s": 0.05})
    with pytest.raises(UpstreamError):
        res.call(failing(upstream()))
    time.sleep(0.05)
    started = threading.Event()

    def slow_probe():
        started.set()
        time.sleep(0.2)
        return "probe"

    with ThreadPoolExecutor(1) as pool:
        probe = pool.submit(res.call, slow_probe)
        started.wait()
        with pytest.raises(BackendUnavailable):
            res.call(lambda: "second")
        assert probe.result() == "probe"
    assert res.call(lambda: "after") == "after"


# -- concurrency ---------------------------------------------------------------
def test_concurrency_cap_is_honoured_under_load():
    res, _ = make(circuit={"failures": 1000}, max_concurrency=3)
    lock, active, peak = threading.Lock(), [0], [0]

    def one_call(_):
        tries = []

        def fn():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.01)
            with lock:
                active[0] -= 1
            tries.append(1)
            if len(tries) == 1:  # each call fails once, then succeeds
                raise upstream(503)
            return "ok"

        return res.call(fn)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one_call, range(24)))
    assert results == ["ok"] * 24 and peak[0] == 3


def test_waiting_for_a_slot_counts_against_the_budget():
    res, _ = make({"budget_s": 0.2}, max_concurrency=1)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(res.call, time.sleep, 0.5)
        time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match="slots stayed busy"):
            res.call(lambda: "never")
        assert time.monotonic() - start < 0.4
        busy.result()


# -- real backends against the fakes -------------------------------------------
@pytest.fixture
def fake():
    with FakeOpenAI(dim=4, api_key=KEY) as fake:
        yield fake


@pytest.fixture
def backend(fake):
    backend = OpenAIBackend(OpenAIOptions(model="m", base_url=fake.url + "/v1", api_key=KEY,
                                          timeout_s=0.3))
    backend.load()
    yield backend
    backend.close()


def test_openai_429_with_retry_after_is_retried(fake, backend):
    fake.inject(status(429, retry_after=0.3))
    res, events = make()
    start = time.monotonic()
    assert res.call(backend.embed, ["a"], "query") == [fake.vector("a")]
    assert time.monotonic() - start >= 0.3
    assert len(fake.requests) == 2 and events.count("429") == 1


@pytest.mark.parametrize("fault", [status(500), status(503), slow(0.6), reset()],
                         ids=["500", "503", "timeout", "reset"])
def test_openai_transient_failures_are_retried(fake, backend, fault):
    fake.inject(fault, times=2)
    res, _ = make()
    assert res.call(backend.embed, ["a", "b"], "passage") == [fake.vector("a"), fake.vector("b")]
    assert len(fake.requests) == 3


def test_openai_budget_exhaustion_names_the_status(fake, backend):
    fake.always(status(503))
    res, _ = make({"max_attempts": 100, "budget_s": 0.6, "base_delay_s": 0.05, "max_delay_s": 0.1},
                  {"failures": 1000})
    start = time.monotonic()
    with pytest.raises(UpstreamError, match=r"openai upstream returned 503 \(upstream server error\) after \d+ attempts"):
        res.call(backend.embed, ["a"], "query")
    assert time.monotonic() - start <= 0.6 + 0.1


def test_openai_timeouts_stay_within_the_budget(fake, backend):
    fake.always(slow(1.0))
    res, _ = make({"budget_s": 0.8})
    start = time.monotonic()
    with pytest.raises(UpstreamError, match=r"timed out \(timeout_s=0.3\) after 2 attempts"):
        res.call(backend.embed, ["a"], "query")
    assert time.monotonic() - start < 0.8


def test_openai_wrong_key_is_not_retried(fake, backend):
    fake.api_key = "another-key"
    res, _ = make()
    with pytest.raises(UpstreamError, match="401"):
        res.call(backend.embed, ["a"], "query")
    assert len(fake.requests) == 1


def test_openai_circuit_fails_fast_then_recovers(fake, backend):
    fake.always(status(500))
    res, _ = make({"max_attempts": 2}, {"failures": 4, "reset_s": 0.3})
    for _ in range(2):
        with pytest.raises(UpstreamError):
            res.call(backend.embed, ["a"], "query")
    assert len(fake.requests) == 4 and res.state == "open"
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match="circuit open"):
        res.call(backend.embed, ["a"], "query")
    assert time.monotonic() - start < 0.05 and len(fake.requests) == 4
    fake.always(None)
    time.sleep(0.3)
    assert res.call(backend.embed, ["a"], "query") == [fake.vector("a")]
    assert res.state == "closed" and len(fake.requests) == 5


def test_openai_concurrency_limit_is_seen_by_the_upstream(fake, backend):
    fake.latency_s = 0.05
    res, _ = make(max_concurrency=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: res.call(backend.embed, [t], "query"), "abcdefgh"))
    assert results == [[fake.vector(t)] for t in "abcdefgh"]
    assert fake.max_in_flight == 2


def test_openai_rate_limited_upstream_is_paced_by_retry_after(fake, backend):
    fake.rate_limit, fake.latency_s = 5, 0.01
    res, events = make({"max_attempts": 10})
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: res.call(backend.embed, [t], "query"), "abcdefgh"))
    assert results == [[fake.vector(t)] for t in "abcdefgh"]
    assert events.count("429") >= 3 and "failure" not in events


def test_cohere_429_is_retried():
    with FakeCohere(dim=4, api_key=KEY) as fake:
        backend = CohereBackend(CohereOptions(base_url=fake.url, api_key=KEY, timeout_s=1))
        backend.load()
        try:
            fake.inject(status(429, retry_after=0.2))
            fake.inject(status(502))
            res, events = make()
            assert res.call(backend.embed, ["a"], "query") == [fake.vector("a", "search_query")]
        finally:
            backend.close()
    assert len(fake.requests) == 3 and events.count("retry") == 2
