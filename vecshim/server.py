"""gunicorn with vecshim's defaults: HTTP workers plus, usually, one engine process with the models.

With an engine (vecshim/engine/), the master starts it before the first
worker, restarts it if it dies, swaps it on HUP and stops it after the
workers drained; workers reach it over a Unix socket. Without one
(`--engine off`, or `auto` with one worker), each worker loads the models.
"""
from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication

from .cpus import available_cpus
from .errors import ConfigError

__all__ = ["DEFAULTS", "DEFAULT_WORKERS", "VecshimServer", "check_models", "default_workers", "use_engine",
           "read_gunicorn_config", "logconfig_for", "plain_gunicorn_env"]

log = logging.getLogger("vecshim.server")

#: HTTP workers of `vecshim serve`: one per usable CPU, at least 2 (bench/RESULTS.md
#: "Issue 18": on 2 CPUs, 2 workers served more cache hits and misses than 4, which
#: spend the CPUs switching between processes).
DEFAULT_WORKERS = max(2, available_cpus())

#: Settings `vecshim serve` passes to gunicorn (see docs/operations.md).
DEFAULTS = {
    "bind": "0.0.0.0:8080",
    # gthread, but each request is read whole in the event loop before a
    # thread sees it (vecshim/worker.py): slow clients cannot hold threads.
    "worker_class": "vecshim.worker.VecshimWorker",
    # Requests mostly wait on the batcher, so many threads cost little and
    # let tens of Weaviate requests queue into one batch.
    "threads": 64,
    # Above Go's 90 s idle reuse, so Weaviate never reuses a closed connection.
    "keepalive": 120,
    "timeout": 120,
    "graceful_timeout": 30,
    # The app writes its own access log lines, in the app's log format.
    "accesslog": None,
    "logger_class": "vecshim.logs.GunicornLogger",  # builds no gunicorn access line without `accesslog`
    "errorlog": "-",
    "preload_app": False,  # load models after fork, never in the master
    "max_requests": 0,
    "max_requests_jitter": 0,
    # gunicorn >= 25.1 opens a control socket in $HOME; several instances on
    # one host (or a read-only home in a container) would clash.
    "control_socket_disable": True,
}


def check_models(config, base_dir: Path | None = None):
    """Validate every model's backend and options without loading anything; return the backend registry.

    `base_dir` is the config file's folder, against which relative plugin dirs resolve.
    """
    from .loader import build_models
    from .plugins import collect_backends, get_plugin_manager

    pm = get_plugin_manager(dirs=config.plugins.dirs, disable=config.plugins.disable,
                            load_entrypoints=config.plugins.entrypoints, base_dir=base_dir)
    registry = collect_backends(pm)
    from .ranking import build_rankers

    models = build_models(config, registry, cache=None)  # validates options before forking
    build_rankers(config, registry, models)
    return registry


def default_workers(config, registry) -> int:
    """HTTP workers when not set: see docs/operations.md "Process model" for the measurements.

    With an engine the models and rerankers load once whatever the count, so
    workers only parse, check the cache and render.
    """
    return DEFAULT_WORKERS


def use_engine(mode: str, workers: int) -> bool:
    """`--engine auto` runs an engine process whenever there is more than one HTTP worker."""
    return mode == "on" or (mode == "auto" and workers > 1)


def logconfig_for(config_path: str | None, errorlog: str = "-") -> dict:
    """gunicorn `logconfig_dict` for a vecshim config file (for running gunicorn directly)."""
    from .config import LoggingConfig, load_config
    from .logs import gunicorn_logconfig

    try:
        cfg = load_config(config_path)
    except ConfigError:  # the workers report it; the master logs in the default format
        return gunicorn_logconfig(LoggingConfig(), [], errorlog)
    return gunicorn_logconfig(cfg.logging, cfg.secrets(), errorlog)


def read_gunicorn_config(path: str) -> dict:
    """The gunicorn settings a python config file sets (as `gunicorn -c FILE` reads them)."""
    from gunicorn.config import KNOWN_SETTINGS

    known = {s.name for s in KNOWN_SETTINGS}
    try:
        values = runpy.run_path(path)
    except Exception as err:
        raise ConfigError(f"gunicorn config {path}: {type(err).__name__}: {err}") from None
    return {k.lower(): v for k, v in values.items() if k.lower() in known}


