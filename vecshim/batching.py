"""Micro-batcher: gathers concurrent requests' texts into backend calls, fairly.

Interface (all a model needs)::

    futures = batcher.submit(texts, tokens, key, deadline=...)  # one Future per text
    vectors = batcher.wait(futures, timeout, gone=...)         # or use the futures directly

`texts` are opaque to the batcher (strings, or pre-tokenized inputs): it
passes them to `embed_fn(texts, key)` unchanged and only reads `tokens`.
A caller cancels with `future.cancel()` (or `batcher.discard(futures)`),
and cancelled or expired texts are never computed.

The queue and its round-robin are in `batchqueue`, the hosted-API gate's
coalescing in `batchgate`, the callers' waits in `batchwait`, the encoder
threads, their watchdog and each backend call in `batchthreads`, and how a batch is cut into
backend calls in `batchplan`.
"""
from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Hashable, Sequence

from .batchgate import Coalescer
from .batchplan import plan_groups
from .batchqueue import FairQueue, Job, Taken, Unit, settle
from .batchthreads import Encoders
from .batchwait import caller_gone, wait_for
from .errors import BackendUnavailable, InferenceTimeout, Overloaded, PayloadTooLarge

__all__ = ["Batcher", "plan_groups", "caller_gone", "caller_source"]

#: Set by the engine for each worker connection: who sent the request (the HTTP worker's pid).
#: Each request keeps it, so a backend call knows how many senders it serves (`on_sources`).
caller_source: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar(
    "vecshim_caller_source", default=None)

log = logging.getLogger("vecshim.batching")


