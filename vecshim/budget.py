"""One rate budget per upstream account, shared by every caller that can reach it.

A budget paces requests and tokens per minute with a virtual schedule (GCRA):
each call reserves one request and its estimated tokens before it goes out,
moving the account's schedule forward, and settles the real token count
after. A call may start while the schedule is at most `burst` seconds
ahead of now. A 429's Retry-After pauses the whole account.

Where the schedule lives decides who shares it:

* Redis (`budget.redis_url`, else `cache.redis_url`): every worker of every
  replica. One Lua script makes each step atomic; keys carry the account in a
  hash tag, so Redis Cluster keeps them on one slot.
* the replica's folder (`vecshim serve`'s shared metrics folder): every worker
  of the replica, through a locked file.
* memory: this process.

When Redis fails, the budget falls back to the replica's store with the
limits divided by `budget.expected_replicas`, logs it, sets the
`vecshim_budget_fallback` gauge and says so in `/meta`; it tries Redis again
every `RETRY_REDIS_S`.
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ConfigError
from .ratelimit import UpstreamInfo

__all__ = ["RateLimit", "BudgetConfig", "Budget", "Fleet", "account_id", "step"]

log = logging.getLogger("vecshim.budget")

#: Seconds between attempts to get back to Redis after a failure.
RETRY_REDIS_S = 5.0
#: How far ahead of now the request schedule may run (a call's burst allowance).
REQUEST_BURST_S = 0.05
#: The same for tokens: one call may carry many, so allow a second's worth ahead.
TOKEN_BURST_S = 1.0
#: An inferred request limit never drops below this (requests per minute).
MIN_INFERRED_RPM = 6.0
#: A schedule further ahead than this is stale (a clock jump): start over.
STALE_S = 600.0


class RateLimit(BaseModel):
    """A known limit of the upstream account (both optional)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class BudgetConfig(BaseModel):
    """Where hosted models keep their shared rate budget."""

    model_config = ConfigDict(extra="forbid")

    #: Redis holding the fleet's budget (None: the cache's redis_url, if any).
    redis_url: str | None = None
    #: Replicas sharing the account: while Redis is down, each takes 1/n of the limits.
    expected_replicas: int = Field(1, ge=1)
    redis_timeout_s: float = Field(0.2, gt=0)
    #: Fraction of a known limit to use, leaving room for clock skew and jitter.
    headroom: float = Field(0.9, gt=0, le=1)

    @field_validator("redis_url")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None


def account_id(endpoint: str, key: str | None) -> str:
    """A short id of (endpoint, key): same account, same id; the key cannot be recovered."""
    return hashlib.sha256(f"{endpoint}\x00{key or ''}".encode()).hexdigest()[:16]


def step(state: dict, now: float, op: str, rr: float, tr: float, n: float,
         max_wait: float = -1.0) -> tuple[float, float, float]:
    """Apply one budget operation to `state` (rt, tt, pu) in place.

    `rr`/`tr`: requests and tokens per second (0: not counted); `n`: tokens
    (reserve, settle: the correction) or seconds (pause). `reserve` books the
    next slot when it is at most `max_wait` s away (so callers queue up in
    order, none starves) and returns the wait until it; a negative `max_wait`
    only looks. Returns (wait, how far ahead of now the request and token
    schedules run). Mirrors `_LUA` line by line; tests check they agree.
    """
    rt, tt, pu = state.get("rt", 0.0), state.get("tt", 0.0), state.get("pu", 0.0)
    wait = 0.0
    if op == "settle":
        if tr > 0:
            tt = state["tt"] = tt + n / tr
    elif op == "pause":
        pu = state["pu"] = max(pu, now + n)
    else:
        wait = max(0.0, pu - now)
        if rr > 0:
            wait = max(wait, max(rt, now) - now - REQUEST_BURST_S)
        if tr > 0:
            wait = max(wait, max(tt, now) - now - TOKEN_BURST_S)
        if wait <= max_wait:
            if rr > 0:
                rt = state["rt"] = max(rt, now) + 1.0 / rr
            if tr > 0:
                tt = state["tt"] = max(tt, now) + n / tr
    return wait, max(rt, now) - now, max(tt, now) - now


