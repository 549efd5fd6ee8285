"""Retries, a circuit breaker and a concurrency cap around calls to a hosted backend.

The core wraps every `Backend.embed()` call of a model in `Resilience.call()`.
Backends only say what went wrong (an `UpstreamError` with `retryable` and
`retry_after`); this module decides when to try again and when to stop.
For a hosted API it also paces calls with the account's fleet budget
(`vecshim.budget`) and an AIMD window of concurrent calls (`vecshim.ratelimit`),
and books the next call's slot for the batcher (`admit()`), which gathers
texts until then.
"""
from __future__ import annotations

import math
import random
import threading
import time
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .errors import BackendUnavailable, UpstreamError
from .ratelimit import Reply, UpstreamInfo, Window, parse_retry_after

__all__ = ["RetryPolicy", "CircuitPolicy", "Resilience", "parse_retry_after"]

T = TypeVar("T")
#: How long after its slot a request booked by `admit()` may still be used.
TICKET_S = 1.0


class RetryPolicy(BaseModel):
    """How often and how long to retry a retryable upstream failure.

    `budget_s` bounds the whole call, sleeps included. Keep it below the
    caller's own timeout (Weaviate gives a module 50 s by default). Attempts
    go on until the budget runs out unless `max_attempts` caps them.
    """

    model_config = ConfigDict(extra="forbid")

    max_attempts: int | None = Field(None, ge=1)
    budget_s: float = Field(40.0, gt=0)
    base_delay_s: float = Field(0.2, ge=0)
    max_delay_s: float = Field(8.0, ge=0)


class CircuitPolicy(BaseModel):
    """When to stop calling a failing upstream, and when to try it again.

    After `failures` consecutive failed attempts the circuit opens and calls
    fail fast for `reset_s`; then one probe call is let through, and its
    success closes the circuit while its failure opens it again.
    """

    model_config = ConfigDict(extra="forbid")

    failures: int = Field(5, ge=1)
    reset_s: float = Field(10.0, gt=0)