class Batcher:
    """One queue per model; encoder threads take fair batches of same-key texts.

    Fairness: a batch takes texts round-robin from the waiting requests, up
    to `max_size` (`batchqueue.FairQueue`).

    Bounds: a request over `max_request_tokens` is refused (413); the queue
    holds at most `max_queue` texts and `max_queue_tokens` tokens (503 with
    Retry-After beyond), except that a request of at most `small_tokens`
    tokens is only bounded by `max_queue`, so light clients are not refused
    because of one heavy one. Texts whose caller gave up, or whose
    request's deadline passed, are dropped, not computed.

    A worker does not wait when it finds a single text queued and the load is
    sequential (nothing in flight, last batch of one); otherwise it waits up
    to `max_wait_ms` after the oldest request arrived for the batch to fill.

    With a `gate` (hosted backends) coalescing adapts instead: a worker
    waits for the gate's next call slot, then takes everything queued (up to
    `max_size`); see `batchgate`.
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
        self._queue = FairQueue()
        self._cond = threading.Condition()
        self._coalescer = Coalescer(gate, self._cond, self._queue, self.call_max_size) if gate is not None else None
        self._busy = 0
        self._last_size = 0
        #: Calls planned from a taken batch and not yet started, for any encoder thread (local
        #: backends): (units, the batch's Taken).
        self._planned: collections.deque[tuple[list[Unit], Taken]] = collections.deque()
        self._encoders = Encoders(name, self._run, workers, self._cond, lambda: self._queue.closed, stuck_after_s)

    @property
    def depth(self) -> int:
        """Texts waiting in the queue."""
        return self._queue.texts

    @property
    def queued_tokens(self) -> int:
        """Tokens of the texts waiting in the queue."""
        return self._queue.tokens

    @property
    def busy(self) -> int:
        """Texts queued or being embedded."""
        return self._queue.texts + self._busy

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
        job = Job(key, [], deadline, caller_source.get())
        job.units = [Unit(t, n, Future(), job) for t, n in zip(texts, tokens)]
        queue = self._queue
        with self._cond:
            if queue.closed:
                raise BackendUnavailable(f"model {self.name!r} is shutting down")
            if queue.texts + len(texts) > self.max_queue:
                raise Overloaded(f"model {self.name!r} has {queue.texts} texts queued; retry later")
            if self.max_queue_tokens is not None and n_tokens > self.small_tokens \
                    and queue.tokens + n_tokens > self.max_queue_tokens:
                raise Overloaded(f"model {self.name!r} has {queue.tokens} tokens queued "
                                 f"(batch.max_queue_tokens); retry later")
            alone = self.inline and not queue.jobs and not self._busy and len(texts) <= self.max_size
            if alone:  # an idle model: this thread embeds them itself (see _process)
                job.next = len(job.units)
                for u in job.units:
                    u.future.set_running_or_notify_cancel()
                self._busy += len(texts)
                self._last_size = len(texts)
            else:
                queue.add(job, n_tokens)
                self._cond.notify(len(texts))
            depth = queue.texts
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
                self._queue.drop(job)
            depth = self._queue.texts
        for job in jobs.values():
            for u in job.units:
                if error is None:
                    u.future.cancel()
                if not u.future.done():
                    settle(u.future, error=error or InferenceTimeout(f"model {self.name!r}: request dropped"))
        if self.on_depth:
            self.on_depth(depth)

    def wait(self, futures: Sequence[Future], timeout: float, gone: Callable[[], bool] | None = None) -> list:
        """Block until every future is done; the first error is raised.

        On timeout (504), an error, or when `gone()` (default: the current
        request's `caller_gone`) turns true, the request's remaining texts are
        dropped from the queue.
        """
        return wait_for(futures, timeout, gone if gone is not None else caller_gone.get(),
                        name=self.name, discard=self.discard)

    # -- encoder threads ---------------------------------------------------------
    def _take(self) -> tuple[list[Unit], "Taken | None"] | None:
        """The next work of an encoder thread: a planned call of a batch another thread took, or a new
        batch (its first call, the rest planned for any thread); None once closed and drained."""
        queue, coalescer = self._queue, self._coalescer
        if coalescer is not None:
            coalescer.await_slot()
        with self._cond:
            if self._planned:
                return self._planned.popleft()
            if coalescer is not None:
                coalescer.release_locked()
                if not queue.jobs and not queue.closed:
                    return [], None  # dropped meanwhile; start over
            while not queue.jobs:
                if queue.closed:
                    return None
                self._cond.wait()
                if self._planned:
                    return self._planned.popleft()
            # Wait for company only under concurrent load: several texts queued, others
            # in flight, or a last batch of several. Otherwise the first text to arrive
            # after a batch returns goes alone, and calls carry 1 and n-1 texts in turn.
            if self.max_wait > 0 and coalescer is None and (queue.texts > 1 or self._busy
                                                             or self._last_size > 1):
                deadline = queue.jobs[0].enqueued + self.max_wait
                while queue.texts < self.max_size and not queue.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    if not queue.jobs or self._planned:  # another worker took them, or planned calls
                        return [], None
            now = time.monotonic()
            expired = queue.expire(now)
            batch = queue.take(self.max_size) if queue.jobs else []
            if coalescer is not None and batch:
                coalescer.took_locked(self._busy + len(batch) + queue.texts)
            self._busy += len(batch)
            self._last_size = len(batch)
            shared = None
            if batch and coalescer is None:
                # One batch, planned once, its calls shared by every encoder thread: the next batch
                # is taken when they have all started, so it holds what arrived meanwhile (about
                # every client's next text) and is cut into fewer, fuller calls than two batches
                # taken by two threads would be.
                groups = self._plan(batch)
                shared = Taken(len(batch), now - min(u.job.enqueued for u in batch), now, len(groups))
                for g in groups[1:]:
                    self._planned.append((g, shared))
                batch = groups[0]
                if len(groups) > 1:
                    self._cond.notify(len(groups) - 1)
            if queue.jobs:
                self._cond.notify()
            depth = queue.texts
        for job in expired:
            err = InferenceTimeout(f"model {self.name!r}: the request's deadline passed while queued")
            for u in job.units:
                settle(u.future, error=err)
        if self.on_depth:
            self.on_depth(depth)
        return batch, shared

    def _plan(self, batch: list[Unit]) -> list[list[Unit]]:
        """The batch cut into backend calls (`batchplan.plan_groups`)."""
        groups = plan_groups([u.tokens for u in batch], max_size=self.call_max_size,
                             max_tokens=self.max_batch_tokens, cost=self.cost)
        return [[batch[i] for i in g] for g in groups]

    def _run(self) -> None:
        if self.thread_init:
            self.thread_init()
        while True:
            work = self._take()
            if work is None or self._process(*work):
                return

    def _process(self, units: list[Unit], shared: "Taken | None" = None) -> bool:
        """Embed taken texts and settle their futures; True if this thread was replaced while it hung.

        With `shared`, `units` are one planned call of a batch whose calls
        any encoder thread runs. Without, they are a whole batch, cut into
        calls and run here: by an encoder thread of a hosted backend (its
        gate admitted this batch), or with `inline` by a caller whose texts
        found the model idle (no texts queued or in flight, `inline` set for
        backends whose calls are bounded local compute): the text skips two
        thread hand-offs (~0.3 ms of a lone request, bench/RESULTS.md "Issue 18,
        fourth pass"), and texts arriving meanwhile queue for the encoder threads.
        """
        start = time.monotonic()
        try:
            if shared is not None:
                self._encoders.call(units, self.embed_fn, self.on_sources)
            elif units:
                wait = start - min(u.job.enqueued for u in units)
                for call in self._plan(units):
                    self._encoders.call(call, self.embed_fn, self.on_sources)
                if self.on_batch:
                    self.on_batch(len(units), wait, time.monotonic() - start)
        except BaseException as err:  # never let a worker die with callers waiting
            log.exception("batch worker for model %r failed", self.name)
            for u in units:
                if not u.future.done():
                    settle(u.future, error=err)
        finally:
            with self._cond:
                self._busy -= len(units)
                if self._coalescer is not None and units:
                    self._coalescer.done_locked(time.monotonic() - start)
                shared_done = shared is not None and shared.call_ended_locked()
                self._cond.notify_all()
                retired = self._encoders.retired_locked()  # a replacement took over while this call hung
            if shared_done and self.on_batch:
                self.on_batch(shared.size, shared.wait, time.monotonic() - shared.start)
        return retired

    def close(self, timeout: float = 30.0) -> bool:
        """Stop taking new texts, finish the queued ones, join workers; True if drained."""
        with self._cond:
            self._queue.closed = True
            self._cond.notify_all()
        return self._encoders.join(timeout)
