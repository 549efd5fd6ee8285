"""Caller-side waits of the micro-batcher: a request's futures until done, timed out, or its client gone."""
from __future__ import annotations

import contextvars
import time
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from typing import Callable, Sequence

from .errors import ClientGone, InferenceTimeout

__all__ = ["caller_gone", "wait_for", "GONE_POLL_S"]

#: Set by the server for each request: a function telling whether its client hung up.
caller_gone: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "vecshim_caller_gone", default=None)
#: How often a waiting request checks whether its client is still there.
GONE_POLL_S = 0.5

Discard = Callable[[Sequence[Future], "BaseException | None"], None]


def wait_for(futures: Sequence[Future], timeout: float, gone: Callable[[], bool] | None, *,
             name: str, discard: Discard) -> list:
    """Batcher.wait: block until every future is done; the first error is raised.

    On timeout (504), an error, or when `gone()` turns true, `discard` drops
    the request's remaining texts from model `name`'s queue.
    """
    if len(futures) == 1:
        return [_wait_one(futures, timeout, gone, name, discard)]
    deadline = time.monotonic() + timeout
    pending = list(futures)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(futures, timeout, name, discard)
        done, rest = wait_futures(pending, timeout=min(left, GONE_POLL_S) if gone else left,
                                  return_when=FIRST_EXCEPTION)
        failed = next((f for f in done if not f.cancelled() and f.exception() is not None), None)
        if failed is not None:
            discard(futures, failed.exception())
            raise failed.exception()
        if any(f.cancelled() for f in done):
            raise InferenceTimeout(f"model {name!r}: request cancelled")
        if rest and gone is not None and gone():
            discard(futures, None)
            raise ClientGone("the client closed the connection; its texts were dropped")
        pending = list(rest)
    return [f.result() for f in futures]


def _timed_out(futures: Sequence[Future], timeout: float, name: str, discard: Discard) -> InferenceTimeout:
    """Drop a request whose wait ran out; the 504 to raise."""
    err = InferenceTimeout(f"model {name!r} did not answer within {timeout:g} s")
    discard(futures, err)
    return err


def _wait_one(futures: Sequence[Future], timeout: float, gone: Callable[[], bool] | None,
              name: str, discard: Discard):
    """wait_for() a request of one text (Weaviate's `/vectors`): the same outcomes, waited for on
    the future's own condition instead of the waiter that concurrent.futures.wait installs."""
    future = futures[0]
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(futures, timeout, name, discard)
        try:
            future.exception(min(left, GONE_POLL_S) if gone else left)  # returns once done
        except (CancelledError, FutureTimeout):
            pass  # read below, outside the handler
        if future.done():
            break
        if gone is not None and gone():
            discard(futures, None)
            raise ClientGone("the client closed the connection; its texts were dropped")
    if future.cancelled():
        raise InferenceTimeout(f"model {name!r}: request cancelled")
    error = future.exception()
    if error is not None:
        discard(futures, error)
        raise error
    return future.result()
