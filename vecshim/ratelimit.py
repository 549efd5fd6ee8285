"""What a hosted API says about its rate limits, and an AIMD window of concurrent calls.

Backends turn response headers into an `UpstreamInfo` (`read_openai_headers`,
`read_cohere_headers`); `vecshim.resilience` feeds it to the fleet budget and
to the `Window`, which grows by one call per window of successes and halves
on a 429 or when calls get much slower.
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["UpstreamInfo", "Reply", "Window", "parse_duration",
           "read_openai_headers", "read_cohere_headers", "parse_retry_after"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


@dataclass
class UpstreamInfo:
    """Rate-limit facts from one response (None: not said). Limits are per minute."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None
    #: Tokens the upstream billed for the call (its usage), if it said.
    tokens_used: int | None = None

    def pause_s(self) -> float:
        """Seconds every caller of this account should wait before the next call (0: none)."""
        waits = [self.retry_after_s or 0.0]
        if self.remaining_requests == 0 and self.reset_requests_s:
            waits.append(self.reset_requests_s)
        if self.remaining_tokens == 0 and self.reset_tokens_s:
            waits.append(self.reset_tokens_s)
        return max(waits)


@dataclass
class Reply:
    """A backend call's vectors plus what the upstream said about limits."""

    vectors: Any
    info: UpstreamInfo = field(default_factory=UpstreamInfo)


def parse_duration(value: str | None) -> float | None:
    """Seconds in OpenAI's reset format (`1s`, `6m0s`, `17ms`, `1h2m3.5s`) or a bare number."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        seconds = sum(float(n) * scale[u] for n, u in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Return the wait in seconds that `headers` ask for, or None.

    Reads `retry-after-ms` (sent by OpenAI) before `Retry-After`, which may be
    seconds or an HTTP date. `headers` must look names up case-insensitively
    or use lower-case names.
    """
    import email.utils

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


def _int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        number = int(float(value)) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number >= 0 else None


def read_openai_headers(headers: Mapping[str, str] | None) -> UpstreamInfo:
    """Read OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` and Retry-After."""
    if not headers:
        return UpstreamInfo()
    h = {k.lower(): v for k, v in headers.items()}
    return UpstreamInfo(
        requests_per_minute=_int(h, "x-ratelimit-limit-requests") or None,
        tokens_per_minute=_int(h, "x-ratelimit-limit-tokens") or None,
        remaining_requests=_int(h, "x-ratelimit-remaining-requests"),
        remaining_tokens=_int(h, "x-ratelimit-remaining-tokens"),
        reset_requests_s=parse_duration(h.get("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(h.get("x-ratelimit-reset-tokens")),
        retry_after_s=parse_retry_after(h))


def read_cohere_headers(headers: Mapping[str, str] | None) -> UpstreamInfo:
    """Read what Cohere says: `Retry-After`, and the per-minute call limit of trial keys
    (`x-trial-endpoint-call-limit/-remaining`). Production keys send no limit headers,
    so a known limit belongs in the model's `rate_limit` config."""
    if not headers:
        return UpstreamInfo()
    h = {k.lower(): v for k, v in headers.items()}
    return UpstreamInfo(
        requests_per_minute=_int(h, "x-trial-endpoint-call-limit") or None,
        remaining_requests=_int(h, "x-trial-endpoint-call-remaining"),
        retry_after_s=parse_retry_after(h))


class Window:
    """How many calls may be in flight: additive increase, multiplicative decrease.

    A call holds its place through all its attempts and retry waits, so while
    the upstream pushes back fewer calls are out and texts gather into the
    next one. Each success adds 1/limit (one call per full window of
    successes); a 429 halves the limit, and a call more than `slow_factor` times slower than
    the recent baseline cuts it by 10 %. At most one decrease per `cooldown_s`
    (about one round trip), so one burst of 429s counts once. The limit stays
    at 2 or more (unless the ceiling is 1): the rate budget, not the window,
    is what holds a slow account back.
    """

    def __init__(self, initial: int, maximum: int, *, slow_factor: float = 4.0):
        self.maximum = max(1, maximum)
        # Never below 2 (when allowed): one call stuck retrying must not hold up every text.
        self.minimum = min(2.0, self.maximum)
        self.limit = float(min(max(1, initial), self.maximum))
        self.in_flight = 0
        self.slow_factor = slow_factor
        self._baseline: float | None = None  # EWMA of call seconds
        self._cut_at = 0.0
        self._cond = threading.Condition()

    @property
    def free(self) -> bool:
        """Whether a call could start now."""
        return self.in_flight < int(self.limit)

    def acquire(self, timeout: float) -> bool:
        """Wait up to `timeout` s for room; True once a call may start."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.in_flight >= int(self.limit):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.in_flight += 1
            return True

    def release(self) -> None:
        """End a call (all its attempts)."""
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def observe(self, outcome: str, seconds: float) -> None:
        """Adapt to one attempt: `outcome` is "ok", "429" or "error"; `seconds` its duration."""
        with self._cond:
            now = time.monotonic()
            if outcome == "429":
                self._decrease(now, 0.5, seconds)
            elif outcome == "ok":
                base = self._baseline
                if base is not None and seconds > self.slow_factor * base and seconds > 0.05:
                    self._decrease(now, 0.9, seconds)
                else:
                    self.limit = min(self.maximum, self.limit + 1.0 / self.limit)
                self._baseline = seconds if base is None else 0.9 * base + 0.1 * seconds
            self._cond.notify_all()  # the limit may have grown

    def _decrease(self, now: float, factor: float, seconds: float) -> None:
        if now >= self._cut_at:
            self.limit = max(self.minimum, self.limit * factor)
            self._cut_at = now + max(0.05, seconds)
