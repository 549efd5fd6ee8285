"""create_app(): config -> plugin manager -> models -> blueprints. The only wiring place."""
from __future__ import annotations

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

from .cache import build_cache
from .config import Config, load_config, parse_config
from .errors import UnknownModelError, VecshimError
from .loader import ModelSet, build_models
from .meta import MetaPages
from .model import Model
from .plugins import collect_backends, get_plugin_manager, plugin_infos
from .ranking import build_rankers
from .api import compat, openai, ops, rerank, weaviate
from .api import metrics as metrics_api
from .api.common import error_reply, json_response
from .logs import configure_logging, new_request_id, request_id_var
from .metrics import Stats

__all__ = ["create_app", "State", "build_models"]

log = logging.getLogger("vecshim.app")
_access = logging.getLogger("vecshim.access")
_SLASHES = re.compile(r"/{2,}")
_PROBES = ("/.well-known/live", "/.well-known/ready")


class State:
    """What a request needs, stored in `app.extensions["vecshim"]`: config, models, /meta pages.

    Loading lives in `ModelSet` (vecshim/loader.py), /meta rendering in
    `MetaPages` (vecshim/meta.py); with an engine (vecshim/engine/) the models
    are worker-side proxies whose facts come from the engine.
    """

    def __init__(self, config: Config, pm, registry, models: dict[str, Model], cache, stats=None,
                 rerankers: dict | None = None, engine_info=None):
        self.config = config
        self.pm = pm
        self.registry = registry
        self.models = models
        #: Served rerankers by name (`vecshim.ranking.Ranker`); they load after the models.
        self.rerankers = rerankers or {}
        self.cache = cache
        self.stats = stats
        self.draining = False
        self.link = None  # the EngineLink when the models run in the engine
        #: HTTP requests being handled right now (for the drain summary on SIGTERM).
        self.in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.plugins = plugin_infos(pm)
        self.meta = MetaPages(models, config.default_model, self.plugins, engine_info,
                              rerankers=self.rerankers, default_reranker=config.default_reranker)
        self.loader = ModelSet(models, on_change=self.render_meta, rerankers=self.rerankers)

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
        if name in self.rerankers:
            served = [self.rerankers[name]]
        elif name is not None:
            served = [self.get_model(name)]
        else:  # `required: false` models and rerankers never hold the server out of ready
            served = [m for m in [*self.models.values(), *self.rerankers.values()] if m.cfg.required]
        for m in served:
            if not m.ready:
                kind = "reranker" if m in self.rerankers.values() else "model"
                return f"{kind} {m.name!r} is {m.state}" + (f": {m.error}" if m.error else "")
        return None

    def check_name(self, name: str) -> None:
        """404 unless `name` is a configured model or reranker (the per-name health routes)."""
        if name not in self.rerankers:
            self.get_model(name)

    # -- per request (the Flask hooks and the lean /vectors path, vecshim/api/weaviate.py) --
    def request_started(self, given_id: str | None) -> str:
        """Count a request in flight; its request id (the client's X-Request-ID when sane)."""
        with self._in_flight_lock:
            self.in_flight += 1
        if self.stats is not None:
            self.stats.in_flight.inc()
        request_id = new_request_id(given_id)
        request_id_var.set(request_id)
        return request_id

    def request_finished(self, method: str, path: str, route: str, model: str, status: int,
                         elapsed: float, remote: str | None, size: int | None) -> None:
        """Metrics and the access log line of one answered request."""
        if self.stats is not None:
            self.stats.requests.labels(route, model, str(status)).inc()
            self.stats.latency.labels(route, model).observe(elapsed)
        # Probes arrive every few seconds from every kubelet and load balancer: DEBUG detail.
        level = logging.DEBUG if route.endswith(_PROBES) else logging.INFO
        if _access.isEnabledFor(level):
            _access.log(level, "%s %s %d %.1f ms", method, path, status, elapsed * 1000,
                        extra={"method": method, "path": path, "status": status, "ms": round(elapsed * 1000, 2),
                               "model": model, "remote": remote, "bytes": size})

    def request_ended(self) -> None:
        """The request is no longer in flight (answered or failed)."""
        with self._in_flight_lock:
            self.in_flight -= 1
        if self.stats is not None:
            self.stats.in_flight.dec()

    def render_meta(self) -> None:
        """Pre-render /meta for the server and each model (on startup and state changes); update state gauges."""
        if self.stats is not None:
            for name, m in self.models.items():
                self.stats.set_model_state(name, m.state)
                if m.resilience is not None:
                    self.stats.track_circuit(name, lambda m=m: m.resilience.state)
        self.meta.render()

    def meta_bytes(self, name: str | None) -> bytes:
        """The /meta body for the server or one model."""
        if name is not None:
            self.check_name(name)
        return self.meta.get(name)

    def start_loading(self):
        """Load every model in a background thread (see ModelSet)."""
        return self.loader.start_loading()

    def wait_ready(self, timeout: float) -> bool:
        """Block until all models are ready (tests and the CLI)."""
        return self.loader.wait_ready(timeout)

    def queued(self) -> int:
        """Texts queued or being embedded, over every model."""
        return sum(m.batcher.busy for m in self.models.values() if m.batcher is not None)

    def close(self, timeout: float = 30.0) -> None:
        """Stop loading, drain every model's queue, close the cache."""
        self.draining = True
        self.loader.close(timeout)
        if self.link is not None:
            self.link.close()
        if self.cache is not None:
            self.cache.close()


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
        status, body, headers = error_reply(err)
        return json_response(body, status, headers)

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
        status, body, headers = error_reply(err)
        return json_response(body, status, headers)

    app.register_error_handler(VecshimError, vecshim_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)


