"""create_app(): config -> plugin manager -> models -> blueprints. The only wiring place."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from functools import cached_property
from pathlib import Path
from typing import Iterable

from flask import Flask, g, has_request_context, request
from werkzeug.exceptions import HTTPException

from . import __version__
from .cache import build_cache
from .config import Config, load_config, parse_config
from .errors import ConfigError, UnknownModelError, VecshimError
from .model import Model, UnavailableBackend, build_backend
from .plugins import collect_backends, get_plugin_manager, plugin_infos
from .api import compat, openai, ops, weaviate
from .api import metrics as metrics_api
from .api.common import json_response
from .logs import configure_logging, new_request_id, request_id_var
from .metrics import Stats

__all__ = ["create_app", "State", "build_models"]

log = logging.getLogger("vecshim.app")
_SLASHES = re.compile(r"/{2,}")
_PROBES = ("/.well-known/live", "/.well-known/ready")


class State:
    """Everything a request needs, stored in `app.extensions["vecshim"]`."""

    def __init__(self, config: Config, pm, registry, models: dict[str, Model], cache, stats=None):
        self.config = config
        self.pm = pm
        self.registry = registry
        self.models = models
        self.cache = cache
        self.stats = stats
        self.draining = False
        #: HTTP requests being handled right now (for the drain summary on SIGTERM).
        self.in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.plugins = plugin_infos(pm)
        for m in models.values():
            m.on_ready = m.on_change = self.render_meta
        self._meta: dict[str | None, bytes] = {}
        self._loader: threading.Thread | None = None
        self._stop = threading.Event()
        self.render_meta()

    @property
    def default_model(self) -> str:
        return self.config.default_model

    def get_model(self, name: str | None) -> Model:
        """The named model (None: the default); unknown names are a 404 listing the models."""
        if name is None:
            name = self.config.default_model
        try:
            model = self.models[name]
        except KeyError:
            raise UnknownModelError(name, self.models) from None
        if has_request_context():
            g.vecshim_model = name  # labels metrics and the access log
        return model

    @cached_property
    def model_names(self) -> dict[str, str]:
        """Every name a model answers to on the OpenAI/Ollama routes -> its configured name."""
        aliases = {alias: name for name, m in self.config.models.items() for alias in m.aliases}
        return {**{name: name for name in self.models}, **{a: n for a, n in aliases.items() if a not in self.models}}

    def resolve_model(self, name: str | None) -> Model:
        """A model by configured name or alias (None: the default); unknown names list every name."""
        if name is None:
            return self.get_model(None)
        names = self.model_names
        if name not in names:
            raise UnknownModelError(name, names)
        return self.get_model(names[name])

    def not_ready_reason(self, name: str | None = None) -> str | None:
        """Why the server (or one model) can't serve yet; None when ready."""
        if self.draining:
            return "shutting down"
        if name is not None:
            models = [self.get_model(name)]
        else:  # `required: false` models never hold the server out of ready
            models = [m for m in self.models.values() if m.cfg.required]
        for m in models:
            if not m.ready:
                return f"model {m.name!r} is {m.state}" + (f": {m.error}" if m.error else "")
        return None

    def render_meta(self) -> None:
        """Pre-render /meta for the server and each model (on startup and state changes); update state gauges."""
        if self.stats is not None:
            for name, m in self.models.items():
                self.stats.set_model_state(name, m.state)
                if m.resilience is not None:
                    self.stats.track_circuit(name, lambda m=m: m.resilience.state)
        infos = {name: m.info() for name, m in self.models.items()}
        root = {
            "vecshim_version": __version__,
            "default_model": self.config.default_model,
            "model": infos[self.config.default_model],
            "models": infos,
            "plugins": self.plugins,
        }
        meta = {None: json.dumps(root, separators=(",", ":"), default=str).encode()}
        for name, info in infos.items():
            meta[name] = json.dumps({"vecshim_version": __version__, "model": info},
                                    separators=(",", ":"), default=str).encode()
        self._meta = meta

    def meta_bytes(self, name: str | None) -> bytes:
        """The /meta body for the server or one model."""
        if name is not None:
            self.get_model(name)
        return self._meta[name]

    def start_loading(self) -> threading.Thread:
        """Load every model in a background thread, retrying failures with backoff."""
        self._loader = threading.Thread(target=self._load_all, name="vecshim-loader", daemon=True)
        self._loader.start()
        return self._loader

    def wait_ready(self, timeout: float) -> bool:
        """Block until all models are ready (tests and the CLI)."""
        deadline = time.monotonic() + timeout
        for m in self.models.values():
            if m.cfg.required and not m._ready.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def _load_all(self) -> None:
        pending = [m for m in self.models.values() if m.state != "unavailable"]
        delay = 1.0
        while pending and not self._stop.is_set():
            failed = []
            for m in pending:
                try:
                    m.load()
                except Exception as err:  # keep serving /meta and readiness; retry below
                    m.state, m.error = "failed", _describe(err)
                    try:  # the next attempt builds fresh clients; free these
                        m.backend.close()
                    except Exception:
                        log.debug("closing model %r after a failed load also failed", m.name, exc_info=True)
                    log.error("model %r failed to load: %s (retrying in %.0f s)", m.name, m.error, delay,
                              extra={"model": m.name})
                    failed.append(m)
                self.render_meta()
            pending = failed
            if pending:
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        self._check_fallbacks()

    def _check_fallbacks(self) -> None:
        for m in self.models.values():
            for fb in list(m.fallbacks):  # a copy: mismatches are removed as we go
                if fb.ready and m.ready and fb.fingerprint != m.fingerprint:
                    m.fallbacks.remove(fb)
                    log.error("model %r: fallback %r has a different vector space (%s != %s); disabled",
                              m.name, fb.name, fb.fingerprint, m.fingerprint)

    def queued(self) -> int:
        """Texts queued or being embedded, over every model."""
        return sum(m.batcher.busy for m in self.models.values() if m.batcher is not None)

    def close(self, timeout: float = 30.0) -> None:
        """Stop loading, drain every model's queue, close the cache."""
        self.draining = True
        self._stop.set()
        deadline = time.monotonic() + timeout
        for m in self.models.values():
            m.close(max(0.0, deadline - time.monotonic()))
        if self.cache is not None:
            self.cache.close()


