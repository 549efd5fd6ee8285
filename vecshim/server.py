"""gunicorn with vecshim's defaults; models load in each worker after fork."""
from __future__ import annotations

import os

from gunicorn.app.base import BaseApplication

__all__ = ["DEFAULTS", "VecshimServer", "default_workers"]

#: Settings `vecshim serve` passes to gunicorn (see docs/operations.md).
DEFAULTS = {
    "bind": "0.0.0.0:8080",
    "worker_class": "gthread",
    # Requests mostly wait on the batcher, so many threads cost little and
    # let tens of Weaviate requests queue into one batch.
    "threads": 64,
    # Above Go's 90 s idle reuse, so Weaviate never reuses a closed connection.
    "keepalive": 120,
    "timeout": 120,
    "graceful_timeout": 30,
    "accesslog": "-",
    "errorlog": "-",
    "preload_app": False,  # load models after fork, never in the master
    "max_requests": 0,
    "max_requests_jitter": 0,
    # gunicorn >= 25.1 opens a control socket in $HOME; several instances on
    # one host (or a read-only home in a container) would clash.
    "control_socket_disable": True,
}


def default_workers(config) -> int:
    """One worker when a model runs in-process (torch already uses every core), else 2."""
    from .app import build_models
    from .plugins import collect_backends, get_plugin_manager

    pm = get_plugin_manager(dirs=config.plugins.dirs, disable=config.plugins.disable,
                            load_entrypoints=config.plugins.entrypoints)
    registry = collect_backends(pm)
    build_models(config, registry, cache=None)  # validates options before forking
    if any(registry.get(m.backend).in_process for m in config.models.values()):
        return 1
    return 2


class VecshimServer(BaseApplication):
    """gunicorn application serving `create_app(config_path)` in each worker."""

    def __init__(self, config_path: str | None, settings: dict):
        self.config_path = config_path
        self.settings = settings
        super().__init__()

    def load_config(self):
        for key, value in self.settings.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        if self.config_path:
            os.environ["VECSHIM_CONFIG"] = self.config_path
        from .app import create_app

        return create_app(self.config_path)