_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, rr, tr, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rb, tb, ttl, mw = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local s = redis.call('HMGET', KEYS[1], 'rt', 'tt', 'pu')
local rt, tt, pu = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0
local wait = 0
if op == 'settle' then
  if tr > 0 then
    tt = tt + n / tr
    redis.call('HSET', KEYS[1], 'tt', string.format('%.6f', tt))
  end
elseif op == 'pause' then
  if now + n > pu then
    pu = now + n
    redis.call('HSET', KEYS[1], 'pu', string.format('%.6f', pu))
  end
else
  wait = math.max(0, pu - now)
  if rr > 0 then wait = math.max(wait, math.max(rt, now) - now - rb) end
  if tr > 0 then wait = math.max(wait, math.max(tt, now) - now - tb) end
  if wait <= mw then
    if rr > 0 then
      rt = math.max(rt, now) + 1 / rr
      redis.call('HSET', KEYS[1], 'rt', string.format('%.6f', rt))
    end
    if tr > 0 then
      tt = math.max(tt, now) + n / tr
      redis.call('HSET', KEYS[1], 'tt', string.format('%.6f', tt))
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return string.format('%.6f %.6f %.6f', wait, math.max(rt, now) - now, math.max(tt, now) - now)
"""


class MemoryStore:
    """The schedule in this process."""

    kind = "process"

    def __init__(self):
        self._states: dict[str, dict] = {}
        self._lock = threading.Lock()

    def run(self, account: str, op: str, rr: float, tr: float, n: float,
            max_wait: float = -1.0) -> tuple[float, float, float]:
        with self._lock:
            state = self._states.setdefault(account, {})
            return step(state, time.monotonic(), op, rr, tr, n, max_wait)


class FileStore:
    """The schedule in a locked file of the replica's folder: shared by its workers."""

    kind = "replica"

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def run(self, account: str, op: str, rr: float, tr: float, n: float,
            max_wait: float = -1.0) -> tuple[float, float, float]:
        path = self.folder / f"budget-{account}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 4096, 0)
            now = time.time()
            try:
                state = json.loads(raw) if raw else {}
            except ValueError:
                state = {}
            if any(v > now + STALE_S for v in state.values()):
                state = {}
            result = step(state, now, op, rr, tr, n, max_wait)
            if op != "reserve" or result[0] <= max_wait:
                data = json.dumps(state).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            return result
        finally:
            os.close(fd)  # releases the lock


class RedisStore:
    """The schedule in Redis, one hash per account: `vecshim:budget:{<account>}`."""

    kind = "redis"

    def __init__(self, url: str, timeout_s: float):
        try:
            import redis
        except ImportError:
            raise ConfigError("budget.redis_url needs: pip install 'vecshim[redis]'") from None

        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_LUA)
        self.errors = (redis.RedisError, OSError)

    def run(self, account: str, op: str, rr: float, tr: float, n: float,
            max_wait: float = -1.0) -> tuple[float, float, float]:
        ttl_ms = int(max(120.0, 2 * STALE_S) * 1000)
        raw = self._script(keys=[f"vecshim:budget:{{{account}}}"],
                           args=[op, repr(rr), repr(tr), repr(float(n)), repr(REQUEST_BURST_S),
                                 repr(TOKEN_BURST_S), ttl_ms, repr(min(max_wait, 1e9))])
        wait, ahead_r, ahead_t = (float(x) for x in raw.split())
        return wait, ahead_r, ahead_t


