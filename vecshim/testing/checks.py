"""The conformance checks, as plain functions: usable with or without pytest."""
from __future__ import annotations

import json
import threading
from typing import Any, Callable

import numpy as np
from pydantic import SecretStr

from ..backend import TASKS, Backend
from ..config import ModelConfig
from ..errors import BackendError, ConfigError, VecshimError
from ..model import Model
from ..space import identity_problem
from .subject import (
    _WORDS, TEXTS, ConformanceError, Subject, assert_close as _close, embed, require, require_limits,
    require_options_rejected, require_plugin_class, run_threads,
)

__all__ = ["ConformanceError", "Subject", "CHECKS", "TEXTS"]

# -- the checks ---------------------------------------------------------------------

def check_class(s: Subject) -> None:
    """Registration shape: a concrete Backend with a name, Options and sane capabilities."""
    cls = s.backend_class
    require_plugin_class(cls, Backend, "backend")
    require(isinstance(cls.requires, tuple) and all(isinstance(m, str) for m in cls.requires),
            "`requires` must be a tuple of module names")
    b = s.backend
    require_limits(b)
    for attr in ("task_aware", "normalized", "matryoshka", "in_process"):
        require(isinstance(getattr(b, attr), bool), f"`{attr}` must be a bool")
    cost = b.batch_cost
    require(cost is None or (len(cost) == 3 and all(isinstance(c, (int, float)) and c >= 0 for c in cost)),
            f"`batch_cost` must be None or three non-negative numbers, got {cost!r}")


def check_options(s: Subject) -> None:
    """Unknown and invalid options fail as ConfigError (never at first request)."""
    s.build()
    require_options_rejected(s, "models.conformance.options",
                             " (use vecshim.BackendOptions, which forbids unknown keys)")


def check_info(s: Subject) -> None:
    """info() and fingerprint_parts() are JSON-safe dicts without secrets; the identity is not empty."""
    b = s.backend
    problem = identity_problem(b)
    require(problem is None, problem)
    for name in ("info", "fingerprint_parts"):
        value = getattr(b, name)()
        require(isinstance(value, dict), f"{name}() must return a dict, got {type(value).__name__}")
        try:
            text = json.dumps(value)
        except (TypeError, ValueError) as err:
            raise ConformanceError(f"{name}() is not JSON-serialisable: {err}") from None
        for secret in s.secrets():
            require(secret not in text, f"{name}() reveals a secret value")
    for secret in s.secrets():
        require(secret not in repr(b.options), "repr(options) reveals a secret value (use pydantic SecretStr)")


def check_dimension(s: Subject) -> None:
    """Every text, task and call gives vectors of one length; declared normalisation holds."""
    b = s.backend
    first = embed(b, TEXTS)
    dim = first.shape[1]
    require(b.dimension is None or b.dimension == dim,
            f"backend declares dimension {b.dimension} but returned vectors of length {dim}")
    long_text = _text_of(b, b.max_input_tokens or 256)
    for label, text in (("long", long_text), ("multilingual", TEXTS[3])):
        n = embed(b, [text]).shape[1]
        require(n == dim, f"a {label} text gave vectors of length {n}, short texts {dim}")
    for task in TASKS:
        again = embed(b, TEXTS[::-1], task)
        require(again.shape[1] == dim, f"task {task!r} gave dimension {again.shape[1]}, earlier {dim}")
    _close(first, embed(b, TEXTS), s.tolerance, "the same texts embedded twice")
    if b.normalized:
        norms = np.linalg.norm(first, axis=1)
        require(np.all(np.abs(norms - 1) < 1e-3),
                f"backend declares normalized=True but vector norms are {np.round(norms, 4).tolist()}")


def check_batch_equals_single(s: Subject) -> None:
    """A batch gives the same vectors as one call per text (order kept)."""
    b = s.backend
    size = min(len(TEXTS), b.max_batch_size or len(TEXTS))
    texts = TEXTS[:size]
    batch = embed(b, texts)
    single = np.concatenate([embed(b, [t]) for t in texts])
    _close(batch, single, s.tolerance, "batch vs one-by-one")


def check_tasks(s: Subject) -> None:
    """`task_aware` matches behaviour: query and passage differ exactly when it is True."""
    b = s.backend
    q, p = embed(b, TEXTS, "query"), embed(b, TEXTS, "passage")
    differs = bool(np.max(np.abs(q - p)) > s.tolerance)
    if b.task_aware:
        require(differs, "backend declares task_aware=True but query and passage vectors are identical")
    else:
        require(not differs, "query and passage vectors differ but task_aware is False: the core would "
                             "never send `query`; set task_aware = True")


