"""A model's encoder threads, and the watchdog that replaces one stuck in a hung backend call."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

__all__ = ["Encoders"]

log = logging.getLogger("vecshim.batching")


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