def _describe(err: Exception) -> str:
    msg = err.message if isinstance(err, VecshimError) else str(err)
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def build_models(config: Config, registry, cache, stats=None) -> dict[str, Model]:
    """Validate every model's backend options and build the Model objects (no loading)."""
    from .budget import Fleet
    from .metrics import multiprocess_dir

    # gunicorn workers of one replica share `vecshim serve`'s metrics folder: their budget lives there.
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
        except ConfigError as err:
            if mcfg.required:
                raise
            reason, backend = reason or err.message, UnavailableBackend(mcfg.backend)
        models[name] = Model(name, mcfg, backend, cache=cache, stats=stats, fleet=fleet)
        if reason:  # optional and cannot start: served as 503, never loaded
            models[name].state, models[name].error = "unavailable", reason
            log.warning("model %r (required: false) is unavailable: %s", name, reason)
    for name, m in models.items():
        # an unavailable optional model can't be anyone's fallback (nor be compared with one)
        m.fallbacks = [models[f] for f in config.models[name].fallbacks if models[f].state != "unavailable"]
        for fb in m.fallbacks:
            mine, theirs = m.fingerprint_parts(), fb.fingerprint_parts()
            if mine != theirs:
                raise ConfigError(f"models.{name}.fallbacks: {fb.name!r} embeds into a different vector "
                                  f"space ({theirs} vs {mine})")
    return models


class _PathFix:
    """WSGI middleware: `//vectors` and `/vectors/` reach `/vectors` without a redirect.

    Weaviate builds URLs by string concatenation, so a base URL with a
    trailing slash yields `//vectors`, and its client does not follow redirects.
    """

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if "//" in path or (len(path) > 1 and path.endswith("/")):
            path = _SLASHES.sub("/", path)
            environ["PATH_INFO"] = path.rstrip("/") or "/"
        return self.wsgi_app(environ, start_response)


