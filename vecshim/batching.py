"""Micro-batcher: gathers concurrent single-text requests into backend calls."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Hashable, Sequence

from .errors import BackendUnavailable, InferenceTimeout, Overloaded, UpstreamError

__all__ = ["Item", "Batcher", "plan_groups"]

log = logging.getLogger("vecshim.batching")


class Item:
    """One text waiting for its vector."""

    __slots__ = ("text", "tokens", "key", "enqueued", "done", "result", "error", "cancelled")

    def __init__(self, text: str, tokens: int, key: Hashable):
        self.text = text
        self.tokens = tokens
        self.key = key
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.cancelled = False

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        """Hand the caller its vector or its error."""
        self.result, self.error = result, error
        self.done.set()


def plan_groups(tokens: Sequence[int], *, max_size: int | None, max_tokens: int | None,
                cost: tuple[float, float, float] | None) -> list[list[int]]:
    """Split items into backend calls: indices grouped so padding is not wasted.

    Items are sorted by token length and cut into contiguous groups that
    respect `max_size` and `max_tokens`. With a cost model
    `(a, b, c)` -> `a + b*n*L + c*n*L*L` per call (n texts padded to L
    tokens), the cut minimises the summed cost (a small dynamic program);
    without one, groups are simply as large as the limits allow.
    """
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    n = len(order)
    lens = [tokens[i] for i in order]
    cap = max_size or n or 1

    def fits(i: int, j: int) -> bool:  # items order[i:j] in one call
        if j - i > cap:
            return False
        return max_tokens is None or sum(lens[i:j]) <= max_tokens or j - i == 1

    if cost is None:
        groups, start = [], 0
        while start < n:
            end = start + 1
            while end < n and fits(start, end + 1):
                end += 1
            groups.append(order[start:end])
            start = end
        return groups
    a, b, c = cost
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        L = lens[j - 1]
        for i in range(j - 1, -1, -1):
            if not fits(i, j):
                break
            k = j - i
            total = best[i] + a + b * k * L + c * k * L * L
            if total < best[j]:
                best[j], cut[j] = total, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _is_transient(err: BaseException) -> bool:
    # Splitting a batch helps only when one bad text broke it, not when the
    # upstream itself is failing.
    return isinstance(err, BackendUnavailable) or (isinstance(err, UpstreamError) and err.retryable)


class Batcher:
    """One queue per model; worker threads take batches of same-key items.

    A worker does not wait when it finds a single item queued and the load is
    sequential (nothing in flight, last batch of one); otherwise it waits up
    to `max_wait_ms` after the oldest item arrived for the batch to fill to
    `max_size`. `embed_fn(texts, key)` returns one vector per text.

    With a `gate` (hosted backends) coalescing adapts instead: one worker at
    a time asks `gate.admit()` for the next call's slot, sleeps until it and
    then takes everything queued, so texts pile up while calls are in flight
    or the upstream pushes back, and a lone text on an idle upstream goes at
    once. `gate.subscribe(fn)` wakes workers when a call ends.
    """

    def __init__(self, name: str, embed_fn: Callable[[list[str], Hashable], Sequence], *,
                 max_size: int, max_wait_ms: float, workers: int, max_queue: int,
                 backend_max_size: int | None = None, max_batch_tokens: int | None = None,
                 cost: tuple[float, float, float] | None = None,
                 on_batch: Callable[[int, float, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 thread_init: Callable[[], None] | None = None,
                 stuck_after_s: float | None = None, gate=None):
        self.name = name
        self.embed_fn = embed_fn
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.call_max_size = min(max_size, backend_max_size or max_size)
        self.max_batch_tokens = max_batch_tokens
        self.cost = cost
        self.on_batch = on_batch
        self.on_depth = on_depth
        self.thread_init = thread_init
        self.gate = gate
        self._admitting = False  # a worker holds the gate's next slot
        self._queue: list[Item] = []
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
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Texts queued or being embedded."""
        return len(self._queue) + self._busy

    def submit(self, texts: Sequence[str], tokens: Sequence[int], key: Hashable) -> list[Item]:
        """Queue texts; raises Overloaded (503) when the queue is full."""
        items = [Item(t, n, key) for t, n in zip(texts, tokens)]
        with self._cond:
            if self._closed:
                raise BackendUnavailable(f"model {self.name!r} is shutting down")
            if len(self._queue) + len(items) > self.max_queue and self._queue:
                raise Overloaded(f"model {self.name!r} has {len(self._queue)} texts queued; retry later")
            self._queue.extend(items)
            self._cond.notify(len(items))
            depth = len(self._queue)
        if self.on_depth:
            self.on_depth(depth)
        return items

    def wait(self, items: Sequence[Item], timeout: float) -> list:
        """Block until every item is done; on timeout cancel what is left (504)."""
        deadline = time.monotonic() + timeout
        for it in items:
            if not it.done.wait(max(0.0, deadline - time.monotonic())):
                for other in items:
                    other.cancelled = True
                raise InferenceTimeout(f"model {self.name!r} did not answer within {timeout:g} s")
        for it in items:
            if it.error is not None:
                raise it.error
        return [it.result for it in items]

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _await_gate(self) -> None:
        """Become the one worker holding the next call's slot, and wait until it comes."""
        with self._cond:
            while (not self._queue or self._admitting) and not self._closed:
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

    def _take(self) -> list[Item] | None:
        if self.gate is not None:
            self._await_gate()
        with self._cond:
            if self.gate is not None:
                self._admitting = False
                self._cond.notify_all()
                if not self._queue and not self._closed:
                    return []  # cancelled meanwhile; start over
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            # Wait for company only under concurrent load: several texts queued, others
            # in flight, or a last batch of several. Otherwise the first text to arrive
            # after a batch returns goes alone, and calls carry 1 and n-1 texts in turn.
            if self.max_wait > 0 and self.gate is None and (len(self._queue) > 1 or self._busy
                                                            or self._last_size > 1):
                deadline = self._queue[0].enqueued + self.max_wait
                while len(self._queue) < self.max_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    if not self._queue:  # another worker took them
                        return []
            if not self._queue:
                return []
            key = self._queue[0].key
            batch, rest = [], []
            for it in self._queue:
                if it.key == key and len(batch) < self.max_size:
                    batch.append(it)
                else:
                    rest.append(it)
            self._queue = rest
            self._busy += len(batch)
            self._last_size = len(batch)
            if rest:
                self._cond.notify()
        if self.on_depth:
            self.on_depth(len(rest))
        return batch

    def _run(self) -> None:
        if self.thread_init:
            self.thread_init()
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [it for it in batch if not it.cancelled]
            try:
                if live:
                    start = time.monotonic()
                    wait = start - min(it.enqueued for it in live)
                    groups = plan_groups([it.tokens for it in live], max_size=self.call_max_size,
                                         max_tokens=self.max_batch_tokens, cost=self.cost)
                    for g in groups:
                        self._embed([live[i] for i in g])
                    if self.on_batch:
                        self.on_batch(len(live), wait, time.monotonic() - start)
            except BaseException as err:  # never let a worker die with callers waiting
                log.exception("batch worker for model %r failed", self.name)
                for it in live:
                    if not it.done.is_set():
                        it.resolve(error=err)
            finally:
                with self._cond:
                    self._busy -= len(batch)
                    self._cond.notify_all()
                    me = threading.get_ident()
                    if me in self._stuck:  # a replacement took over while this call hung
                        self._stuck.discard(me)
                        return

    def _embed(self, items: list[Item]) -> None:
        me = threading.get_ident()
        try:
            self._calls[me] = time.monotonic()  # the watchdog reads it
            try:
                vectors = self.embed_fn([it.text for it in items], items[0].key)
            finally:
                self._calls.pop(me, None)
        except Exception as err:
            if len(items) > 1 and not _is_transient(err):
                mid = len(items) // 2
                self._embed(items[:mid])
                self._embed(items[mid:])
                return
            if len(items) == 1 or _is_transient(err):
                log.debug("embed failed for %d texts: %s", len(items), err)
            for it in items:
                it.resolve(error=err)
            return
        for it, v in zip(items, vectors):
            it.resolve(result=v)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop taking new texts, finish the queued ones, join workers; True if drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
