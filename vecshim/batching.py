"""Micro-batcher: gathers concurrent requests' texts into backend calls, fairly.

Interface (all a model needs)::

    futures = batcher.submit(texts, tokens, key, deadline=...)  # one Future per text
    vectors = batcher.wait(futures, timeout, gone=...)         # or use the futures directly

`texts` are opaque to the batcher (strings, or pre-tokenized inputs): it
passes them to `embed_fn(texts, key)` unchanged and only reads `tokens`.
A caller cancels with `future.cancel()` (or `batcher.discard(futures)`),
and cancelled or expired texts are never computed.
"""
from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from typing import Callable, Hashable, Sequence

from .batchplan import plan_groups
from .errors import BackendUnavailable, ClientGone, InferenceTimeout, Overloaded, PayloadTooLarge, UpstreamError

__all__ = ["Batcher", "plan_groups", "caller_gone", "caller_source"]

#: Set by the server for each request: a function telling whether its client hung up.
caller_gone: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "vecshim_caller_gone", default=None)
#: Set by the engine for each worker connection: who sent the request (the HTTP worker's pid).
#: Each request keeps it, so a backend call knows how many senders it serves (`on_sources`).
caller_source: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar(
    "vecshim_caller_source", default=None)
#: How often a waiting request checks whether its client is still there.
GONE_POLL_S = 0.5

log = logging.getLogger("vecshim.batching")
#: Gate: how many recent calls' outstanding texts (queued + in flight) make a full call.
PEAK_TAKES = 8


def _is_transient(err: BaseException) -> bool:
    # Splitting a batch helps only when one bad text broke it, not when the
    # upstream itself is failing.
    return isinstance(err, BackendUnavailable) or (isinstance(err, UpstreamError) and err.retryable)


class _Job:
    """One submit() call: its texts in order, their futures, its deadline, its sender."""

    __slots__ = ("key", "units", "next", "deadline", "enqueued", "dropped", "source")

    def __init__(self, key: Hashable, units: list, deadline: float | None, source: Hashable | None = None):
        self.key = key
        self.source = source
        self.units = units
        self.next = 0  # index of the first text not yet taken
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.dropped = False  # caller gone or deadline passed: compute nothing more


class _Unit:
    __slots__ = ("text", "tokens", "future", "job")

    def __init__(self, text, tokens: int, future: Future, job: _Job):
        self.text, self.tokens, self.future, self.job = text, tokens, future, job


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled or expired meanwhile: nobody is waiting
        pass


