"""Logging: JSON or text lines, a request id on each, secrets redacted everywhere."""
from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import sys
import time
import uuid

__all__ = ["configure_logging", "request_id_var", "new_request_id", "VecshimFormatter", "VecshimHandler",
           "gunicorn_logconfig", "QUIET_LOGGERS"]

#: The current request's id, set by the app for each request.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("vecshim_request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HANDLER_FLAG = "_vecshim_handler"
#: Loggers of HTTP client libraries: one INFO line per upstream request is DEBUG detail for us.
QUIET_LOGGERS = ("httpx", "httpcore", "openai", "cohere", "urllib3")


_ids = {"prefix": uuid.uuid4().hex[:16], "counter": itertools.count()}


def _reseed_ids() -> None:
    # gunicorn forks workers from one master: give each its own prefix.
    _ids["prefix"], _ids["counter"] = uuid.uuid4().hex[:16], itertools.count()


os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id(given: str | None) -> str:
    """Honour a sane incoming X-Request-ID, else make one (random per process + counter)."""
    if given and _VALID_ID.match(given):
        return given
    # Cheaper than uuid4() per request, still unique across workers and restarts.
    return f"{_ids['prefix']}{next(_ids['counter']) & 0xFFFFFFFFFFFFFFFF:016x}"


class VecshimFormatter(logging.Formatter):
    """Formats records as JSON or text and replaces every secret with `***`."""

    def __init__(self, fmt: str = "text", secrets: list[str] | None = None):
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        self.json = fmt == "json"
        self.secrets = sorted({s for s in (secrets or []) if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """Replace each configured secret value in `text`."""
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
        return text

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if not self.json:
            line = super().format(record)
            if rid:
                line = f"{line} [request_id={rid}]"
            return self.redact(line)
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if rid:
            out["request_id"] = rid
        for key in ("method", "path", "status", "ms", "model", "texts", "bytes", "remote", "in_flight", "queued",
                    "left", "drain_s"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(out, default=str))


class VecshimHandler(logging.StreamHandler):
    """The one stderr handler on the root logger, in master and workers alike."""

    def __init__(self, filename: str | None = None):
        # A file (gunicorn's `errorlog`) is opened for appending and kept open, like gunicorn does.
        super().__init__(open(filename, "a", encoding="utf-8") if filename else sys.stderr)
        setattr(self, _HANDLER_FLAG, True)


def _demote(record: logging.LogRecord) -> bool:
    # An HTTP client's per-request INFO line becomes DEBUG, shown only at level DEBUG.
    if record.levelno == logging.INFO:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return record.levelno >= logging.getLogger("vecshim").getEffectiveLevel()


def _quiet_http_clients() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if _demote not in logger.filters:
            logger.addFilter(_demote)


def make_formatter(fmt: str = "text", secrets: list[str] | None = None) -> logging.Formatter:
    """The formatter (with redaction) for `logging.format`; a dictConfig factory too."""
    return VecshimFormatter(fmt, secrets)


def gunicorn_logconfig(cfg, secrets: list[str], errorlog: str = "-") -> dict:
    """gunicorn's `logconfig_dict`: the master's lines in the workers' format, on one handler.

    The access logger is left alone: vecshim writes its own access lines
    (`vecshim.access`); a gunicorn `accesslog` file keeps gunicorn's format.
    """
    handler: dict = {"class": "vecshim.logs.VecshimHandler", "formatter": "vecshim"}
    if errorlog not in ("-", None, ""):
        handler["filename"] = errorlog
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": cfg.level, "handlers": ["vecshim"]},
        "loggers": {"gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True}},
        "handlers": {"vecshim": handler},
        "formatters": {"vecshim": {"()": "vecshim.logs.make_formatter", "fmt": cfg.format, "secrets": secrets}},
    }


def configure_logging(cfg, secrets: list[str]) -> VecshimFormatter:
    """Install our formatter on the root logger's one handler and on gunicorn's loggers."""
    formatter = make_formatter(cfg.format, secrets)
    root = logging.getLogger()
    mine = [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]
    for h in mine[1:]:
        root.removeHandler(h)
    if mine:  # set up by gunicorn's logconfig_dict in the master: keep its stream, refresh the format
        handler = mine[0]
    else:
        handler = VecshimHandler()
        root.addHandler(handler)
    handler.setFormatter(formatter)
    level = getattr(logging, cfg.level)
    logging.getLogger("vecshim").setLevel(level)
    if root.level > level or root.level == logging.WARNING:
        root.setLevel(level)
    for name in ("gunicorn.error", "gunicorn.access"):
        for h in logging.getLogger(name).handlers:
            h.setFormatter(formatter)
    _quiet_http_clients()
    return formatter