def _state(worker):
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("vecshim")


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's reply to a request it cannot parse, as JSON instead of an HTML page."""
    body = json.dumps({"error": f"{status_int} {reason}: {mesg}" if mesg else f"{status_int} {reason}"}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin1")
    gunicorn_util.write_nonblock(sock, head + body)


def post_fork(server, worker):
    """In each worker: requests gunicorn rejects before the app (bad request line,
    oversized headers) get a JSON error too, like everything the app answers."""
    gunicorn_util.write_error = _write_json_error


def post_worker_init(worker):
    """On SIGTERM turn readiness 503 at once, then let gunicorn drain gracefully."""
    state = _state(worker)
    previous = worker.handle_exit

    def on_term(sig, frame):
        if state is not None:
            state.draining = True
            # Counted here, logged at worker_exit: no logging inside a signal handler.
            state.drain_start = (time.monotonic(), state.in_flight, state.queued())
        previous(sig, frame)

    signal.signal(signal.SIGTERM, on_term)


def worker_exit(server, worker):
    """After in-flight requests finished: drain model queues, close caches."""
    state = _state(worker)
    if state is None:
        return
    started, requests, texts = getattr(state, "drain_start", None) or (time.monotonic(), state.in_flight,
                                                                        state.queued())
    state.close(timeout=server.cfg.graceful_timeout)
    left = state.queued()
    log.info("drain summary: %d request(s) in flight and %d text(s) queued at shutdown; %s after %.2f s",
             requests, texts, f"{left} text(s) left undone" if left else "all finished",
             time.monotonic() - started,
             extra={"in_flight": requests, "queued": texts, "left": left,
                    "drain_s": round(time.monotonic() - started, 3)})


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the shared metrics directory."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid, path)


def prepare_metrics_dir() -> str | None:
    """Give the workers one shared metrics folder (must exist before any worker imports prometheus_client).

    Returns the folder this process created (to remove on exit; also when
    called again, as gunicorn re-reads its config file on HUP), or None if
    the operator set PROMETHEUS_MULTIPROC_DIR themselves.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        os.makedirs(path, exist_ok=True)
        return path if _metrics_owner.get(path) == os.getpid() else None
    path = tempfile.mkdtemp(prefix="vecshim-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    _metrics_owner[path] = os.getpid()
    return path


_metrics_owner: dict[str, int] = {}


def remove_metrics_dir(path: str | None) -> None:
    """Remove a metrics folder made by prepare_metrics_dir, in the process that made it only.

    A gunicorn worker leaves through SystemExit, which unwinds the master's
    stack it was forked from: without the check, a worker retiring on HUP
    would delete the folder the other processes still write to.
    """
    if path and _metrics_owner.get(path) == os.getpid():
        shutil.rmtree(path, ignore_errors=True)


def _engine(server):
    return getattr(server.app, "engine", None)


def _exit_on_config_error(err: ConfigError):
    """Leave gunicorn's master with one line and status 2, as `vecshim serve` does, not a traceback."""
    print(f"config error: {err.message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _env_int(name: str, default: int, least: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip()
    if not value.isdigit() or int(value) < least:
        raise ConfigError(f"{name}={raw!r}: expected a whole number >= {least}")
    return int(value)


def _env_engine() -> str:
    mode = os.environ.get("VECSHIM_ENGINE", "auto")
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"VECSHIM_ENGINE={mode!r}: expected auto, on or off")
    return mode


def plain_gunicorn_env() -> dict:
    """The `VECSHIM_*` settings of deploy/gunicorn.conf.py, checked; a bad value ends the process with one line."""
    try:
        _env_engine()
        return {"bind": os.environ.get("VECSHIM_BIND", DEFAULTS["bind"]),
                "workers": _env_int("VECSHIM_WORKERS", DEFAULT_WORKERS, 1),
                "max_requests": _env_int("VECSHIM_MAX_REQUESTS", 0, 0),
                "max_requests_jitter": _env_int("VECSHIM_MAX_REQUESTS_JITTER", 0, 0)}
    except ConfigError as err:
        _exit_on_config_error(err)


def _plain_gunicorn_engine(server):
    """The engine of `gunicorn -c deploy/gunicorn.conf.py`: `$VECSHIM_ENGINE` (auto|on|off) as `--engine`."""
    try:
        mode = _env_engine()
    except ConfigError as err:  # a gunicorn config of its own that did not call plain_gunicorn_env()
        _exit_on_config_error(err)
    if not use_engine(mode, server.cfg.workers):
        return None
    from .engine.supervisor import EngineSupervisor

    path = os.environ.get("VECSHIM_CONFIG")
    return EngineSupervisor(os.path.abspath(path) if path else None)


def on_starting(server):
    """Start the engine before the first worker forks.

    Under plain gunicorn (the app is `vecshim.app:create_app()`, not
    VecshimServer) the engine is decided here; workers find it through
    `vecshim.engine.supervisor.worker_socket()`.
    """
    if not hasattr(server.app, "engine"):
        server.app.engine = _plain_gunicorn_engine(server)
    engine = _engine(server)
    if engine is not None:
        engine.start(server)
    share_worker_code()


def share_worker_code() -> None:
    """Import the worker's code once, here in the master, and freeze it out of the collector.

    Forked workers then share those pages instead of each importing its
    own copy (~13 MiB a worker; bench/RESULTS.md "Issue 18, fourth pass"), and
    gc.freeze keeps the workers' collections from writing to, and so
    copying, them. No model, thread or socket is made here; a HUP re-reads
    the configuration but not this code (a new release is a restart).
    """
    import gc

    from . import app, worker  # noqa: F401
    from .engine import proxy  # noqa: F401

    gc.collect()
    gc.freeze()


def on_reload(server):
    """HUP: a new engine, ready, before gunicorn forks the new workers; the old one retires with its workers."""
    engine = _engine(server)
    if engine is not None:
        engine.reload(server)


def on_exit(server):
    """After every worker drained: drain and stop the engine."""
    engine = _engine(server)
    if engine is not None:
        engine.stop(timeout=server.cfg.graceful_timeout)


HOOKS = {"post_fork": post_fork, "post_worker_init": post_worker_init, "worker_exit": worker_exit,
         "child_exit": child_exit, "on_starting": on_starting, "on_reload": on_reload, "on_exit": on_exit}


class VecshimServer(BaseApplication):
    """gunicorn application serving `create_app(config_path)` in each worker."""

    def __init__(self, config_path: str | None, settings: dict, engine: bool = False):
        self.config_path = config_path
        self.settings = settings
        self.engine = None
        if engine:
            from .engine.supervisor import EngineSupervisor
            self.engine = EngineSupervisor(config_path)
        super().__init__()

    def load_config(self):
        for key, value in {**HOOKS, **self.settings}.items():
            if key in self.cfg.settings and (value is not None or key == "accesslog"):
                self.cfg.set(key, value)

    def load(self):
        if self.config_path:
            os.environ["VECSHIM_CONFIG"] = self.config_path
        from .app import create_app

        if self.engine is not None:  # a worker: the engine the master runs now
            return create_app(self.config_path, engine_socket=self.engine.socket_path)
        return create_app(self.config_path)
