"""What the checks share: the subject under test, the texts, and checked embedding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pydantic import SecretStr

from ..backend import Backend
from ..config import ModelConfig
from ..model import build_backend

__all__ = ["ConformanceError", "Subject", "TEXTS", "require", "embed", "assert_close"]

#: Texts every check embeds: prose, a question, one word, non-ASCII, control
#: characters, and the single space Weaviate sends for objects without text.
TEXTS = (
    "The London Eye is a cantilevered observer wheel on the South Bank of the Thames.",
    "What is the capital of France?",
    "short",
    "Ünïcödé: naïve café, 東京タワー, Ελληνικά, emoji 🚀",
    "line one\nline two\ttabbed",
    " ",
    "Weaviate stores objects and their vectors side by side.",
    "0123456789 !?#$%&*()[]{}",
)
#: Words the long-text check repeats (varied so subword tokenizers cannot merge them).
_WORDS = ("river", "lantern", "quietly", "mountain", "seven", "copper", "harbour", "whisper",
          "garden", "electric", "north", "paper", "violet", "engine", "morning", "salt")
#: An option whose name ends in one of these words holds a secret, even as a plain str.
_SECRET_FIELD = ("key", "token", "secret", "password")


class ConformanceError(AssertionError):
    """A backend broke the Backend contract; the message says how."""


def require(ok: Any, message: str) -> None:
    """Raise ConformanceError(message) unless `ok`."""
    if not ok:
        raise ConformanceError(message)


@dataclass
class Subject:
    """The backend under test: its class, options and what the author tells the kit."""

    backend_class: type[Backend]
    options: dict[str, Any] = field(default_factory=dict)
    secret_values: Sequence[str] = ()
    invalid_options: Sequence[dict[str, Any]] = ()
    failing_options: dict[str, Any] | None = None
    tolerance: float = 1e-4
    threads: int = 8
    _loaded: Backend | None = None

    def build(self, options: dict[str, Any] | None = None) -> Backend:
        """Validate options and construct the backend exactly as the server does."""
        cfg = ModelConfig(backend=self.backend_class.name, options=self.options if options is None else options)
        return build_backend("conformance", cfg, self.backend_class)

    @property
    def backend(self) -> Backend:
        """One built and loaded backend, shared by the checks."""
        if self._loaded is None:
            backend = self.build()
            backend.load()
            self._loaded = backend
        return self._loaded

    def close(self) -> None:
        """Close the shared backend."""
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None

    def secrets(self) -> list[str]:
        """Given secret values plus every SecretStr or key-like string option."""
        found = [s for s in self.secret_values if s]
        for name, value in self.backend.options:
            if isinstance(value, SecretStr) and value.get_secret_value():
                found.append(value.get_secret_value())
            elif isinstance(value, str) and len(value) >= 6 and name.lower().rsplit("_", 1)[-1] in _SECRET_FIELD:
                found.append(value)
        return found


def embed(backend: Backend, texts: Sequence[str], task: str = "passage") -> np.ndarray:
    """Call `backend.embed` and check the reply's shape and numbers."""
    raw = backend.embed(list(texts), task)
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConformanceError(f"embed() returned something that is not a list of numeric vectors: {err}") from None
    require(arr.ndim == 2 and arr.shape[0] == len(texts),
            f"embed() of {len(texts)} texts returned shape {arr.shape}, want ({len(texts)}, dimension)")
    require(arr.shape[1] > 0, "embed() returned empty vectors")
    require(np.isfinite(arr).all(), "embed() returned NaN or infinite values")
    return arr


def assert_close(a: np.ndarray, b: np.ndarray, tol: float, what: str) -> None:
    worst = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
    require(worst <= tol, f"{what}: vectors differ by up to {worst:.3g} (tolerance {tol:g})")
