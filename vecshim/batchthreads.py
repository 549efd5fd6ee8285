"""A model's encoder threads, each backend call they run, and the watchdog that replaces one stuck in a hung call."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .batchqueue import settle
from .errors import BackendUnavailable, UpstreamError

__all__ = ["Encoders"]

log = logging.getLogger("vecshim.batching")


def _is_transient(err: BaseException) -> bool:
    # Splitting a batch helps only when one bad text broke it, not when the
    # upstream itself is failing.
    return isinstance(err, BackendUnavailable) or (isinstance(err, UpstreamError) and err.retryable)


class Encoders:
    """`workers` threads running `run`; with `stuck_after_s`, a watchdog thread too.

    An encoder thread records each backend call in `calls` while it runs.
    One that outlives `stuck_after_s` (a hung plugin) gets a replacement:
    its callers already got a 504, and without one every later text of the
    model would too. At most 4 x workers threads may hang at once; a
    replaced thread retires when its call returns (`retired_locked`).
    """

    def __init__(self, name: str, run: Callable[[], None], workers: int, cond: threading.Condition,
                 closed: Callable[[], bool], stuck_after_s: float | None):
        self.name = name
        self._run = run
        self._workers = workers
        self._cond = cond
        self._closed = closed
        self.threads: list[threading.Thread] = []
        self.calls: dict[int, float] = {}  # thread id -> start of its current backend call
        self._stuck: set[int] = set()      # threads replaced while hung; they retire on return
        for _ in range(workers):
            self._spawn()
        if stuck_after_s:
            threading.Thread(target=self._watch, args=(stuck_after_s,), daemon=True,
                             name=f"vecshim-watchdog-{name}").start()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._run, name=f"vecshim-batch-{self.name}-{len(self.threads)}", daemon=True)
        self.threads.append(t)
        t.start()

    def _watch(self, stuck_after: float) -> None:
        while not self._closed():
            time.sleep(min(1.0, stuck_after / 4))
            now = time.monotonic()
            with self._cond:
                for ident, started in list(self.calls.items()):
                    if now - started > stuck_after and ident not in self._stuck \
                            and len(self._stuck) < 4 * self._workers:
                        self._stuck.add(ident)
                        log.error("model %r: a backend call has run for %.0f s; starting a replacement "
                                  "encoder thread", self.name, now - started)
                        self._spawn()

    def call(self, units: list, embed_fn: Callable, on_sources: Callable[[int], None] | None) -> None:
        """One backend call for `units` (recorded in `calls` for the watchdog), their futures settled.

        A call that fails for a reason other than a transient one is split in
        two and retried, down to single texts, so one bad text fails alone.
        """
        units = [u for u in units if not u.job.dropped and not u.future.done()]
        if not units:
            return  # every caller of this group left or timed out meanwhile
        if on_sources is not None:
            sources = {u.job.source for u in units}
            sources.discard(None)
            on_sources(len(sources))
        me = threading.get_ident()
        try:
            self.calls[me] = time.monotonic()  # the watchdog reads it
            try:
                vectors = embed_fn([u.text for u in units], units[0].job.key)
            finally:
                self.calls.pop(me, None)
        except Exception as err:
            if len(units) > 1 and not _is_transient(err):
                mid = len(units) // 2
                self.call(units[:mid], embed_fn, on_sources)
                self.call(units[mid:], embed_fn, on_sources)
                return
            if len(units) == 1 or _is_transient(err):
                log.debug("embed failed for %d texts: %s", len(units), err)
            for u in units:
                settle(u.future, error=err)
            return
        for u, v in zip(units, vectors):
            settle(u.future, result=v)

    def retired_locked(self) -> bool:
        """Whether a replacement took over while the calling thread's call hung (it then ends)."""
        me = threading.get_ident()
        if me in self._stuck:
            self._stuck.discard(me)
            return True
        return False

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in all for the threads to end; True if they all did."""
        deadline = time.monotonic() + timeout
        for t in list(self.threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)
