"""The reranker conformance checks, as plain functions (the pytest base class is in `rerank_kit`).

They build on the backend kit's machinery in `subject`: the subject's settings and
loading, the runner, the class, limit and option rules and the thread harness.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import SecretStr

from ..config import RerankerConfig
from ..errors import BackendError, ConfigError, VecshimError
from ..ranking import Ranker, bind_models, build_reranker
from ..reranker import Reranker
from .subject import (
    _SECRET_FIELD, _WORDS, TEXTS, ConformanceError, PluginSubject, require, require_limits, require_options_rejected,
    require_plugin_class, run_checks, run_threads,
)

__all__ = ["RerankerSubject", "RERANKER_CHECKS", "run_reranker_conformance", "QUERY"]

QUERY = "Which tower stands in Tokyo?"
#: Documents every check scores: the shared texts plus the empty document Weaviate sends.
DOCUMENTS = (*TEXTS, "")


@dataclass
class RerankerSubject(PluginSubject):
    """The reranker under test (`backend_class`, also `reranker_class`): its class, options, and the
    embedding models it may use."""

    backend_class: type[Reranker]
    models: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reranker_class(self) -> type[Reranker]:
        return self.backend_class

    def build(self, options: dict[str, Any] | None = None) -> Reranker:
        """Validate options, construct and hand over the models, as the server does."""
        cfg = RerankerConfig(backend=self.reranker_class.name, options=self.options if options is None else options)
        reranker = build_reranker("conformance", cfg, self.reranker_class)
        bind_models("conformance", reranker, self.models)
        return reranker

    @property
    def reranker(self) -> Reranker:
        """The loaded reranker shared by the checks."""
        return self.backend

    def scores(self, query: str, documents: Sequence[str], reranker: Reranker | None = None) -> np.ndarray:
        """Call score() and check one finite number per document, within score_range."""
        r = reranker or self.reranker
        raw = r.score(query, list(documents))
        try:
            arr = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise ConformanceError(f"score() returned something that is not numbers: {err}") from None
        require(arr.shape == (len(documents),), f"score() returned {arr.size} scores for {len(documents)} documents")
        require(np.isfinite(arr).all(), "score() returned a non-finite score")
        low, high = r.score_range
        slack = self.tolerance
        require((low is None or arr.min() >= low - slack) and (high is None or arr.max() <= high + slack),
                f"scores {arr.min():.4g}..{arr.max():.4g} fall outside score_range {r.score_range}")
        return arr


def _close(a: np.ndarray, b: np.ndarray, tol: float, what: str) -> None:
    require(np.allclose(a, b, atol=tol, rtol=0), f"{what}: largest difference {np.abs(a - b).max():.3g} > {tol}")


def check_reranker_class(s: RerankerSubject) -> None:
    """A concrete Reranker with a name, a pydantic Options and well-typed capabilities."""
    require_plugin_class(s.reranker_class, Reranker, "reranker")
    r = s.reranker
    require_limits(r)
    low, high = r.score_range
    require(all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in (low, high))
            and (low is None or high is None or low < high), f"`score_range` is malformed: {r.score_range!r}")
    require(isinstance(r.delegates, bool) and isinstance(r.in_process, bool), "`delegates`/`in_process` must be bools")


def check_reranker_options(s: RerankerSubject) -> None:
    """Unknown and invalid options fail as ConfigError naming the option."""
    require_options_rejected(s, "rerankers.conformance")


def check_reranker_info(s: RerankerSubject) -> None:
    """info() and fingerprint_parts() are JSON-safe dicts without secrets."""
    r = s.reranker
    for what in ("info", "fingerprint_parts"):
        value = getattr(r, what)()
        require(isinstance(value, dict), f"{what}() must return a dict")
        text = json.dumps(value)
        for secret in s.secret_values:
            require(secret not in text, f"{what}() reveals a secret value")
    secrets = [v.get_secret_value() for k, v in r.options if isinstance(v, SecretStr)]
    secrets += [v for k, v in r.options if isinstance(v, str) and k.lower().endswith(_SECRET_FIELD)]
    for secret in filter(None, secrets):
        require(secret not in json.dumps(r.info()), "info() reveals a secret option")


def check_reranker_scores(s: RerankerSubject) -> None:
    """One finite score per document (empty ones too), deterministic, in input order, batch = single."""
    docs = list(DOCUMENTS)
    batch = s.scores(QUERY, docs)
    _close(batch, s.scores(QUERY, docs), s.tolerance, "two identical calls differ")
    _close(s.scores(QUERY, docs[::-1]), batch[::-1], s.tolerance, "reversing the documents does not reverse the scores")
    single = np.array([s.scores(QUERY, [d])[0] for d in docs])
    _close(batch, single, s.tolerance, "a batch differs from one-by-one calls")


def check_reranker_concurrency(s: RerankerSubject) -> None:
    """Concurrent score() calls give the sequential results."""
    queries = [QUERY, "What is the capital of France?", "river harbour"]
    expected = {q: s.scores(q, list(DOCUMENTS)) for q in queries}
    errors: list[BaseException] = []
    results: dict[int, tuple[str, np.ndarray]] = {}

    def work(i: int) -> None:
        q = queries[i % len(queries)]
        try:
            results[i] = (q, s.scores(q, list(DOCUMENTS)))
        except BaseException as err:  # reported below
            errors.append(err)

    run_threads(s.threads, work)
    require(not errors, f"concurrent score() raised {errors[:1]!r}")
    require(len(results) == s.threads, "concurrent score() calls did not finish within 120 s")
    for q, got in results.values():
        _close(got, expected[q], s.tolerance, "concurrent results differ from sequential ones")


def check_reranker_failure(s: RerankerSubject) -> None:
    """With failing_options, load() or score() raises BackendError/ConfigError without secrets."""
    r = s.build(s.failing_options)
    try:
        r.load()
        r.score(QUERY, ["x"])
    except (BackendError, ConfigError) as err:
        for secret in s.secret_values:
            require(secret not in err.message, "the error message reveals a secret value")
    except Exception as err:
        raise ConformanceError(f"failure raised {type(err).__name__}, not vecshim.BackendError") from None
    else:
        raise ConformanceError("failing_options did not make score() fail")
    finally:
        r.close()


def check_reranker_served(s: RerankerSubject) -> None:
    """The core (batcher, checks, long-document policy) serves it and keeps input order."""
    cfg = RerankerConfig(backend=s.reranker_class.name, options=s.options)
    ranker = Ranker("conformance", cfg, s.build())
    try:
        ranker.load()
        docs = list(DOCUMENTS)
        _close(ranker.rank(QUERY, docs), s.scores(QUERY, docs), s.tolerance, "served scores differ from score()")
        limit = ranker.backend.max_input_tokens
        if limit:
            long_doc = " ".join(_WORDS[i % len(_WORDS)] for i in range(2 * limit))
            got = ranker.rank(QUERY, [long_doc, "short"])
            require(got.shape == (2,) and np.isfinite(got).all(), "a document twice the limit was not scored")
    except VecshimError as err:
        raise ConformanceError(f"served through the core: {type(err).__name__}: {err.message}") from None
    finally:
        ranker.close()


RERANKER_CHECKS = (check_reranker_class, check_reranker_options, check_reranker_info, check_reranker_scores,
                   check_reranker_concurrency, check_reranker_failure, check_reranker_served)


def run_reranker_conformance(reranker_class: type[Reranker], options: dict[str, Any] | None = None, *,
                             models: Mapping[str, Any] | None = None, secret_values: Sequence[str] = (),
                             invalid_options: Sequence[dict] = (), failing_options: dict[str, Any] | None = None,
                             tolerance: float = 1e-4, threads: int = 8) -> list[str]:
    """Run every reranker check; return their names, or raise ConformanceError listing each failure."""
    subject = RerankerSubject(reranker_class, dict(options or {}), tuple(secret_values), tuple(invalid_options),
                              failing_options, tolerance, threads, dict(models or {}))
    return run_checks(subject, [c for c in RERANKER_CHECKS
                                if not (c is check_reranker_failure and failing_options is None)])
