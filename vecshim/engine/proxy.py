"""Worker side: models that look up the cache here and send misses to the engine; rerankers it serves.

`RemoteModel` is a `Model` whose cache misses (`_run`) cross the channel and
whose facts (state, fingerprint, dimension, /meta entry) come from the engine
through `EngineLink`'s watch connection, so `/meta` and readiness never wait
on inference. The cache, dimension checks and truncation stay the `Model`
code the in-process app runs. `RemoteRanker` sends whole rank calls (long-text
policy, pair batching, retries and fallbacks happen in the engine).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Callable, Sequence

import numpy as np

from ..errors import BackendUnavailable, InferenceTimeout
from ..model import Model
from ..ranking import Ranker
from . import channel

__all__ = ["EngineLink", "RemoteModel", "RemoteRanker"]

log = logging.getLogger("vecshim.engine")
_RETRY_AFTER = {"Retry-After": "1"}


def _unavailable(what: str) -> BackendUnavailable:
    return BackendUnavailable(f"{what}: the engine is restarting; retry shortly", headers=_RETRY_AFTER)


def _take_state(obj, info: dict | None) -> bool:
    """Set a remote model's or reranker's state from the engine's facts; False if the engine is down."""
    if info is None:
        obj.state, obj.error = "unavailable", "the engine is restarting"
        obj._ready.clear()
        return False
    obj._facts = info
    obj.state, obj.error = info["state"], info.get("error")
    return True


