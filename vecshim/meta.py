"""Pre-rendered `/meta` bodies: rebuilt when a model's state changes, never on a request."""
from __future__ import annotations

import json
from typing import Callable

from . import __version__

__all__ = ["MetaPages"]


def _dump(data) -> bytes:
    return json.dumps(data, separators=(",", ":"), default=str).encode()


class MetaPages:
    """The /meta body of the server (key None) and of each model and reranker (key: its name)."""

    def __init__(self, models: dict, default_model: str, plugins: list, engine: Callable[[], dict] | None = None,
                 rerankers: dict | None = None, default_reranker: str | None = None):
        self.models = models
        self.default_model = default_model
        self.plugins = plugins
        self.rerankers = rerankers or {}
        self.default_reranker = default_reranker
        self.engine = engine  # facts about where inference runs, for the root page
        self._pages: dict[str | None, bytes] = {}
        self.render()

    def render(self) -> None:
        """Rebuild every page from the models' current facts."""
        infos = {name: m.info() for name, m in self.models.items()}
        root = {
            "vecshim_version": __version__,
            "default_model": self.default_model,
            "model": infos[self.default_model],
            "models": infos,
            "default_reranker": self.default_reranker,
            "rerankers": {name: r.info() for name, r in self.rerankers.items()},
            "plugins": self.plugins,
        }
        if self.engine is not None:
            root["engine"] = self.engine()
        pages = {None: _dump(root)}
        for name, info in infos.items():
            pages[name] = _dump({"vecshim_version": __version__, "model": info})
        for name, info in root["rerankers"].items():
            pages[name] = _dump({"vecshim_version": __version__, "reranker": info})
        self._pages = pages

    def get(self, name: str | None) -> bytes:
        """The page for the server (None) or a known model."""
        return self._pages[name]