class Resilience:
    """Run calls to one upstream with a concurrency cap, retries and a circuit breaker.

    Only `UpstreamError`s with `retryable=True` are retried, after a
    full-jitter exponential backoff that is at least the error's
    `retry_after`, and only while the wait plus another attempt as long as
    the last one fit in the budget. Consecutive retryable failures other than 429 open the
    circuit: a 429 means the upstream is up and pacing us, which backoff
    handles. `on_event(kind)` is called with "call" (an attempt starts),
    "retry" (a failed attempt will be retried), "429" (the upstream said
    429), "failure" (`call()` raises) and "circuit_open" (the circuit opens);
    it must not raise. Instances are thread-safe.

    With a `budget` (hosted backends) the cap is an AIMD `Window` starting at
    `max_concurrency`, each attempt first reserves the budget, and a call may
    return a `Reply` whose upstream facts the budget learns from.
    """

    def __init__(self, retry: RetryPolicy, circuit: CircuitPolicy, max_concurrency: int | None,
                 name: str, on_event: Callable[[str], None] | None = None, *,
                 budget=None, on_window: Callable[[float, int], None] | None = None):
        self.retry = retry
        self.circuit = circuit
        self.name = name
        self.max_concurrency = max_concurrency
        self.budget = budget
        self._on_event = on_event or (lambda kind: None)
        self._on_window = on_window
        self.window = Window(max_concurrency or 1, max_concurrency or 1) if budget is not None else None
        self._slots = (threading.BoundedSemaphore(max_concurrency)
                       if max_concurrency and self.window is None else None)
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probing = False
        self._listeners: list[Callable[[], None]] = []
        self._ticket = threading.local()  # a request booked by admit() for this thread's next call

    @property
    def state(self) -> str:
        """Return "closed", "open" or "half-open" (a probe may go through)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "open" if time.monotonic() < self._opened_at + self.circuit.reset_s else "half-open"

    def admit(self) -> tuple[bool, float]:
        """For a batch worker about to call: (booked, seconds until the call may go).

        With room in the concurrency window, books this thread's next request
        in the rate budget (its first attempt then reserves only tokens) and
        returns (True, wait). Otherwise (False, inf) when the window is full,
        or (False, wait) when the budget has no slot within the retry budget.
        The worker gathers texts meanwhile, so they leave in one larger call.
        """
        if self.window is not None and not self.window.free:
            return False, math.inf
        if self.budget is None or self.state != "closed":
            return True, 0.0  # an open circuit fails fast; let it
        try:
            wait = self.budget.reserve(0, max_wait=self.retry.budget_s)
        except Exception:  # a broken store must not stop the batcher; call() reports it
            return True, 0.0
        if wait > self.retry.budget_s:
            return False, wait
        self._ticket.until = time.monotonic() + wait + TICKET_S
        return True, wait

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` when a call ends (room may have opened)."""
        self._listeners.append(listener)

    def call(self, fn: Callable[..., T], *args: Any, tokens: int = 0, **kwargs: Any) -> T:
        """Return `fn(*args, **kwargs)`, retrying retryable upstream failures within the budget.

        `tokens`: the call's estimated tokens, reserved from the rate budget.
        """
        try:
            if self.window is None:
                return self._call(fn, args, kwargs, tokens, None)
            place = _Place(self)
            place.take(time.monotonic() + self.retry.budget_s)
            try:
                return self._call(fn, args, kwargs, tokens, place)
            finally:
                place.leave()
        except Exception:
            self._on_event("failure")
            raise

    def _window_changed(self) -> None:
        if self._on_window:
            self._on_window(self.window.limit, self.window.in_flight)
        for listener in list(self._listeners):
            listener()

    def _call(self, fn, args, kwargs, tokens, place):
        start = time.monotonic()
        deadline = start + self.retry.budget_s
        attempt = 0
        while True:
            attempt += 1
            self._admit()
            began = time.monotonic()
            try:
                result = self._attempt(fn, args, kwargs, deadline, tokens)
            except UpstreamError as err:
                self._record(err)
                if not err.retryable:
                    raise
                now = time.monotonic()
                delay = self._delay(attempt, err.retry_after)
                if err.upstream_status == 429 and self.budget is not None:
                    # Everyone on this account waits, not just this call.
                    self.budget.pause(err.retry_after if err.retry_after is not None else delay)
                    self.budget.rate_limited()
                # A next attempt as slow as this one (a timeout, say) must still fit the budget.
                capped = self.retry.max_attempts is not None and attempt >= self.retry.max_attempts
                if capped or now + delay + (now - began) > deadline:
                    raise self._give_up(err, attempt, now - start, delay) from err
                self._on_event("retry")
                if place is not None:  # let other calls go meanwhile
                    place.leave()
                time.sleep(delay)
                if place is not None:
                    place.take(deadline)
                continue
            except BaseException:
                self._release_probe()
                raise
            self._record(None)
            return result

    def _attempt(self, fn, args, kwargs, deadline, tokens):
        if self.window is not None:
            return self._paced_attempt(fn, args, kwargs, deadline, tokens)
        if self._slots is None:
            self._on_event("call")
            return fn(*args, **kwargs)
        # Waiting for a slot spends the same budget the caller is waiting on.
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise BackendUnavailable(
                f"{self.name}: all {self.max_concurrency} upstream slots stayed busy "
                f"for the {self.retry.budget_s:g} s budget")
        try:
            self._on_event("call")
            return fn(*args, **kwargs)
        finally:
            self._slots.release()

    def _paced_attempt(self, fn, args, kwargs, deadline, tokens):
        """One attempt within the budget; learn from what the upstream says."""
        outcome, began = "error", time.monotonic()
        try:
            self._reserve(tokens, deadline)
            began = time.monotonic()
            self._on_event("call")
            try:
                result = fn(*args, **kwargs)
            except UpstreamError as err:
                outcome = "429" if err.upstream_status == 429 else "error"
                self._learn(getattr(err, "info", None), tokens, False)
                raise
            outcome = "ok"
            if isinstance(result, Reply):
                result, info = result.vectors, result.info
            else:
                info = None
            self._learn(info, tokens, True)
            return result
        finally:
            if outcome != "429":
                self.budget.accepted()
            self.window.observe(outcome, time.monotonic() - began)
            self._window_changed()

    def _reserve(self, tokens: int, deadline: float) -> None:
        """Book this attempt in the budget and wait for its slot, or raise if that is past the deadline."""
        booked = getattr(self._ticket, "until", 0.0) >= time.monotonic()
        self._ticket.until = 0.0
        wait = self.budget.reserve(tokens, requests=not booked, max_wait=deadline - time.monotonic())
        if time.monotonic() + wait > deadline:
            retry_in = max(1, math.ceil(wait))
            raise BackendUnavailable(
                f"{self.name}: the upstream's rate budget has no room for {wait:.1f} s, beyond "
                f"the {self.retry.budget_s:g} s retry budget", headers={"Retry-After": str(retry_in)})
        if wait > 0:
            time.sleep(wait)

    def _learn(self, info: UpstreamInfo | None, tokens: int, ok: bool) -> None:
        if info is not None:
            self.budget.learn(info)
        if ok:  # the upstream's own count when it gave one
            used = info.tokens_used if info is not None and info.tokens_used is not None else tokens
            self.budget.settle(tokens, used)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.retry.max_delay_s, self.retry.base_delay_s * 2 ** (attempt - 1))
        return max(random.uniform(0, cap), retry_after or 0.0)

    def _give_up(self, err: UpstreamError, attempt: int, elapsed: float, delay: float) -> UpstreamError:
        message = f"{err.message} after {attempt} attempt{'s' if attempt > 1 else ''} in {elapsed:.1f} s"
        if self.retry.max_attempts is None or attempt < self.retry.max_attempts:
            message += f" (another attempt after {delay:.1f} s would not fit the {self.retry.budget_s:g} s budget)"
        final = UpstreamError(message, upstream_status=err.upstream_status,
                              retry_after=err.retry_after, retryable=True)
        if err.retry_after is not None:
            final.headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
        return final
    def _admit(self) -> None:
        """Let an attempt through, or fail fast while the circuit is open or probing."""
        with self._lock:
            if self._opened_at is None:
                return
            wait = self._opened_at + self.circuit.reset_s - time.monotonic()
            if wait <= 0 and not self._probing:
                self._probing = True
                return
        retry_in = max(1, math.ceil(wait))
        raise BackendUnavailable(
            f"{self.name}: circuit open after {self.circuit.failures} consecutive upstream "
            f"failures; retry in {retry_in} s", headers={"Retry-After": str(retry_in)})

    def _record(self, err: UpstreamError | None) -> None:
        """Update the circuit with an attempt's outcome (None: success)."""
        if err is not None and err.upstream_status == 429:
            self._on_event("429")
        counted = err is not None and err.retryable and err.upstream_status != 429
        opened = False
        with self._lock:
            if not counted:
                # Any answer but a failure shows the upstream is reachable.
                self._failures, self._opened_at, self._probing = 0, None, False
                return
            self._failures += 1
            if self._probing or (self._opened_at is None and self._failures >= self.circuit.failures):
                self._opened_at, self._probing, opened = time.monotonic(), False, True
        if opened:
            self._on_event("circuit_open")

    def _release_probe(self) -> None:
        with self._lock:
            self._probing = False


class _Place:
    """A call's place in its Resilience's AIMD window."""

    def __init__(self, res: Resilience):
        self.res = res
        self.held = False

    def take(self, deadline: float) -> None:
        if not self.res.window.acquire(max(0.0, deadline - time.monotonic())):
            raise BackendUnavailable(f"{self.res.name}: no upstream call slot freed up within the "
                                     f"{self.res.retry.budget_s:g} s budget")
        self.held = True

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.res.window.release()
            self.res._window_changed()