class EngineLink:
    """One worker's connection to the engine: a facts watcher plus one socket per request thread."""

    def __init__(self, path: str, on_facts: Callable[[dict | None], None]):
        self.path = path
        self.on_facts = on_facts
        self.facts: dict | None = None
        self.up = False
        self._boot = None
        self._local = threading.local()
        self._closed = threading.Event()
        self._first = threading.Event()
        self._watch_sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._watch, name="vecshim-engine-link", daemon=True)

    def start(self, wait: float = 5.0) -> "EngineLink":
        """Start watching; wait (bounded) for the first facts, so a new worker never starts out "down"."""
        self._thread.start()
        self._first.wait(wait)
        return self

    def info(self) -> dict:
        """The /meta `engine` entry."""
        facts = self.facts or {}
        return {"mode": "engine", "pid": facts.get("pid") if self.up else None, "up": self.up,
                "worker_pid": os.getpid()}

    def _watch(self) -> None:
        while not self._closed.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.path)
                    self._watch_sock = s
                    channel.send(s, b"W")
                    while True:
                        facts = json.loads(channel.recv(s)[1:])
                        previous, self._boot = self._boot, facts["boot"]
                        self.facts, self.up = facts, True
                        self.on_facts(facts)
                        # Logged once this worker serves with that engine (tests wait for it).
                        if previous is None:
                            log.info("using the engine (pid %s)", facts["pid"])
                        elif previous != facts["boot"]:
                            log.warning("engine restarted (pid %s); this worker serves again", facts["pid"])
                        self._first.set()
            except (OSError, channel.ChannelClosed, ValueError, KeyError):
                pass
            if self.up and not self._closed.is_set():
                log.error("lost the engine (pid %s); answering 503 until it is back",
                          (self.facts or {}).get("pid"))
                self.up = False
                self.on_facts(None)
            self._closed.wait(0.1)

    def _socket(self) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is not None and self._local.boot == self._boot:
            return sock
        if sock is not None:
            sock.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self._local.sock, self._local.boot = sock, self._boot
        return sock

    def _drop(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None

    def call(self, body: bytes, timeout: float, what: str) -> bytes:
        """Send one request and return the reply; an engine that goes away is a 503."""
        for attempt in (0, 1):
            try:
                sock = self._socket()
                sock.settimeout(timeout)
                channel.send(sock, body)
            except OSError:
                self._drop()  # a socket to an engine that restarted: one fresh try
                if attempt == 0:
                    continue
                raise _unavailable(what) from None
            try:
                return channel.recv(sock)
            except socket.timeout:
                self._drop()
                raise InferenceTimeout(f"{what} did not answer within {timeout:g} s") from None
            except (OSError, channel.ChannelClosed):
                self._drop()
                raise _unavailable(what) from None
        raise _unavailable(what)

    def close(self) -> None:
        self._closed.set()
        if self._watch_sock is not None:
            try:
                self._watch_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _CountingBackend:
    """The model's (never loaded) backend, except that token counts come from the engine."""

    def __init__(self, backend, model: "RemoteModel"):
        self._backend = backend
        self._model = model

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        reply = self._model._call(channel.pack_texts(b"C", self._model.name, list(texts)))
        return channel.unpack_counts(reply)


class RemoteModel(Model):
    """A model served by the engine; this worker keeps the cache and the request checks."""

    link: EngineLink | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _CountingBackend(self.backend, self)
        self._facts: dict | None = None

    def apply(self, info: dict | None, poolings: list[str] | None = None) -> None:
        """Take the engine's facts for this model (None: the engine is down)."""
        if not _take_state(self, info):
            return
        self.dimension = info.get("dimension")
        self.task_split = bool(info.get("task_aware", self.task_split))
        if poolings is not None:
            self.poolings = tuple(poolings)
        if self.state == "ready":
            self._fingerprint = info["fingerprint"]
            self._ready.set()
        else:
            self._ready.clear()

    @property
    def normalized(self) -> bool:
        if self._facts is not None:
            return bool(self._facts["normalized"])
        return super().normalized

    @property
    def matryoshka(self) -> bool:
        if self._facts is not None:
            return bool(self._facts["matryoshka"])
        return super().matryoshka

    def info(self) -> dict:
        if self._facts is None:
            return super().info()
        info = dict(self._facts, state=self.state)
        info.pop("error", None)
        return {**info, **({"error": self.error} if self.error else {})}

    def load(self) -> None:
        """Nothing to load here: the engine loads, its facts arrive through the link."""

    def close(self, timeout: float = 30.0) -> None:
        """Nothing to drain here: the engine finishes the queue."""

    def embed(self, texts, task="passage", dimensions=None, pooling=None):
        if self.link is not None and not self.link.up:
            raise _unavailable(f"model {self.name!r}")
        return super().embed(texts, task, dimensions, pooling)

    def _call(self, body: bytes) -> bytes:
        reply = self.link.call(body, self.cfg.timeout_s + 5.0, f"model {self.name!r}")
        if reply[:1] == b"X":
            raise channel.unpack_error(reply)
        return reply

    def _run(self, texts: list[str], task: str, pooling: str | None = None):
        return channel.unpack_vectors(self._call(channel.pack_texts(b"E", self.name, texts, task, pooling)))


class RemoteRanker(Ranker):
    """A reranker served by the engine: scores cross the channel, state and /meta entry come from the facts."""

    link: EngineLink | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._facts: dict | None = None

    def apply(self, info: dict | None) -> None:
        """Take the engine's facts for this reranker (None: the engine is down)."""
        if not _take_state(self, info):
            return
        if self.state == "ready":
            self._ready.set()
        else:
            self._ready.clear()

    @property
    def fingerprint(self) -> str:
        return self._facts["fingerprint"] if self._facts is not None else super().fingerprint

    def info(self) -> dict:
        if self._facts is None:
            return super().info()
        info = {k: v for k, v in self._facts.items() if k != "error"}
        info["state"] = self.state
        return {**info, **({"error": self.error} if self.error else {})}

    def load(self) -> None:
        """Nothing to load here: the engine loads, its facts arrive through the link."""

    def close(self, timeout: float = 30.0) -> None:
        """Nothing to drain here: the engine finishes the queue."""

    def rank(self, query: str, documents: Sequence[str]) -> np.ndarray:
        """The engine's `Ranker.rank` (it waits for loading, batches, retries, falls back)."""
        what = f"reranker {self.name!r}"
        if self.link is None or not self.link.up:
            raise _unavailable(what)
        # Loading, the pair batch and each fallback may each take up to timeout_s there.
        timeout = self.cfg.timeout_s * (2 + len(self.cfg.fallbacks)) + 5.0
        reply = self.link.call(channel.pack_rank(self.name, query, list(documents)), timeout, what)
        if reply[:1] == b"X":
            raise channel.unpack_error(reply)
        return channel.unpack_scores(reply)