def _register_request_hooks(app: Flask, state: State) -> None:
    @app.before_request
    def start_request():
        g.vecshim_counted = True
        g.vecshim_start = time.perf_counter()
        g.request_id = state.request_started(request.headers.get("X-Request-ID"))

    @app.after_request
    def finish_request(response):
        elapsed = time.perf_counter() - g.get("vecshim_start", time.perf_counter())
        response.headers["X-Request-ID"] = g.get("request_id", "")
        state.request_finished(request.method, request.path,
                               request.url_rule.rule if request.url_rule else "<unmatched>",
                               g.get("vecshim_model", "-"), response.status_code, elapsed,
                               request.remote_addr, response.calculate_content_length())
        return response

    @app.teardown_request
    def end_request(exc):
        if g.pop("vecshim_counted", False):
            state.request_ended()


def create_app(config: Config | dict | str | os.PathLike | None = None, *, plugins: Iterable[object] = (),
               load_entrypoints: bool | None = None, load: bool = True, stats=None,
               engine_socket: str | None = None) -> Flask:
    """Build the Flask app; models load in a background thread (ready turns 204 after).

    With `engine_socket`, the models run in the replica's engine process
    (vecshim/engine/) and this app holds worker-side proxies of them.
    """
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
    cache = build_cache(cfg.cache, on_redis_error=stats.redis_error, on_reject=stats.cache_reject)
    link = None
    if engine_socket is None:  # a worker of plain gunicorn whose master runs an engine
        from .engine.supervisor import worker_socket
        engine_socket = worker_socket()
    if engine_socket:
        from .engine.proxy import EngineLink, RemoteModel, RemoteRanker
        models = build_models(cfg, registry, cache, stats, model_cls=RemoteModel)
        # The engine serves the rerankers that hold weights or clients; those that only
        # embed through a model (bi-encoder) stay here, beside the models' cache.
        rankers = build_rankers(cfg, registry, models, stats, engine_cls=RemoteRanker)
    else:
        models = build_models(cfg, registry, cache, stats)
        rankers = build_rankers(cfg, registry, models, stats)

    app = Flask("vecshim")
    app.config["MAX_CONTENT_LENGTH"] = int(cfg.server.max_request_mb * 1024 * 1024)
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    app.wsgi_app = _PathFix(app.wsgi_app)
    if engine_socket:
        remote_rankers = {n: r for n, r in rankers.items() if isinstance(r, RemoteRanker)}

        def on_facts(facts):
            for name, m in models.items():
                m.apply(facts["models"].get(name) if facts else None,
                        facts.get("poolings", {}).get(name) if facts else None)
            for name, r in remote_rankers.items():
                r.apply(facts.get("rerankers", {}).get(name) if facts else None)
            state.render_meta()
        link = EngineLink(engine_socket, on_facts)
        for m in [*models.values(), *remote_rankers.values()]:
            m.link = link
        state = State(cfg, pm, registry, models, cache, stats, rerankers=rankers, engine_info=link.info)
    else:
        state = State(cfg, pm, registry, models, cache, stats, rerankers=rankers,
                      engine_info=lambda: {"mode": "in-process", "pid": os.getpid()})
    app.extensions["vecshim"] = state
    _register_errors(app)
    _register_request_hooks(app, state)
    app.register_blueprint(weaviate.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(compat.bp)
    app.register_blueprint(rerank.bp)
    app.register_blueprint(rerank.cohere_bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(metrics_api.bp)
    if link is not None:
        state.link = link.start()
    if load:  # with an engine: the rerankers (the proxies' load() is a no-op)
        state.start_loading()
    return app
