"""The engine process: every model of a replica, loaded once, serving the HTTP workers.

`python -m vecshim.engine --socket PATH [--config FILE]`, started and
supervised by the gunicorn master (supervisor.py). It owns the `Model`
objects (batchers, runtimes, upstream budgets) exactly as an in-process app
would, minus the vector cache, which the workers consult before asking, and
the rerankers that hold weights or clients (`Ranker.in_engine`). Each worker
connection gets a thread that calls `Model.embed` or `Ranker.rank`, so texts
and pairs from all workers meet in one batcher queue per model or reranker.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

from ..batching import caller_source
from ..config import load_config
from ..errors import BackendUnavailable, UnknownModelError, VecshimError
from ..loader import ModelSet, build_models
from ..logs import configure_logging
from ..metrics import Stats
from ..plugins import collect_backends, get_plugin_manager
from ..ranking import build_rankers
from . import channel

__all__ = ["Engine", "main"]

log = logging.getLogger("vecshim.engine")
#: How long sending facts to a watching worker may block before that worker is dropped.
WATCH_SEND_TIMEOUT_S = 5.0


def _peer_pid(conn: socket.socket) -> int:
    """The connecting worker's pid (Linux SO_PEERCRED), 0 if unknown."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[0]
    except (AttributeError, OSError):
        return 0