def _text_of(b: Backend, limit: int) -> str:
    """The longest prefix of a word stream that counts at most `limit` tokens."""
    words = " ".join(_WORDS[i % len(_WORDS)] for i in range(limit + 8))
    while b.count_tokens([words])[0] <= limit:
        words += " " + words
    lo, hi = 1, len(words)
    while lo < hi:  # largest character prefix within the limit
        mid = (lo + hi + 1) // 2
        if b.count_tokens([words[:mid]])[0] <= limit:
            lo = mid
        else:
            hi = mid - 1
    return words[:lo]


def check_long_text(s: Subject) -> None:
    """count_tokens is sane; a text at max_input_tokens embeds; split_text windows fit."""
    b = s.backend
    counts = b.count_tokens(list(TEXTS))
    require(len(counts) == len(TEXTS) and all(isinstance(n, int) and n >= 0 for n in counts),
            f"count_tokens() must return one non-negative int per text, got {counts!r}")
    limit = b.max_input_tokens or 512
    text = _text_of(b, limit)
    n = b.count_tokens([text])[0]
    require(n >= limit * 0.9, f"could not build a text near {limit} tokens (got {n})")
    vecs = embed(b, [text, "short"])
    require(vecs.shape[1] == embed(b, ["short"]).shape[1], "a long text changed the dimension")
    long_text = " ".join([text] * 3)
    for window_tokens in (limit, max(1, limit // 7), 3):
        windows = b.split_text(long_text, window_tokens)
        require(isinstance(windows, list) and windows and all(isinstance(w, str) and w for w in windows),
                "split_text() must return a non-empty list of non-empty strings")
        sizes = b.count_tokens(windows)
        require(max(sizes) <= window_tokens,
                f"split_text(text, {window_tokens}) made a window of {max(sizes)} tokens")
        require("".join(windows).replace(" ", "") == long_text.replace(" ", ""),
                f"split_text(text, {window_tokens}) lost or reordered text")


def check_concurrency(s: Subject) -> None:
    """embed() from several threads at once gives the sequential results."""
    b = s.backend
    batches = [[f"{t} #{i}" for t in TEXTS[i % 3::3]] for i in range(s.threads * 2)]
    want = [embed(b, batch) for batch in batches]
    got: list[Any] = [None] * len(batches)
    start = threading.Barrier(s.threads)

    def worker(k: int) -> None:
        start.wait()
        for i in range(k, len(batches), s.threads):
            try:
                got[i] = embed(b, batches[i])
            except BaseException as err:  # reported below, in the test's thread
                got[i] = err

    require(run_threads(s.threads, worker), "embed() calls from several threads did not finish in 120 s")
    for i, (w, g) in enumerate(zip(want, got)):
        if isinstance(g, BaseException):
            raise ConformanceError(f"concurrent embed() raised {type(g).__name__}: {g}")
        _close(w, g, s.tolerance, f"concurrent vs sequential (batch {i})")


def check_failure(s: Subject) -> None:
    """With `failing_options`, embed() raises a vecshim.BackendError without secrets."""
    if s.failing_options is None:
        return
    backend = s.build(s.failing_options)
    try:
        try:
            backend.load()
            backend.embed(["this call is expected to fail"], "passage")
        except (BackendError, ConfigError) as err:
            for secret in [*s.secrets(), *_secret_options(backend)]:
                require(secret not in str(err), "the error message reveals a secret value")
            return
        except Exception as err:
            raise ConformanceError(f"failure raised {type(err).__name__}: {err}; raise vecshim.BackendError "
                                   "(or UpstreamError) so clients get a clear 502") from None
        raise ConformanceError("failing_options were given but embed() succeeded")
    finally:
        backend.close()


def _secret_options(backend: Backend) -> list[str]:
    return [v.get_secret_value() for _, v in backend.options if isinstance(v, SecretStr) and v.get_secret_value()]


def check_served(s: Subject) -> None:
    """Through the core (batcher, checks, long-text policy) as the server runs it."""
    cfg = ModelConfig(backend=s.backend_class.name, options=s.options, timeout_s=60)
    model = Model("conformance", cfg, s.build(cfg.options))
    try:
        model.load()
        direct = embed(s.backend, TEXTS[:3], "query")
        served = np.stack(model.embed(list(TEXTS[:3]), "query"))
        require(served.shape == direct.shape, f"served shape {served.shape} != direct {direct.shape}")
        if model.cfg.normalize is None:
            _close(served, direct, max(s.tolerance, 1e-5), "served vs direct embed()")
        long_text = _text_of(s.backend, (s.backend.max_input_tokens or 512) * 2)
        require(model.embed([long_text])[0].shape[0] == model.dimension, "chunked long text changed the dimension")
    except VecshimError as err:
        raise ConformanceError(f"the core could not serve the backend: {type(err).__name__}: {err.message}") from None
    finally:
        model.close(10)


#: Every check, in the order `run_conformance` runs them.
CHECKS: tuple[Callable[[Subject], None], ...] = (
    check_class, check_options, check_info, check_dimension, check_batch_equals_single,
    check_tasks, check_long_text, check_concurrency, check_failure, check_served,
)