def _register_errors(app: Flask) -> None:
    def vecshim_error(err: VecshimError):
        return json_response({"error": err.message}, err.status, err.headers)

    def http_error(err: HTTPException):
        if openai.wants_openai_errors(request.path):  # unrouted 404/405 under /v1
            return openai.openai_http_error(err)
        headers = {k: v for k, v in err.get_headers() if k.lower() == "allow"}
        return json_response({"error": f"{err.code} {err.name}: {err.description}"}, err.code or 500, headers)

    def unexpected(err: Exception):
        if type(err).__module__.startswith("gunicorn.http"):
            # A body gunicorn could not read (bad chunk, early end): the client's fault. Only
            # reachable where vecshim's worker does not pre-read requests (TLS, HTTP/2).
            return json_response({"error": f"malformed request body ({type(err).__name__})"}, 400)
        log.exception("unhandled error")
        return json_response({"error": f"internal error ({type(err).__name__}); see the server log"}, 500)

    app.register_error_handler(VecshimError, vecshim_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)


def _register_request_hooks(app: Flask, state: State) -> None:
    access = logging.getLogger("vecshim.access")

    @app.before_request
    def start_request():
        with state._in_flight_lock:
            state.in_flight += 1
        g.vecshim_counted = True
        if state.stats is not None:
            state.stats.in_flight.inc()
        g.vecshim_start = time.perf_counter()
        g.request_id = new_request_id(request.headers.get("X-Request-ID"))
        request_id_var.set(g.request_id)

    @app.after_request
    def finish_request(response):
        elapsed = time.perf_counter() - g.get("vecshim_start", time.perf_counter())
        response.headers["X-Request-ID"] = g.get("request_id", "")
        route = request.url_rule.rule if request.url_rule else "<unmatched>"
        model = g.get("vecshim_model", "-")
        if state.stats is not None:
            state.stats.requests.labels(route, model, str(response.status_code)).inc()
            state.stats.latency.labels(route, model).observe(elapsed)
        # Probes arrive every few seconds from every kubelet and load balancer: DEBUG detail.
        level = logging.DEBUG if route.endswith(_PROBES) else logging.INFO
        access.log(level, "%s %s %d %.1f ms", request.method, request.path, response.status_code, elapsed * 1000,
                   extra={"method": request.method, "path": request.path, "status": response.status_code,
                          "ms": round(elapsed * 1000, 2), "model": model, "remote": request.remote_addr,
                          "bytes": response.calculate_content_length()})
        return response

    @app.teardown_request
    def end_request(exc):
        if g.pop("vecshim_counted", False):
            with state._in_flight_lock:
                state.in_flight -= 1
            if state.stats is not None:
                state.stats.in_flight.dec()


def create_app(config: Config | dict | str | os.PathLike | None = None, *, plugins: Iterable[object] = (),
               load_entrypoints: bool | None = None, load: bool = True, stats=None) -> Flask:
    """Build the Flask app; models load in a background thread (ready turns 204 after)."""
    base_dir = Path.cwd()
    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = parse_config(config)
    else:
        cfg = load_config(config)
        path = config or os.environ.get("VECSHIM_CONFIG")
        if path:
            base_dir = Path(path).resolve().parent
    entrypoints = cfg.plugins.entrypoints if load_entrypoints is None else load_entrypoints
    pm = get_plugin_manager(dirs=cfg.plugins.dirs, disable=cfg.plugins.disable, plugins=plugins,
                            load_entrypoints=entrypoints, base_dir=base_dir)
    registry = collect_backends(pm)
    configure_logging(cfg.logging, cfg.secrets())
    if cfg.server.auth.embed_tokens:
        log.warning("server.auth.embed_tokens is set: Weaviate's text2vec-transformers client sends no "
                    "Authorization header, so /vectors needs a proxy that adds one (see docs/operations.md)")
    stats = stats if stats is not None else Stats()
    cache = build_cache(cfg.cache, on_redis_error=stats.redis_error)
    models = build_models(cfg, registry, cache, stats)

    app = Flask("vecshim")
    app.config["MAX_CONTENT_LENGTH"] = int(cfg.server.max_request_mb * 1024 * 1024)
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    app.wsgi_app = _PathFix(app.wsgi_app)
    state = State(cfg, pm, registry, models, cache, stats)
    app.extensions["vecshim"] = state
    _register_errors(app)
    _register_request_hooks(app, state)
    app.register_blueprint(weaviate.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(compat.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(metrics_api.bp)
    if load:
        state.start_loading()
    return app