class Engine:
    """Models plus a Unix socket server; `facts()` is what workers render /meta and readiness from."""

    def __init__(self, config_path: str | None, socket_path: str):
        cfg = load_config(config_path)
        base_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
        pm = get_plugin_manager(dirs=cfg.plugins.dirs, disable=cfg.plugins.disable,
                                load_entrypoints=cfg.plugins.entrypoints, base_dir=base_dir)
        configure_logging(cfg.logging, cfg.secrets())
        self.config = cfg
        self.stats = Stats()
        registry = collect_backends(pm)
        models = build_models(cfg, registry, cache=None, stats=self.stats)
        rankers = {name: r for name, r in build_rankers(cfg, registry, models, self.stats).items() if r.in_engine}
        self.models = ModelSet(models, on_change=self.publish, rerankers=rankers)
        self.socket_path = socket_path
        self.boot = uuid.uuid4().hex[:12]
        self._watchers: list[socket.socket] = []
        self._lock = threading.Lock()
        # Held while facts are built and sent (a new watcher's first facts, every publish), so each
        # watcher gets them in the order they were built. Without it a watcher that connected while
        # a model loaded could be sent "ready" by the loader's publish and only then its own
        # earlier "loading" facts, and its worker kept waiting for a model that was ready (503s
        # after an engine restart under load). Reentrant: building facts must not deadlock a
        # publish it might cause.
        self._facts_lock = threading.RLock()
        self._stop = threading.Event()
        # Set by the SIGTERM handler. A plain flag: Event.set() in a handler can deadlock on
        # the Event's lock when the signal lands while this thread holds it (seen in a test run).
        self._stopping = False
        self._parent = os.getppid()
        for m in models.values():  # vecshim_batch_workers: how many workers' texts shared a backend call
            m.on_sources = self.stats.batch_workers.labels(m.name).observe

    # -- facts ------------------------------------------------------------
    def facts(self) -> dict:
        """Engine identity and every model's and reranker's /meta entry (state, fingerprint...)."""
        models = self.models.models
        return {"pid": os.getpid(), "boot": self.boot,
                "models": {name: m.info() for name, m in models.items()},
                "rerankers": {name: r.info() for name, r in self.models.rerankers.items()},
                "poolings": {name: list(m.poolings) for name, m in models.items()}}

    def publish(self) -> None:
        """Push the current facts to every watching worker."""
        with self._facts_lock:
            body = channel.pack_json(b"F", self.facts())
            with self._lock:
                watchers = list(self._watchers)
            for w in watchers:
                try:
                    channel.send(w, body)
                except OSError:
                    self._drop_watcher(w)

    def _drop_watcher(self, w: socket.socket) -> None:
        with self._lock:
            if w in self._watchers:
                self._watchers.remove(w)
        try:
            w.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv, and the worker sees the end
        except OSError:
            pass
        w.close()

    # -- serving ------------------------------------------------------------
    def serve(self) -> None:
        """Bind, load models in the background, answer until SIGTERM, then drain."""
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        listener.listen(1024)
        self.models.start_loading()
        threading.Thread(target=self._accept, args=(listener,), name="vecshim-engine-accept", daemon=True).start()
        log.info("engine %d serving %d model(s) on %s", os.getpid(), len(self.models.models), self.socket_path)
        while not self._stopping:
            time.sleep(0.2)
            if os.getppid() != self._parent:  # the master is gone (SIGKILL): do not outlive it
                log.error("engine %d: the gunicorn master is gone; exiting", os.getpid())
                break
        self._stop.set()
        listener.close()
        served = [*self.models.models.values(), *self.models.rerankers.values()]
        timeout = max(m.cfg.timeout_s for m in served) if served else 30
        self.models.close(timeout)  # queued texts finish; their callers get replies
        time.sleep(0.05)
        log.info("engine %d stopped", os.getpid())

    def stop(self, *_args) -> None:
        """SIGTERM: stop taking connections and drain (the main loop sees the flag)."""
        self._stopping = True

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="vecshim-engine-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        # This thread serves one worker: every text it submits carries that worker's pid.
        caller_source.set(_peer_pid(conn))
        try:
            while True:
                body = channel.recv(conn)
                if body[:1] == b"W":
                    self._watch(conn)
                    return
                channel.send(conn, self._answer(body))
        except (OSError, channel.ChannelClosed):
            pass
        finally:
            conn.close()

    def _watch(self, conn: socket.socket) -> None:
        # Facts go to every watcher under one lock (so each gets them in order): a worker that
        # stops reading (stopped, hung) must not hold up the others once its buffer is full.
        # Its sends fail after WATCH_SEND_TIMEOUT_S and it is dropped; its own link reconnects.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(WATCH_SEND_TIMEOUT_S),
                                                                           int(WATCH_SEND_TIMEOUT_S % 1 * 1e6)))
        try:
            with self._facts_lock:  # no publish between building these facts and sending them
                with self._lock:
                    self._watchers.append(conn)
                channel.send(conn, channel.pack_json(b"F", self.facts()))
            channel.recv(conn)  # a watcher never sends again; this returns when it goes away
        finally:
            self._drop_watcher(conn)

    def _answer(self, body: bytes) -> bytes:
        try:
            kind, name, task, pooling, texts = channel.unpack_texts(body)
            if kind == b"R":
                ranker = self.models.rerankers.get(name)
                if ranker is None:  # a worker of another configuration (mid-reload): it retries
                    raise BackendUnavailable(f"reranker {name!r} is not served by this engine",
                                             headers={"Retry-After": "1"})
                return channel.pack_scores(ranker.rank(texts[0], texts[1:]))
            model = self.models.models.get(name)
            if model is None:
                raise UnknownModelError(name, self.models.models)
            if kind == b"C":
                return channel.pack_counts(model.backend.count_tokens(texts))
            return channel.pack_vectors(model.embed(texts, task, pooling=pooling))
        except Exception as err:
            if not isinstance(err, VecshimError):
                log.error("engine request failed: %s", type(err).__name__, exc_info=True)
            return channel.pack_error(err)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the master dies (best effort)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the engine process."""
    p = argparse.ArgumentParser(prog="python -m vecshim.engine")
    p.add_argument("--socket", required=True)
    p.add_argument("--config", default=None)
    args = p.parse_args(argv)
    _die_with_parent()
    engine = Engine(args.config, args.socket)
    signal.signal(signal.SIGTERM, engine.stop)
    signal.signal(signal.SIGINT, engine.stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master swaps engines on reload
    engine.serve()
    return 0
