"""`BackendConformance`: the conformance checks as pytest tests (imports pytest).

`Conformance` holds what the author sets on either kit; `RerankerConformance`
(in `rerank_kit`) builds on it too.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import pytest

from ..backend import Backend
from . import checks
from .subject import PluginSubject, Subject

__all__ = ["BackendConformance", "Conformance"]


class Conformance:
    """What the author sets on a kit's pytest base class, and the subject it makes of them.

    Not collected itself (no `Test` prefix); a subclass named `Test...` is.
    """

    #: The `options:` mapping a config would give it.
    options: ClassVar[dict[str, Any]] = {}
    #: Values that must never appear in info(), fingerprint_parts() or error messages.
    secret_values: ClassVar[Sequence[str]] = ()
    #: Option mappings that must be rejected at config time (unknown keys are always tried).
    invalid_options: ClassVar[Sequence[dict[str, Any]]] = ()
    #: Options that validate and load but make embed() (a reranker: score()) fail (None: skip that check).
    failing_options: ClassVar[dict[str, Any] | None] = None
    #: Largest allowed difference between vectors (or scores) that should be equal.
    tolerance: ClassVar[float] = 1e-4
    #: Threads calling embed() (or score()) at once in the thread-safety check.
    threads: ClassVar[int] = 8

    @classmethod
    def _kit_settings(cls) -> dict[str, Any]:
        """The settings above, as a subject takes them."""
        return {"options": dict(cls.options), "secret_values": tuple(cls.secret_values),
                "invalid_options": tuple(cls.invalid_options), "failing_options": cls.failing_options,
                "tolerance": cls.tolerance, "threads": cls.threads}

    @classmethod
    def _kit_subject(cls) -> PluginSubject:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_subject(cls):
        """One loaded backend (or reranker) per test class, closed afterwards."""
        subject = cls._kit_subject()
        yield subject
        subject.close()


class BackendConformance(Conformance):
    """Base class of a backend's conformance tests; set the class attributes below and of `Conformance`."""

    #: The Backend subclass under test (required).
    backend_class: ClassVar[type[Backend]]

    @classmethod
    def _kit_subject(cls) -> Subject:
        return Subject(cls.backend_class, **cls._kit_settings())

    def test_class_and_capabilities(self, conformance_subject):
        """A concrete Backend with a name, a pydantic Options and well-typed capabilities."""
        checks.check_class(conformance_subject)

    def test_options_validated(self, conformance_subject):
        """Unknown or invalid options fail as ConfigError when the config is checked."""
        checks.check_options(conformance_subject)

    def test_info_has_no_secrets(self, conformance_subject):
        """info() and fingerprint_parts() are JSON-safe, never reveal secrets, and name the model."""
        checks.check_info(conformance_subject)

    def test_dimension_stable(self, conformance_subject):
        """One vector length for every text (short, long, multilingual) and task; as declared."""
        checks.check_dimension(conformance_subject)

    def test_batch_equals_one_by_one(self, conformance_subject):
        """A batch gives the vectors single calls give."""
        checks.check_batch_equals_single(conformance_subject)

    def test_query_and_passage(self, conformance_subject):
        """task_aware matches whether query and passage differ."""
        checks.check_tasks(conformance_subject)

    def test_long_text_within_limit(self, conformance_subject):
        """A text at max_input_tokens embeds; split_text windows fit the limit."""
        checks.check_long_text(conformance_subject)

    def test_thread_safety(self, conformance_subject):
        """Concurrent embed() calls give the sequential results."""
        checks.check_concurrency(conformance_subject)

    def test_failures_raise_backend_error(self, conformance_subject):
        """With failing_options, embed() raises vecshim.BackendError without secrets."""
        if self.failing_options is None:
            pytest.skip("no failing_options given")
        checks.check_failure(conformance_subject)

    def test_served_through_the_core(self, conformance_subject):
        """The core's batcher, checks and long-text policy serve it."""
        checks.check_served(conformance_subject)