class Batcher:
    """One queue per model; encoder threads take fair batches of same-key texts.

    Fairness: a batch takes texts round-robin from the waiting requests (one
    text from each in turn, up to `max_size`), and requests that contributed
    move to the back of the queue, so a request with thousands of windows
    shares the encoder with single-text requests instead of holding it.

    Bounds: a request over `max_request_tokens` is refused (413); the queue
    holds at most `max_queue` texts and `max_queue_tokens` tokens (503 with
    Retry-After beyond), except that a request of at most `small_tokens`
    tokens is only bounded by `max_queue`, so light clients are not refused
    because of one heavy one. Texts whose caller gave up, or whose
    request's deadline passed, are dropped, not computed.

    A worker does not wait when it finds a single text queued and the load is
    sequential (nothing in flight, last batch of one); otherwise it waits up
    to `max_wait_ms` after the oldest request arrived for the batch to fill.

    With a `gate` (hosted backends) coalescing adapts instead: one worker at
    a time asks `gate.admit()` for the next call's slot, sleeps until it and
    then takes everything queued (up to `max_size`), so texts pile up while
    calls are in flight or the upstream pushes back, and a lone text on an
    idle upstream goes at once. Before asking, a worker holds the queue (see
    `_hold_locked`) while a call is in flight, or one has just ended, and fewer
    texts are queued than recent calls had outstanding: one call carrying
    everything beats two concurrent half-full ones when the upstream counts
    calls. `gate.subscribe(fn)` wakes workers when a call ends.
    """

    def __init__(self, name: str, embed_fn: Callable[[list, Hashable], Sequence], *,
                 max_size: int, max_wait_ms: float, workers: int, max_queue: int,
                 max_request_tokens: int | None = None, max_queue_tokens: int | None = None,
                 small_tokens: int = 512,
                 backend_max_size: int | None = None, max_batch_tokens: int | None = None,
                 cost: tuple[float, float, float] | None = None,
                 on_batch: Callable[[int, float, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_sources: Callable[[int], None] | None = None,
                 thread_init: Callable[[], None] | None = None,
                 stuck_after_s: float | None = None, gate=None, inline: bool = False):
        self.name = name
        self.embed_fn = embed_fn
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_request_tokens = max_request_tokens
        self.max_queue_tokens = max_queue_tokens
        self.small_tokens = small_tokens
        self.call_max_size = min(max_size, backend_max_size or max_size)
        self.max_batch_tokens = max_batch_tokens
        self.cost = cost
        self.on_batch = on_batch
        self.on_depth = on_depth
        self.on_sources = on_sources
        self.thread_init = thread_init
        self.gate = gate
        self.inline = inline and gate is None
        self._admitting = False  # a worker holds the gate's next slot
        self._calls_out = 0       # gate: batches taken and not yet done
        self._call_s: float | None = None  # gate: EWMA of a batch's seconds
        self._last_end = 0.0      # gate: when the last batch ended
        self._peaks: collections.deque[int] = collections.deque(maxlen=PEAK_TAKES)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued = 0          # texts waiting (not yet taken)
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0
        self._last_size = 0
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._calls: dict[int, float] = {}  # thread id -> start of its current backend call
        self._stuck: set[int] = set()       # threads replaced while hung; they retire on return
        if gate is not None:
            gate.subscribe(self._wake)
        for _ in range(workers):
            self._spawn()
        if stuck_after_s:
            threading.Thread(target=self._watch, args=(stuck_after_s,), daemon=True,
                             name=f"vecshim-watchdog-{name}").start()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._run, name=f"vecshim-batch-{self.name}-{len(self._threads)}", daemon=True)
        self._threads.append(t)
        t.start()

    def _watch(self, stuck_after: float) -> None:
        """Replace a worker whose backend call outlived `stuck_after` (a hung plugin).

        Its callers already got a 504; without a replacement every later text
        of this model would too. At most 4 x workers threads may hang at once.
        """
        while not self._closed:
            time.sleep(min(1.0, stuck_after / 4))
            now = time.monotonic()
            with self._cond:
                for ident, started in list(self._calls.items()):
                    if now - started > stuck_after and ident not in self._stuck \
                            and len(self._stuck) < 4 * self._workers:
                        self._stuck.add(ident)
                        log.error("model %r: a backend call has run for %.0f s; starting a replacement "
                                  "encoder thread", self.name, now - started)
                        self._spawn()

    @property
    def depth(self) -> int:
        """Texts waiting in the queue."""
        return self._queued

    @property
    def queued_tokens(self) -> int:
        """Tokens of the texts waiting in the queue."""
        return self._queued_tokens

    @property
    def busy(self) -> int:
        """Texts queued or being embedded."""
        return self._queued + self._busy

    # -- callers -----------------------------------------------------------------
    def submit(self, texts: Sequence, tokens: Sequence[int], key: Hashable, *,
               deadline: float | None = None) -> list[Future]:
        """Queue one request's texts; one Future per text, in order.

        `deadline` (time.monotonic()) is when its caller stops waiting: texts
        still queued then are dropped. Raises PayloadTooLarge (413) for a
        request over the per-request limits and Overloaded (503) when the
        queue is full.
        """
        n_tokens = sum(tokens)
        if self.max_request_tokens is not None and n_tokens > self.max_request_tokens:
            raise PayloadTooLarge(f"request has {n_tokens} tokens; model {self.name!r} accepts at most "
                                  f"{self.max_request_tokens} per request (batch.max_request_tokens)")
        if len(texts) > self.max_queue:
            raise PayloadTooLarge(f"request has {len(texts)} texts (windows included); model {self.name!r} "
                                  f"queues at most {self.max_queue} (batch.max_queue)")
        job = _Job(key, [], deadline, caller_source.get())
        job.units = [_Unit(t, n, Future(), job) for t, n in zip(texts, tokens)]
        with self._cond:
            if self._closed:
                raise BackendUnavailable(f"model {self.name!r} is shutting down")
            if self._queued + len(texts) > self.max_queue:
                raise Overloaded(f"model {self.name!r} has {self._queued} texts queued; retry later")
            if self.max_queue_tokens is not None and n_tokens > self.small_tokens \
                    and self._queued_tokens + n_tokens > self.max_queue_tokens:
                raise Overloaded(f"model {self.name!r} has {self._queued_tokens} tokens queued "
                                 f"(batch.max_queue_tokens); retry later")
            alone = self.inline and not self._jobs and not self._busy and len(texts) <= self.max_size
            if alone:  # an idle model: this thread embeds them itself (see _process)
                job.next = len(job.units)
                for u in job.units:
                    u.future.set_running_or_notify_cancel()
                self._busy += len(texts)
                self._last_size = len(texts)
            else:
                self._jobs.append(job)
                self._queued += len(texts)
                self._queued_tokens += n_tokens
                self._cond.notify(len(texts))
            depth = self._queued
        if self.on_depth:
            self.on_depth(depth)
        for u in job.units:
            u.future.vecshim_job = job  # lets discard() find the request
        if alone:
            self._process(job.units)
        return [u.future for u in job.units]

    def discard(self, futures: Sequence[Future], error: BaseException | None = None) -> None:
        """Drop the requests these futures belong to: queued texts are never computed.

        Their unfinished futures are cancelled, or given `error` if set.
        """
        jobs = {id(f.vecshim_job): f.vecshim_job for f in futures if hasattr(f, "vecshim_job")}
        with self._cond:
            for job in jobs.values():
                self._drop_locked(job)
            depth = self._queued
        for job in jobs.values():
            for u in job.units:
                if error is None:
                    u.future.cancel()
                if not u.future.done():
                    _settle(u.future, error=error or InferenceTimeout(f"model {self.name!r}: request dropped"))
        if self.on_depth:
            self.on_depth(depth)

    def _drop_locked(self, job: _Job) -> None:
        if job.dropped:
            return
        job.dropped = True
        left = job.units[job.next:]
        job.next = len(job.units)
        self._queued -= len(left)
        self._queued_tokens -= sum(u.tokens for u in left)
        try:
            self._jobs.remove(job)
        except ValueError:
            pass

    def wait(self, futures: Sequence[Future], timeout: float, gone: Callable[[], bool] | None = None) -> list:
        """Block until every future is done; the first error is raised.

        On timeout (504), an error, or when `gone()` (default: the current
        request's `caller_gone`) turns true, the request's remaining texts are
        dropped from the queue.
        """
        gone = gone if gone is not None else caller_gone.get()
        if len(futures) == 1:
            return [self._wait_one(futures, timeout, gone)]
        deadline = time.monotonic() + timeout
        pending = list(futures)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(futures, timeout)
            done, rest = wait_futures(pending, timeout=min(left, GONE_POLL_S) if gone else left,
                                      return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if not f.cancelled() and f.exception() is not None), None)
            if failed is not None:
                self.discard(futures, failed.exception())
                raise failed.exception()
            if any(f.cancelled() for f in done):
                raise InferenceTimeout(f"model {self.name!r}: request cancelled")
            if rest and gone is not None and gone():
                self.discard(futures)
                raise ClientGone("the client closed the connection; its texts were dropped")
            pending = list(rest)
        return [f.result() for f in futures]

    def _timed_out(self, futures: Sequence[Future], timeout: float) -> InferenceTimeout:
        """Drop a request whose wait ran out; the 504 to raise."""
        err = InferenceTimeout(f"model {self.name!r} did not answer within {timeout:g} s")
        self.discard(futures, err)
        return err

    def _wait_one(self, futures: Sequence[Future], timeout: float, gone: Callable[[], bool] | None):
        """wait() for a request of one text (Weaviate's `/vectors`): the same outcomes, waited for on
        the future's own condition instead of the waiter that concurrent.futures.wait installs."""
        future = futures[0]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(futures, timeout)
            try:
                future.exception(min(left, GONE_POLL_S) if gone else left)  # returns once done
            except (CancelledError, FutureTimeout):
                pass  # read below, outside the handler
            if future.done():
                break
            if gone is not None and gone():
                self.discard(futures)
                raise ClientGone("the client closed the connection; its texts were dropped")
        if future.cancelled():
            raise InferenceTimeout(f"model {self.name!r}: request cancelled")
        error = future.exception()
        if error is not None:
            self.discard(futures, error)
            raise error
        return future.result()

    # -- encoder threads ---------------------------------------------------------
    def _expire_locked(self, now: float) -> list[_Job]:
        expired = [j for j in self._jobs if j.deadline is not None and now > j.deadline]
        for j in expired:
            self._drop_locked(j)
        return expired

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _hold_locked(self, now: float) -> float:
        """Gate: seconds to keep gathering before asking for the next call's slot (0: ask now).

        A full call is as many texts as recent calls had outstanding (queued
        or in flight when they left), capped by the per-call limit. With
        fewer queued: while a call is in flight, hold until the oldest text
        has waited one observed call duration (its company is likely in that
        call and comes back when it returns); when the last call ended less
        than one call duration ago, hold until then (its texts' senders are
        sending again). An idle upstream, a first call, or a queue that
        holds a full call go at once.
        """
        if self._call_s is None or not self._peaks:
            return 0.0
        full = min(self.call_max_size, max(self._peaks))
        if self._queued >= full:
            return 0.0
        if self._calls_out:
            until = self._jobs[0].enqueued + self._call_s
        else:
            until = self._last_end + self._call_s
        return max(0.0, until - now)

    def _await_gate(self) -> None:
        """Become the one worker holding the next call's slot, and wait until it comes."""
        with self._cond:
            while not self._closed:
                if self._jobs and not self._admitting:
                    hold = self._hold_locked(time.monotonic())
                    if hold <= 0:
                        break
                    self._cond.wait(hold)
                else:
                    self._cond.wait()
            if self._closed:
                return
            self._admitting = True
        while True:
            booked, wait = self.gate.admit()  # may ask Redis: not under the queue's lock
            until = time.monotonic() + min(wait, 0.25 if not booked else wait)
            with self._cond:
                while not self._closed and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
                    if not booked:
                        break  # a call ended: ask again
                if booked or self._closed:
                    return

    def _take(self) -> list[_Unit] | None:
        if self.gate is not None:
            self._await_gate()
        with self._cond:
            if self.gate is not None:
                self._admitting = False
                self._cond.notify_all()
                if not self._jobs and not self._closed:
                    return []  # dropped meanwhile; start over
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            # Wait for company only under concurrent load: several texts queued, others
            # in flight, or a last batch of several. Otherwise the first text to arrive
            # after a batch returns goes alone, and calls carry 1 and n-1 texts in turn.
            if self.max_wait > 0 and self.gate is None and (self._queued > 1 or self._busy
                                                            or self._last_size > 1):
                deadline = self._jobs[0].enqueued + self.max_wait
                while self._queued < self.max_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    if not self._jobs:  # another worker took them
                        return []
            expired = self._expire_locked(time.monotonic())
            batch = self._round_robin() if self._jobs else []
            if self.gate is not None and batch:
                self._peaks.append(self._busy + len(batch) + self._queued)
                self._calls_out += 1
            self._busy += len(batch)
            self._last_size = len(batch)
            if self._jobs:
                self._cond.notify()
            depth = self._queued
        for job in expired:
            err = InferenceTimeout(f"model {self.name!r}: the request's deadline passed while queued")
            for u in job.units:
                _settle(u.future, error=err)
        if self.on_depth:
            self.on_depth(depth)
        return batch

    def _gate_done_locked(self, seconds: float) -> None:
        self._calls_out -= 1
        self._last_end = time.monotonic()
        self._call_s = seconds if self._call_s is None else 0.8 * self._call_s + 0.2 * seconds

    def _round_robin(self) -> list[_Unit]:
        """One text from each waiting request of the first request's key, in turn.

        The next batch resumes the turn where this one stopped; requests of
        other keys move ahead, so keys alternate too.
        """
        key = self._jobs[0].key
        active = [j for j in self._jobs if j.key == key]
        others = [j for j in self._jobs if j.key != key]
        batch: list[_Unit] = []
        i = 0
        while len(batch) < self.max_size and active:
            job = active[i % len(active)]
            unit = self._pop_locked(job)
            if unit is None:
                active.remove(job)  # the next request slides into this turn
                continue
            batch.append(unit)
            i += 1
        if active:
            k = i % len(active)
            active = active[k:] + active[:k]
        self._jobs = collections.deque(others + [j for j in active if j.next < len(j.units)])
        return batch

    def _pop_locked(self, job: _Job) -> _Unit | None:
        while job.next < len(job.units):
            unit = job.units[job.next]
            job.next += 1
            self._queued -= 1
            self._queued_tokens -= unit.tokens
            if unit.future.set_running_or_notify_cancel():
                return unit
        return None

    def _run(self) -> None:
        if self.thread_init:
            self.thread_init()
        while True:
            batch = self._take()
            if batch is None or self._process(batch):
                return

    def _process(self, batch: list[_Unit]) -> bool:
        """Embed a taken batch and settle its futures; True if this thread was replaced while it hung.

        Encoder threads run it, and with `inline` also a caller whose texts
        found the model idle (no texts queued or in flight, `inline` set for
        backends whose calls are bounded local compute): the text skips two
        thread hand-offs (~0.3 ms of a lone request, bench/RESULTS.md "Issue 18,
        fourth pass"), and texts arriving meanwhile queue for the encoder threads.
        """
        start = time.monotonic()
        try:
            if batch:
                wait = start - min(u.job.enqueued for u in batch)
                groups = plan_groups([u.tokens for u in batch], max_size=self.call_max_size,
                                     max_tokens=self.max_batch_tokens, cost=self.cost)
                for g in groups:
                    self._embed([batch[i] for i in g])
                if self.on_batch:
                    self.on_batch(len(batch), wait, time.monotonic() - start)
        except BaseException as err:  # never let a worker die with callers waiting
            log.exception("batch worker for model %r failed", self.name)
            for u in batch:
                if not u.future.done():
                    _settle(u.future, error=err)
        finally:
            with self._cond:
                self._busy -= len(batch)
                if self.gate is not None and batch:
                    self._gate_done_locked(time.monotonic() - start)
                self._cond.notify_all()
                me = threading.get_ident()
                if me in self._stuck:  # a replacement took over while this call hung
                    self._stuck.discard(me)
                    return True
        return False

    def _embed(self, units: list[_Unit]) -> None:
        units = [u for u in units if not u.job.dropped and not u.future.done()]
        if not units:
            return  # every caller of this group left or timed out meanwhile
        if self.on_sources is not None:
            sources = {u.job.source for u in units}
            sources.discard(None)
            self.on_sources(len(sources))
        me = threading.get_ident()
        try:
            self._calls[me] = time.monotonic()  # the watchdog reads it
            try:
                vectors = self.embed_fn([u.text for u in units], units[0].job.key)
            finally:
                self._calls.pop(me, None)
        except Exception as err:
            if len(units) > 1 and not _is_transient(err):
                mid = len(units) // 2
                self._embed(units[:mid])
                self._embed(units[mid:])
                return
            if len(units) == 1 or _is_transient(err):
                log.debug("embed failed for %d texts: %s", len(units), err)
            for u in units:
                _settle(u.future, error=err)
            return
        for u, v in zip(units, vectors):
            _settle(u.future, result=v)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop taking new texts, finish the queued ones, join workers; True if drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
