"""Coalescing in front of a hosted backend's gate (`budget`): when a batch goes, and how full.

One encoder thread at a time asks `gate.admit()` for the next call's slot,
sleeps until it and then takes everything queued (up to the batch size), so
texts pile up while calls are in flight or the upstream pushes back, and a
lone text on an idle upstream goes at once. Before asking, the thread holds
the queue (see `Coalescer.hold_locked`) while a call is in flight, or one
has just ended, and fewer texts are queued than recent calls had
outstanding: one call carrying everything beats two concurrent half-full
ones when the upstream counts calls. `gate.subscribe(fn)` wakes the
threads when a call ends.
"""
from __future__ import annotations

import collections
import threading
import time

from .batchqueue import FairQueue

__all__ = ["Coalescer", "PEAK_TAKES"]

#: How many recent calls' outstanding texts (queued + in flight) make a full call.
PEAK_TAKES = 8


class Coalescer:
    """The gate's state for one Batcher; `_locked` methods run under the Batcher's lock (`cond`)."""

    def __init__(self, gate, cond: threading.Condition, queue: FairQueue, call_max_size: int):
        self.gate = gate
        self._cond = cond
        self._queue = queue
        self.call_max_size = call_max_size
        self._admitting = False  # a worker holds the gate's next slot
        self._calls_out = 0       # batches taken and not yet done
        self._call_s: float | None = None  # EWMA of a batch's seconds
        self._last_end = 0.0      # when the last batch ended
        self._peaks: collections.deque[int] = collections.deque(maxlen=PEAK_TAKES)
        gate.subscribe(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def hold_locked(self, now: float) -> float:
        """Seconds to keep gathering before asking for the next call's slot (0: ask now).

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
        if self._queue.texts >= full:
            return 0.0
        if self._calls_out:
            until = self._queue.jobs[0].enqueued + self._call_s
        else:
            until = self._last_end + self._call_s
        return max(0.0, until - now)

    def await_slot(self) -> None:
        """Become the one worker holding the next call's slot, and wait until it comes."""
        queue = self._queue
        with self._cond:
            while not queue.closed:
                if queue.jobs and not self._admitting:
                    hold = self.hold_locked(time.monotonic())
                    if hold <= 0:
                        break
                    self._cond.wait(hold)
                else:
                    self._cond.wait()
            if queue.closed:
                return
            self._admitting = True
        while True:
            booked, wait = self.gate.admit()  # may ask Redis: not under the queue's lock
            until = time.monotonic() + min(wait, 0.25 if not booked else wait)
            with self._cond:
                while not queue.closed and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
                    if not booked:
                        break  # a call ended: ask again
                if booked or queue.closed:
                    return

    def release_locked(self) -> None:
        """The slot's holder is taking its batch: the next worker may ask for a slot."""
        self._admitting = False
        self._cond.notify_all()

    def took_locked(self, outstanding: int) -> None:
        """A batch left with `outstanding` texts queued or in flight (its own included)."""
        self._peaks.append(outstanding)
        self._calls_out += 1

    def done_locked(self, seconds: float) -> None:
        """A batch taken under the gate has ended after `seconds`."""
        self._calls_out -= 1
        self._last_end = time.monotonic()
        self._call_s = seconds if self._call_s is None else 0.8 * self._call_s + 0.2 * seconds
