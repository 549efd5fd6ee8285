"""What a served model (vecshim.model) and a served reranker (vecshim.ranking) share: readiness and shutdown."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

from .errors import BackendError, BackendUnavailable, VecshimError

__all__ = ["Served", "fingerprint_hash"]


def fingerprint_hash(parts: dict[str, Any]) -> str:
    """Short stable hash of a `fingerprint_parts()` mapping."""
    raw = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class Served:
    """A named backend as served: `loading` until `load()` marks it ready, or `failed` with an error."""

    #: The words for it and for its plugin in messages: `model` and `backend`, or `reranker` twice.
    kind = "model"
    plugin_kind = "backend"
    #: The logger of the subclass's module.
    _log = logging.getLogger("vecshim.served")

    def __init__(self, name: str, cfg, backend, *, stats=None):
        self.name = name
        self.cfg = cfg
        self.backend = backend
        self.stats = stats
        self.state = "loading"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.batcher = None
        self.resilience = None
        self.fallbacks: list = []
        #: Called once loaded, just before `ready` turns true.
        self.on_ready = None
        #: Set before load() to learn, per backend call, from how many senders its texts came
        #: (`batching.caller_source`; the engine counts HTTP workers with it).
        self.on_sources = None
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        """True once loaded and warmed up."""
        return self._ready.is_set()

    def _mark_ready(self) -> None:
        self.state, self.error = "ready", None
        if self.on_ready is not None:
            self.on_ready()  # e.g. re-render /meta before anyone sees it as ready
        self._ready.set()

    def _await_ready(self) -> None:
        """Wait while loading (another worker may have answered readiness first); refuse if not ready then."""
        if not self.ready and self.state == "loading":
            self._ready.wait(self.cfg.timeout_s)
        if not self.ready:
            raise BackendUnavailable(f"{self.kind} {self.name!r} is not ready ({self.error or self.state})")

    def _guarded(self, call):
        """`call()`; any other exception than a VecshimError is a plugin bug: the client gets a 502
        naming the plugin, never the exception's text (it may hold a key); the traceback goes to the
        (redacted) log."""
        try:
            return call()
        except VecshimError:
            raise
        except Exception as err:
            self._log.error("%s %r raised %s", self.plugin_kind, self.backend.name, type(err).__name__, exc_info=True)
            raise BackendError(f"{self.plugin_kind} {self.backend.name!r} failed ({type(err).__name__}); "
                               f"see the server log") from None

    def _batch_observers(self) -> dict[str, Any]:
        """The batcher's metrics callbacks and stuck-batch limit."""
        return {"on_batch": self.stats.batch_observer(self.name) if self.stats else None,
                "on_depth": self.stats.depth_observer(self.name) if self.stats else None,
                "on_sources": self.on_sources,
                "stuck_after_s": self.cfg.timeout_s}

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued work and release the backend."""
        if self.batcher:
            self.batcher.close(timeout)
        self.backend.close()
