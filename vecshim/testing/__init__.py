"""Conformance kit for backend authors: run the Backend contract as pytest tests.

Subclass `BackendConformance` in a test module and say what to test::

    from vecshim.testing import BackendConformance
    from vecshim_mybackend import MyBackend

    class TestMyBackend(BackendConformance):
        backend_class = MyBackend
        options = {"model": "small"}
        secret_values = ("s3cret",)          # must never show in info() or errors
        invalid_options = ({"model": 42},)   # must fail config validation
        failing_options = {"url": "http://127.0.0.1:9"}  # embed() must raise BackendError

Each contract rule is one test. Without pytest, `run_conformance(MyBackend,
{"model": "small"})` runs the same checks and raises ConformanceError
(pytest is imported only when `BackendConformance` is used). Rerankers have
the same pair: `RerankerConformance` and `run_reranker_conformance`.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..backend import Backend
from .checks import CHECKS
from .rerank_checks import RERANKER_CHECKS, RerankerSubject, run_reranker_conformance
from .subject import TEXTS, ConformanceError, Subject, run_checks

__all__ = ["BackendConformance", "ConformanceError", "Subject", "run_conformance", "CHECKS", "TEXTS",
           "RerankerConformance", "RerankerSubject", "run_reranker_conformance", "RERANKER_CHECKS"]


def run_conformance(backend_class: type[Backend], options: dict[str, Any] | None = None, *,
                    secret_values: Sequence[str] = (), invalid_options: Sequence[dict] = (),
                    failing_options: dict[str, Any] | None = None, tolerance: float = 1e-4,
                    threads: int = 8) -> list[str]:
    """Run every check; return their names, or raise ConformanceError listing each failure."""
    subject = Subject(backend_class, dict(options or {}), tuple(secret_values), tuple(invalid_options),
                      failing_options, tolerance, threads)
    return run_checks(subject, CHECKS)


def __getattr__(name: str):
    # BackendConformance needs pytest; run_conformance must work without it.
    if name == "BackendConformance":
        from .kit import BackendConformance
        return BackendConformance
    if name == "RerankerConformance":
        from .rerank_kit import RerankerConformance
        return RerankerConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
