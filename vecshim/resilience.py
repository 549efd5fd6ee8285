"""Retries, a circuit breaker and a concurrency cap around calls to a hosted backend.

The core wraps every `Backend.embed()` call of a model in `Resilience.call()`.
Backends only say what went wrong (an `UpstreamError` with `retryable` and
`retry_after`); this module decides when to try again and when to stop.
"""
from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from typing import Any, Callable, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .errors import BackendUnavailable, UpstreamError

__all__ = ["RetryPolicy", "CircuitPolicy", "Resilience", "parse_retry_after"]

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How often and how long to retry a retryable upstream failure.

    `budget_s` bounds the whole call, sleeps included. Keep it below the
    caller's own timeout (Weaviate gives a module 50 s by default).
    """

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(5, ge=1)
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


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Return the wait in seconds that `headers` ask for, or None.

    Reads `retry-after-ms` (sent by OpenAI) before `Retry-After`, which may be
    seconds or an HTTP date. `headers` must look names up case-insensitively
    or use lower-case names.
    """
    if not headers:
        return None
    get = headers.get
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = get(name) or get(name.title())
        if not value:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if scale != 1.0:
                continue
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


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
    """

    def __init__(self, retry: RetryPolicy, circuit: CircuitPolicy, max_concurrency: int | None,
                 name: str, on_event: Callable[[str], None] | None = None):
        self.retry = retry
        self.circuit = circuit
        self.name = name
        self.max_concurrency = max_concurrency
        self._on_event = on_event or (lambda kind: None)
        self._slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probing = False

    @property
    def state(self) -> str:
        """Return "closed", "open" or "half-open" (a probe may go through)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "open" if time.monotonic() < self._opened_at + self.circuit.reset_s else "half-open"

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Return `fn(*args, **kwargs)`, retrying retryable upstream failures within the budget."""
        try:
            return self._call(fn, args, kwargs)
        except Exception:
            self._on_event("failure")
            raise

    def _call(self, fn, args, kwargs):
        start = time.monotonic()
        deadline = start + self.retry.budget_s
        attempt = 0
        while True:
            attempt += 1
            self._admit()
            began = time.monotonic()
            try:
                result = self._attempt(fn, args, kwargs, deadline)
            except UpstreamError as err:
                self._record(err)
                if not err.retryable:
                    raise
                now = time.monotonic()
                delay = self._delay(attempt, err.retry_after)
                # A next attempt as slow as this one (a timeout, say) must still fit the budget.
                if attempt >= self.retry.max_attempts or now + delay + (now - began) > deadline:
                    raise self._give_up(err, attempt, now - start, delay) from err
                self._on_event("retry")
                time.sleep(delay)
                continue
            except BaseException:
                self._release_probe()
                raise
            self._record(None)
            return result

    def _attempt(self, fn, args, kwargs, deadline):
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

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.retry.max_delay_s, self.retry.base_delay_s * 2 ** (attempt - 1))
        return max(random.uniform(0, cap), retry_after or 0.0)

    def _give_up(self, err: UpstreamError, attempt: int, elapsed: float, delay: float) -> UpstreamError:
        message = f"{err.message} after {attempt} attempt{'s' if attempt > 1 else ''} in {elapsed:.1f} s"
        if attempt < self.retry.max_attempts:
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
