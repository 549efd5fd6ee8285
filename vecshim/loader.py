"""The configured models of one process: build, load in the background, check fallbacks, close.

Used by the HTTP app when models run in-process and by the engine process
(vecshim/engine/) when one engine serves every HTTP worker of a replica.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .config import Config
from .errors import ConfigError, VecshimError
from .model import Model, UnavailableBackend, build_backend
from .space import differences, require_identity

__all__ = ["ModelSet", "build_models", "describe_error"]

log = logging.getLogger("vecshim.app")


def describe_error(err: Exception) -> str:
    """`Type: message` of a load failure (VecshimError messages are client-safe)."""
    msg = err.message if isinstance(err, VecshimError) else str(err)
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def build_models(config: Config, registry, cache, stats=None, model_cls: type[Model] = Model) -> dict[str, Model]:
    """Validate every model's backend options and build the Model objects (no loading)."""
    from .budget import Fleet
    from .metrics import multiprocess_dir

    # The processes of one replica share `vecshim serve`'s metrics folder: their budget lives there.
    fleet = Fleet(config.budget, redis_url=config.budget.redis_url or config.cache.redis_url,
                  local_dir=multiprocess_dir(), stats=stats)
    models = {}
    for name, mcfg in config.models.items():
        reason = config.unavailable.get(name)
        try:
            try:
                cls = registry.get(mcfg.backend)
            except ConfigError as err:
                raise ConfigError(f"models.{name}.backend: {err.message}") from None
            backend = build_backend(name, mcfg, cls)
            require_identity(name, backend)
        except ConfigError as err:
            if mcfg.required:
                raise
            reason, backend = reason or err.message, UnavailableBackend(mcfg.backend)
        models[name] = model_cls(name, mcfg, backend, cache=cache, stats=stats, fleet=fleet,
                                 origin=getattr(registry, "origins", {}).get(mcfg.backend))
        if reason:  # optional and cannot start: served as 503, never loaded
            models[name].state, models[name].error = "unavailable", reason
            log.warning("model %r (required: false) is unavailable: %s", name, reason)
    for name, m in models.items():
        # an unavailable optional model can't be anyone's fallback (nor be compared with one)
        m.fallbacks = [models[f] for f in config.models[name].fallbacks if models[f].state != "unavailable"]
        m.dropped_fallbacks = [{"name": f, "reason": f"unavailable: {models[f].error}"}
                               for f in config.models[name].fallbacks if models[f].state == "unavailable"]
        for fb in m.fallbacks:
            # Only what config alone decides; the rest is compared once both are loaded.
            diff = differences(m.fingerprint_parts(), fb.fingerprint_parts(), known_only=True)
            if diff:
                raise ConfigError(f"models.{name}.fallbacks: fallback {fb.name}: {'; '.join(diff)} "
                                  f"(a fallback must embed into the same vector space)")
    return models


class ModelSet:
    """Models by name plus the thread that loads them; `on_change` runs after every state change."""

    def __init__(self, models: dict[str, Model], on_change: Callable[[], None] | None = None,
                 rerankers: dict | None = None):
        self.models = models
        self.rerankers = rerankers or {}
        self.on_change = on_change or (lambda: None)
        for m in models.values():
            m.on_ready = m.on_change = self._changed
        for r in self.rerankers.values():
            r.on_ready = self._changed
        self._loader: threading.Thread | None = None
        self._stop = threading.Event()

    def _changed(self) -> None:
        self.on_change()

    def start_loading(self) -> threading.Thread:
        """Load every model in a background thread, retrying failures with backoff."""
        self._loader = threading.Thread(target=self._load_all, name="vecshim-loader", daemon=True)
        self._loader.start()
        return self._loader

    def wait_ready(self, timeout: float) -> bool:
        """Block until all required models are ready (tests and the CLI)."""
        deadline = time.monotonic() + timeout
        for m in [*self.models.values(), *self.rerankers.values()]:
            if m.cfg.required and not m._ready.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def _load_all(self) -> None:
        # Rerankers may embed through the models: load them last.
        pending = [m for m in [*self.models.values(), *self.rerankers.values()] if m.state != "unavailable"]
        delay = 1.0
        while pending and not self._stop.is_set():
            failed = []
            for m in pending:
                try:
                    m.load()
                except Exception as err:  # keep serving /meta and readiness; retry below
                    m.state, m.error = "failed", describe_error(err)
                    try:  # the next attempt builds fresh clients; free these
                        m.backend.close()
                    except Exception:
                        log.debug("closing model %r after a failed load also failed", m.name, exc_info=True)
                    log.error("model %r failed to load: %s (retrying in %.0f s)", m.name, m.error, delay,
                              extra={"model": m.name})
                    failed.append(m)
                self._changed()
            pending = failed
            if pending:
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        self.check_fallbacks()

    def check_fallbacks(self) -> None:
        """Drop fallbacks whose loaded vector space differs from their model's."""
        changed = False
        for m in self.models.values():
            for fb in list(m.fallbacks):  # a copy: mismatches are removed as we go
                if fb.ready and m.ready and fb.fingerprint != m.fingerprint:
                    diff = differences(m.fingerprint_parts(), fb.fingerprint_parts()) or ["fingerprint"]
                    reason = f"different vector space: {'; '.join(diff)}"
                    m.fallbacks.remove(fb)
                    m.dropped_fallbacks.append({"name": fb.name, "reason": reason})
                    changed = True
                    log.error("model %r: fallback %r dropped: %s", m.name, fb.name, reason)
        if changed:
            self._changed()

    def close(self, timeout: float = 30.0) -> None:
        """Stop loading and drain every model's queue."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for m in [*self.rerankers.values(), *self.models.values()]:
            m.close(max(0.0, deadline - time.monotonic()))
