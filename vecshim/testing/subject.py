"""What the checks share: the subject under test, the texts, the runner, and the rules that
backends and rerankers alike must keep (the reranker kit builds on these)."""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel, SecretStr

from ..backend import Backend
from ..config import ModelConfig
from ..errors import ConfigError
from ..model import build_backend

__all__ = ["ConformanceError", "PluginSubject", "Subject", "TEXTS", "require", "embed", "assert_close", "run_checks",
           "require_plugin_class", "require_limits", "require_options_rejected", "run_threads"]

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
#: Capabilities that are None or a positive int, on backends and rerankers alike.
_LIMITS = ("max_batch_size", "max_input_tokens", "max_batch_tokens", "concurrency")


class ConformanceError(AssertionError):
    """A backend broke the Backend contract; the message says how."""


def require(ok: Any, message: str) -> None:
    """Raise ConformanceError(message) unless `ok`."""
    if not ok:
        raise ConformanceError(message)


@dataclass
class PluginSubject:
    """The plugin under test: its class (what a config's `backend:` names), options and what the
    author tells the kit. `Subject` builds a backend, `RerankerSubject` a reranker."""

    backend_class: type
    options: dict[str, Any] = field(default_factory=dict)
    secret_values: Sequence[str] = ()
    invalid_options: Sequence[dict[str, Any]] = ()
    failing_options: dict[str, Any] | None = None
    tolerance: float = 1e-4
    threads: int = 8
    _loaded: Any = field(default=None, init=False, repr=False)

    def build(self, options: dict[str, Any] | None = None):
        """Validate options and construct the plugin exactly as the server does."""
        raise NotImplementedError

    @property
    def backend(self):
        """One built and loaded plugin, shared by the checks."""
        if self._loaded is None:
            backend = self.build()
            backend.load()
            self._loaded = backend
        return self._loaded

    def close(self) -> None:
        """Close the shared plugin."""
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


@dataclass
class Subject(PluginSubject):
    """The backend under test: its class, options and what the author tells the kit."""

    backend_class: type[Backend]

    def build(self, options: dict[str, Any] | None = None) -> Backend:
        """Validate options and construct the backend exactly as the server does."""
        cfg = ModelConfig(backend=self.backend_class.name, options=self.options if options is None else options)
        return build_backend("conformance", cfg, self.backend_class)


def run_checks(subject: PluginSubject, checks: Sequence[Callable[[Any], None]]) -> list[str]:
    """Run `checks` on `subject`, then close it; return their names, or raise ConformanceError listing each failure."""
    failures = []
    try:
        for check in checks:
            try:
                check(subject)
            except ConformanceError as err:
                failures.append(f"{check.__name__}: {err}")
            except Exception as err:  # a plugin that crashes a check fails it too
                failures.append(f"{check.__name__}: {type(err).__name__}: {err}")
    finally:
        subject.close()
    if failures:
        raise ConformanceError("\n".join(failures))
    return [c.__name__ for c in checks]


def require_plugin_class(cls: Any, base: type, word: str) -> None:
    """A concrete subclass of `base` (Backend or Reranker) with a `name` and a pydantic `Options`."""
    require(inspect.isclass(cls) and issubclass(cls, base), f"{cls!r} is not a vecshim.{base.__name__} subclass")
    require(isinstance(getattr(cls, "name", None), str) and cls.name, f"{word} has no `name`")
    require(not inspect.isabstract(cls), f"{word} does not implement {sorted(cls.__abstractmethods__)}")
    require(inspect.isclass(cls.Options) and issubclass(cls.Options, BaseModel), "`Options` is not a pydantic model")


def require_limits(plugin: Any) -> None:
    """Each size and concurrency limit is None or a positive int."""
    for attr in _LIMITS:
        value = getattr(plugin, attr)
        require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                f"`{attr}` must be None or a positive int, got {value!r}")


def require_options_rejected(s: PluginSubject, where: str, hint: str = "") -> None:
    """Unknown keys and every `invalid_options` fail to build, as a ConfigError whose message names `where`."""
    for options in [{**s.options, "no_such_option_xyz": 1}, *s.invalid_options]:
        try:
            s.build(options)
        except ConfigError as err:
            require(where in err.message, f"the error for options {options} does not name the option: {err.message!r}")
        else:
            raise ConformanceError(f"options {options} were accepted; Options must reject them{hint}")


def run_threads(count: int, work: Callable[[int], None]) -> bool:
    """Run `work(0)` ... `work(count - 1)` on `count` threads at once; False if any runs past 120 s."""
    threads = [threading.Thread(target=work, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return not any(t.is_alive() for t in threads)


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
