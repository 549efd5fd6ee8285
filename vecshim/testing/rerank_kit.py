"""`RerankerConformance`: the reranker checks as pytest tests (imports pytest)."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import pytest

from ..reranker import Reranker
from .rerank_checks import (
    RerankerSubject, check_reranker_class, check_reranker_concurrency, check_reranker_failure, check_reranker_info,
    check_reranker_options, check_reranker_scores, check_reranker_served,
)
from .kit import Conformance

__all__ = ["RerankerConformance"]


class RerankerConformance(Conformance):
    """Base class of a reranker's conformance tests; set the class attributes below and of `Conformance`."""

    #: The Reranker subclass under test (required).
    reranker_class: ClassVar[type[Reranker]]
    #: Embedding models handed to `use_models()` (objects with `embed(texts, task)`).
    models: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def _kit_subject(cls) -> RerankerSubject:
        return RerankerSubject(cls.reranker_class, **cls._kit_settings(), models=dict(cls.models))

    @pytest.fixture(scope="class")
    @classmethod
    def reranker_subject(cls, conformance_subject):
        """The test class's loaded reranker (`conformance_subject` by its reranker name)."""
        return conformance_subject

    def test_reranker_class(self, reranker_subject):
        """A concrete Reranker with a name, a pydantic Options and sane capabilities."""
        check_reranker_class(reranker_subject)

    def test_reranker_options_validated(self, reranker_subject):
        """Unknown or invalid options fail as ConfigError."""
        check_reranker_options(reranker_subject)

    def test_reranker_info_has_no_secrets(self, reranker_subject):
        """info() and fingerprint_parts() are JSON-safe and never reveal secrets."""
        check_reranker_info(reranker_subject)

    def test_scores_in_input_order(self, reranker_subject):
        """One finite score per document, deterministic, in input order, batch equals single."""
        check_reranker_scores(reranker_subject)

    def test_reranker_thread_safety(self, reranker_subject):
        """Concurrent score() calls give the sequential results."""
        check_reranker_concurrency(reranker_subject)

    def test_reranker_failures_raise_backend_error(self, reranker_subject):
        """With failing_options, score() raises vecshim.BackendError without secrets."""
        if self.failing_options is None:
            pytest.skip("no failing_options given")
        check_reranker_failure(reranker_subject)

    def test_reranker_served_through_the_core(self, reranker_subject):
        """The core's batcher, checks and long-document policy serve it."""
        check_reranker_served(reranker_subject)
