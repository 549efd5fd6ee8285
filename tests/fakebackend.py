"""A deterministic backend for tests, registered through the real hook."""
from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
from pydantic import Field

from vecshim import Backend, BackendOptions, BackendError, hookimpl


def fake_vector(text: str, task: str, dim: int) -> np.ndarray:
    """The vector FakeBackend gives `text`: seeded by a hash, unit length."""
    seed = int.from_bytes(hashlib.sha256(f"{task}|{text}".encode("utf-8", "surrogatepass")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeOptions(BackendOptions):
    dim: int = 16
    task_aware: bool = False
    max_input_tokens: int | None = None
    max_batch_size: int | None = None
    matryoshka: bool = False
    delay_s: float = 0.0
    fail_on: str | None = Field(None, description="texts containing this substring make embed() raise")
    load_gate: bool = False
    bad_length_on: str | None = None
    #: Texts of more words than this get vectors one shorter (a backend wrong only for long texts).
    bad_length_over_words: int | None = None
    #: Declare `dimension` (this value; None: let the core learn it).
    declare_dim: int | None = None
    #: Turn `task_aware` on in load() rather than in __init__.
    task_aware_in_load: bool = False
    #: Pooling strategies honoured per request (the first is the model's own).
    poolings: list[str] = []


class FakeBackend(Backend):
    """Vectors are a hash of task and text; tokens are whitespace-separated words."""

    name = "fake"
    Options = FakeOptions
    normalized = True

    #: Tests set this Event to let a gated load() finish.
    gate = threading.Event()

    def __init__(self, options):
        super().__init__(options)
        self.task_aware = options.task_aware
        self.max_input_tokens = options.max_input_tokens
        self.max_batch_size = options.max_batch_size
        self.matryoshka = options.matryoshka
        self.dimension = options.declare_dim
        self.pooling_strategies = tuple(options.poolings)
        self.calls: list[tuple[list[str], str]] = []
        self._lock = threading.Lock()

    def load(self):
        if self.options.load_gate:
            FakeBackend.gate.wait(30)
        if self.options.task_aware_in_load:
            self.task_aware = True

    def info(self):
        return {"model": "fake", "dim": self.options.dim}

    def vector(self, text: str, task: str, pooling: str | None = None) -> np.ndarray:
        """The vector this backend gives `text` (tests compare served vectors with it)."""
        t = task if self.task_aware else "passage"
        return fake_vector(text if pooling is None else f"{pooling}|{text}", t, self.options.dim)

    def count_tokens(self, texts):
        return [max(1, len(t.split())) for t in texts]

    def split_text(self, text, max_tokens):
        words = text.split()
        return [" ".join(words[i:i + max_tokens]) for i in range(0, len(words), max_tokens)] or [text]

    def embed(self, texts, task, pooling=None):
        with self._lock:
            self.calls.append((list(texts), task))
        if self.options.delay_s:
            time.sleep(self.options.delay_s)
        if self.options.fail_on and any(self.options.fail_on in t for t in texts):
            raise BackendError(f"fake backend refuses texts containing {self.options.fail_on!r}")
        out = [self.vector(t, task, pooling) for t in texts]
        if self.options.bad_length_on and any(self.options.bad_length_on in t for t in texts):
            out = [v[:-1] for v in out]
        limit = self.options.bad_length_over_words
        if limit is not None and any(len(t.split()) > limit for t in texts):
            out = [v[:-1] for v in out]
        return np.stack(out)


class FakePlugin:
    """Registers FakeBackend."""

    @hookimpl
    def register_backends(self, register):
        register(FakeBackend)
