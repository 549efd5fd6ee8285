"""The micro-batcher's queue: requests' texts waiting for an encoder thread, taken fairly.

Not thread-safe on its own: the Batcher's lock guards every call (hence no
`_locked` suffixes here; everything is).
"""
from __future__ import annotations

import collections
import time
from concurrent.futures import Future, InvalidStateError
from typing import Hashable

__all__ = ["Job", "Unit", "FairQueue", "Taken", "settle"]


class Job:
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


class Unit:
    __slots__ = ("text", "tokens", "future", "job")

    def __init__(self, text, tokens: int, future: Future, job: Job):
        self.text, self.tokens, self.future, self.job = text, tokens, future, job


class Taken:
    """A taken batch whose planned calls any encoder thread may run: what its metrics need."""

    __slots__ = ("size", "wait", "start", "calls_left")

    def __init__(self, size: int, wait: float, start: float, calls: int):
        self.size, self.wait, self.start, self.calls_left = size, wait, start, calls

    def call_ended_locked(self) -> bool:
        """Count one of its calls done; True when it was the last."""
        self.calls_left -= 1
        return self.calls_left == 0


def settle(future: Future, result=None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled or expired meanwhile: nobody is waiting
        pass


class FairQueue:
    """Waiting requests in arrival order, with their untaken texts and tokens counted.

    `take` builds a batch round-robin: one text from each waiting request of
    the first request's key in turn, so a request with thousands of windows
    shares the encoder with single-text requests instead of holding it.
    `closed` is set when the batcher stops accepting texts.
    """

    def __init__(self):
        self.jobs: collections.deque[Job] = collections.deque()
        self.texts = 0   # texts waiting (not yet taken)
        self.tokens = 0
        self.closed = False

    def add(self, job: Job, n_tokens: int) -> None:
        self.jobs.append(job)
        self.texts += len(job.units)
        self.tokens += n_tokens

    def drop(self, job: Job) -> None:
        """Forget a request's untaken texts (its caller left or its deadline passed)."""
        if job.dropped:
            return
        job.dropped = True
        left = job.units[job.next:]
        job.next = len(job.units)
        self.texts -= len(left)
        self.tokens -= sum(u.tokens for u in left)
        try:
            self.jobs.remove(job)
        except ValueError:
            pass

    def expire(self, now: float) -> list[Job]:
        """Drop and return the requests whose deadline passed."""
        expired = [j for j in self.jobs if j.deadline is not None and now > j.deadline]
        for j in expired:
            self.drop(j)
        return expired

    def take(self, max_size: int) -> list[Unit]:
        """Up to `max_size` texts, one from each waiting request of the first request's key, in turn.

        The next batch resumes the turn where this one stopped; requests of
        other keys move ahead, so keys alternate too. Cancelled texts are
        skipped.
        """
        key = self.jobs[0].key
        active = [j for j in self.jobs if j.key == key]
        others = [j for j in self.jobs if j.key != key]
        batch: list[Unit] = []
        i = 0
        while len(batch) < max_size and active:
            job = active[i % len(active)]
            unit = self._pop(job)
            if unit is None:
                active.remove(job)  # the next request slides into this turn
                continue
            batch.append(unit)
            i += 1
        if active:
            k = i % len(active)
            active = active[k:] + active[:k]
        self.jobs = collections.deque(others + [j for j in active if j.next < len(j.units)])
        return batch

    def _pop(self, job: Job) -> Unit | None:
        while job.next < len(job.units):
            unit = job.units[job.next]
            job.next += 1
            self.texts -= 1
            self.tokens -= unit.tokens
            if unit.future.set_running_or_notify_cancel():
                return unit
        return None