class Budget:
    """The rate budget of one upstream account, as this process sees it.

    Limits come from the model's `rate_limit` config and from the upstream's
    headers (the lower wins). Thread-safe; `on_change()` is called when
    `info()` changes (a limit learned, Redis lost or back).
    """

    def __init__(self, account: str, label: str, cfg: BudgetConfig, *, redis_url: str | None,
                 local_dir: str | None, stats=None):
        self.account = account
        self.label = label
        self.cfg = cfg
        self.stats = stats
        self.configured = RateLimit()
        self.learned = RateLimit()
        self._local = FileStore(local_dir) if local_dir else MemoryStore()
        self._redis = RedisStore(redis_url, cfg.redis_timeout_s) if redis_url else None
        self._redis_down_until = 0.0
        self._fallback = False
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        #: Requests per minute inferred from 429s when no limit is known (AIMD-like).
        self.inferred: float | None = None
        self._recent: collections.deque[float] = collections.deque(maxlen=4096)
        self._429s: collections.deque[float] = collections.deque(maxlen=4096)
        self._changed_at = 0.0

    # -- limits -----------------------------------------------------------
    def configure(self, limit: RateLimit | None) -> None:
        """Use `limit` (a model's `rate_limit`) when it is lower than what we know."""
        if limit is None:
            return
        with self._lock:
            self.configured = RateLimit(
                requests_per_minute=_lower(self.configured.requests_per_minute, limit.requests_per_minute),
                tokens_per_minute=_lower(self.configured.tokens_per_minute, limit.tokens_per_minute))
        self._publish()

    def learn(self, info: UpstreamInfo) -> None:
        """Take the limits and the pause an upstream response announced."""
        changed = False
        with self._lock:
            for name in ("requests_per_minute", "tokens_per_minute"):
                value = getattr(info, name)
                if value and value != getattr(self.learned, name):
                    setattr(self.learned, name, value)
                    changed = True
        pause = info.pause_s()
        if pause > 0:
            self.pause(pause)
        if changed:
            log.info("upstream %s announced its limits: %s requests/min, %s tokens/min", self.label,
                     self.learned.requests_per_minute or "?", self.learned.tokens_per_minute or "?")
            self._publish()

    def per_minute(self) -> tuple[int | None, int | None]:
        """The limits in force (requests, tokens per minute), before headroom and sharing."""
        c, k = self.configured, self.learned
        return (_lower(c.requests_per_minute, k.requests_per_minute),
                _lower(c.tokens_per_minute, k.tokens_per_minute))

    def _rates(self, share: int) -> tuple[float, float]:
        rpm, tpm = self.per_minute()
        scale = self.cfg.headroom / 60.0 / share
        if rpm is None and self.inferred is not None:
            return self.inferred / 60.0 / share, (tpm or 0) * scale  # already below the limit
        return (rpm or 0) * scale, (tpm or 0) * scale

    # -- a limit nobody announced -------------------------------------------
    def accepted(self) -> None:
        """Count an attempt the upstream took (any answer but 429, errors included: they
        count against its limit too); an inferred rate grows 5 % per second without a 429."""
        now = time.monotonic()
        with self._lock:
            self._recent.append(now)
            if self.inferred is not None and now - self._changed_at >= 1.0:
                self.inferred *= 1.05 ** min(now - self._changed_at, 10.0)
                self._changed_at = now

    def rate_limited(self) -> None:
        """A 429 arrived: with no limit announced or configured, infer one (or lower it by 30 %)."""
        if self.per_minute()[0] is not None:
            return
        now = time.monotonic()
        with self._lock:
            self._429s.append(now)
            limited = sum(1 for t in self._429s if t > now - 2.0)
            taken = sum(1 for t in self._recent if t > now - 2.0)
            if limited < 2 or limited < 0.2 * (limited + taken):
                return  # a stray 429 is Retry-After's business; frequent ones mean we are too fast
            if now - self._changed_at < 1.0:
                return  # one cut per second, however many 429s a burst brought
            pace = taken / 2.0 * 60.0  # accepted per minute
            if self.inferred is None:
                if pace < 60.0:
                    return  # nothing to go by yet: Retry-After and the window pace us
                self.inferred = max(MIN_INFERRED_RPM, pace)
            elif pace >= 0.8 * self.inferred:
                self.inferred = max(MIN_INFERRED_RPM, self.inferred * 0.7)
            else:
                return  # calls go slower than the pace anyway: this 429 is no sign of it
            self._changed_at = now
            rpm = self.inferred
        log.info("upstream %s announces no request limit and answered 429: pacing at %.0f requests/min",
                 self.label, rpm)
        self._publish()

    # -- operations -------------------------------------------------------
    def reserve(self, tokens: int, *, requests: bool = True, max_wait: float = 0.0) -> float:
        """Book the next slot for one request (unless `requests` is false) and `tokens`,
        if it is at most `max_wait` s away; return the wait until it (booked: <= max_wait)."""
        wait = self._run("reserve", tokens, max_wait, requests)
        if wait <= max_wait and requests and self.stats:
            self.stats.budget_used(self.label, "requests", 1)
        return wait

    def peek(self) -> float:
        """Seconds until a call could go (0: now), without booking anything."""
        return self._run("reserve", 0, -1.0)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct a reservation of `estimated` tokens to the `actual` count."""
        if self.stats:
            self.stats.budget_used(self.label, "tokens", actual)
        if actual != estimated and self._rates(1)[1] > 0:
            self._run("settle", actual - estimated)

    def pause(self, seconds: float) -> None:
        """Hold every call to this account for `seconds` (a 429's Retry-After)."""
        self._run("pause", seconds)

    def _run(self, op: str, n: float, max_wait: float = -1.0, requests: bool = True) -> float:
        now = time.monotonic()
        result = None
        if self._redis is not None and now >= self._redis_down_until:
            rr, tr = self._rates(1)
            try:
                result = self._redis.run(self.account, op, rr if requests else 0.0, tr, n, max_wait)
            except self._redis.errors as err:
                self._redis_down_until = now + RETRY_REDIS_S
                self._set_fallback(True, err)
            else:
                self._set_fallback(False)
        if result is None:
            rr, tr = self._rates(self.cfg.expected_replicas if self._fallback else 1)
            result = self._local.run(self.account, op, rr if requests else 0.0, tr, n, max_wait)
        wait, ahead_r, ahead_t = result
        if self.stats:
            # What could still be reserved over the next minute at the current pace.
            self.stats.budget_left(self.label, rr * max(0.0, 60 - ahead_r) if rr else None,
                                   tr * max(0.0, 60 - ahead_t) if tr else None)
        return wait

    def _set_fallback(self, on: bool, err: BaseException | None = None) -> None:
        with self._lock:
            if on == self._fallback:
                return
            self._fallback = on
        if on:
            log.error("budget for upstream %s: Redis unreachable (%s); each replica now uses 1/%d of "
                      "the limits (budget.expected_replicas) until Redis is back", self.label,
                      type(err).__name__, self.cfg.expected_replicas)
        else:
            log.warning("budget for upstream %s: Redis is back; the fleet shares one budget again", self.label)
        self._publish()

    # -- reporting --------------------------------------------------------
    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever `info()` changes."""
        self._listeners.append(listener)

    def _publish(self) -> None:
        if self.stats:
            rpm, tpm = self.per_minute()
            self.stats.budget_state(self.label, rpm, tpm, self._fallback)
        for listener in list(self._listeners):
            listener()

    def info(self) -> dict[str, Any]:
        """The budget's entry in `/meta` (never the key)."""
        rpm, tpm = self.per_minute()
        store = self._redis.kind if self._redis is not None and not self._fallback else self._local.kind
        out: dict[str, Any] = {
            "upstream": self.label, "account": self.account, "store": store,
            "limits_per_minute": {"requests": rpm, "tokens": tpm},
            "configured": self.configured.model_dump(), "learned": self.learned.model_dump(),
            **({"inferred_requests_per_minute": round(self.inferred)}
               if self.inferred is not None and rpm is None else {}),
            "headroom": self.cfg.headroom,
        }
        if self._fallback:
            out["fallback"] = (f"Redis unreachable: this replica uses 1/{self.cfg.expected_replicas} "
                               f"of the limits")
        return out


def _lower(a: int | None, b: int | None) -> int | None:
    return min(a, b) if a and b else (a or b)


class Fleet:
    """The budgets of one app's hosted models, one per upstream account (models on one account share it)."""

    def __init__(self, cfg: BudgetConfig, *, redis_url: str | None, local_dir: str | None, stats=None):
        self.cfg = cfg
        self.redis_url = redis_url
        self.local_dir = local_dir
        self.stats = stats
        self._budgets: dict[str, Budget] = {}
        self._lock = threading.Lock()

    def budget(self, account: str, label: str) -> Budget:
        """The Budget of `account` (`label`: the upstream host, for logs and metrics)."""
        with self._lock:
            budget = self._budgets.get(account)
            if budget is None:
                budget = self._budgets[account] = Budget(
                    account, label, self.cfg, redis_url=self.redis_url, local_dir=self.local_dir,
                    stats=self.stats)
            return budget
