"""The conformance kit itself: each check fails on a backend that breaks its rule."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from pydantic import BaseModel, SecretStr

from fakebackend import FakeBackend, fake_vector
from vecshim import Backend, BackendOptions, Reranker
from vecshim.testing import ConformanceError, run_conformance, run_reranker_conformance
from vecshim.testing import checks


def test_a_good_backend_passes_every_check():
    assert run_conformance(FakeBackend, {"dim": 8, "max_input_tokens": 30}) == [c.__name__ for c in checks.CHECKS]


class Ragged(FakeBackend):
    name = "ragged"

    def embed(self, texts, task):
        return [fake_vector(t, task, 8 + (len(t) % 2)) for t in texts]


class BatchDependent(FakeBackend):
    name = "batch-dependent"

    def embed(self, texts, task):
        return super().embed(texts, task) + len(texts) * 0.01


class LiesAboutTasks(FakeBackend):
    name = "lies-about-tasks"

    def __init__(self, options):
        super().__init__(options)
        self.task_aware = False

    def embed(self, texts, task):
        return np.stack([fake_vector(t, task, 8) for t in texts])


class NotThreadSafe(FakeBackend):
    name = "not-thread-safe"

    def __init__(self, options):
        super().__init__(options)
        self.current: list[str] = []

    def embed(self, texts, task):
        self.current = list(texts)  # shared scratch state, read back after a pause
        time.sleep(0.002)
        return np.stack([fake_vector(t, task, 8) for t in self.current[:len(texts)]
                         + [""] * (len(texts) - len(self.current))])


class LeakyOptions(BackendOptions):
    token: SecretStr


class Leaky(Backend):
    name = "leaky"
    Options = LeakyOptions

    def info(self):
        return {"token": self.options.token.get_secret_value()}

    def embed(self, texts, task):
        return np.stack([fake_vector(t, task, 8) for t in texts])


class LongWindows(FakeBackend):
    name = "long-windows"

    def split_text(self, text, max_tokens):
        return [text]


class Loose(Backend):
    name = "loose"

    class Options(BaseModel):  # does not forbid unknown keys
        dim: int = 8

    def embed(self, texts, task):
        return np.stack([fake_vector(t, task, 8) for t in texts])


class RaisesRuntimeError(FakeBackend):
    name = "raises-runtime-error"

    def embed(self, texts, task):
        raise RuntimeError("upstream exploded")


class ClaimsNormalized(FakeBackend):
    name = "claims-normalized"

    def embed(self, texts, task):
        return super().embed(texts, task) * 2


class Anonymous(FakeBackend):
    name = "anonymous"

    def info(self):
        return {}


class WrongWhenLong(FakeBackend):
    name = "wrong-when-long"

    def embed(self, texts, task, pooling=None):
        out = super().embed(texts, task)
        return out[:, :-1] if any(len(t.split()) > 20 for t in texts) else out


@pytest.mark.parametrize("cls, options, kwargs, check, message", [
    (Ragged, {}, {}, "check_dimension", "shape"),
    (BatchDependent, {}, {}, "check_batch_equals_single", "batch vs one-by-one"),
    (LiesAboutTasks, {}, {}, "check_tasks", "task_aware is False"),
    (NotThreadSafe, {}, {}, "check_concurrency", "concurrent"),
    (Leaky, {"token": "tok-secret-123"}, {}, "check_info", "reveals a secret"),
    (LongWindows, {"max_input_tokens": 10}, {}, "check_long_text", "made a window of"),
    (Loose, {}, {}, "check_options", "were accepted"),
    (RaisesRuntimeError, {}, {"failing_options": {}}, "check_failure", "raise vecshim.BackendError"),
    (ClaimsNormalized, {}, {}, "check_dimension", "normalized=True"),
    (Anonymous, {}, {}, "check_info", "must say which model it serves"),
    (WrongWhenLong, {"max_input_tokens": 40}, {}, "check_dimension", "a long text gave vectors of length 15"),
    (FakeBackend, {"declare_dim": 32}, {}, "check_dimension", "declares dimension 32"),
])
def test_each_check_catches_its_breakage(cls, options, kwargs, check, message):
    with pytest.raises(ConformanceError) as excinfo:
        run_conformance(cls, options, **kwargs)
    lines = [line for line in str(excinfo.value).splitlines() if line.startswith(check + ":")]
    assert lines and message in lines[0], str(excinfo.value)


def test_failure_check_accepts_backend_error():
    run_conformance(FakeBackend, {"fail_on": "expected"}, failing_options={"fail_on": "expected"})


def test_concurrency_check_really_runs_threads_together():
    seen, lock = set(), threading.Lock()

    class Counting(FakeBackend):
        name = "counting"
        active = 0

        def embed(self, texts, task):
            with lock:
                Counting.active += 1
                seen.add(Counting.active)
            time.sleep(0.01)
            with lock:
                Counting.active -= 1
            return super().embed(texts, task)

    checks.check_concurrency(checks.Subject(Counting, {}, threads=8))
    assert max(seen) >= 4


# -- the reranker kit runs on the same machinery (subject, runner, class and option rules) --

class LengthReranker(Reranker):
    name = "length"

    def info(self):
        return {"model": "length"}

    def score(self, query, documents):
        return [float(len(d)) for d in documents]


class LooseReranker(LengthReranker):
    name = "loose-reranker"

    class Options(BaseModel):  # does not forbid unknown keys
        pass


class ZeroBatchReranker(LengthReranker):
    name = "zero-batch"
    max_batch_size = 0


def test_a_good_reranker_passes_every_check():
    assert "check_reranker_served" in run_reranker_conformance(LengthReranker, {})


@pytest.mark.parametrize("cls, check, message", [
    (LooseReranker, "check_reranker_options", "were accepted"),
    (ZeroBatchReranker, "check_reranker_class", "`max_batch_size` must be None or a positive int"),
])
def test_reranker_checks_catch_their_breakage(cls, check, message):
    with pytest.raises(ConformanceError) as excinfo:
        run_reranker_conformance(cls, {})
    lines = [line for line in str(excinfo.value).splitlines() if line.startswith(check + ":")]
    assert lines and message in lines[0], str(excinfo.value)
