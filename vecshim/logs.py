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

__all__ = ["configure_logging", "request_id_var", "new_request_id", "VecshimFormatter"]

#: The current request's id, set by the app for each request.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("vecshim_request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HANDLER_FLAG = "_vecshim_handler"


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
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
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
            "msg": record.getMessage(),
        }
        if rid:
            out["request_id"] = rid
        for key in ("method", "path", "status", "ms", "model", "texts", "bytes", "remote"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(out, default=str))


def configure_logging(cfg, secrets: list[str]) -> VecshimFormatter:
    """Install our formatter on the root logger and on gunicorn's loggers."""
    formatter = VecshimFormatter(cfg.format, secrets)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_FLAG, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_FLAG, True)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    level = getattr(logging, cfg.level)
    logging.getLogger("vecshim").setLevel(level)
    if root.level > level or root.level == logging.WARNING:
        root.setLevel(level)
    for name in ("gunicorn.error", "gunicorn.access"):
        for h in logging.getLogger(name).handlers:
            h.setFormatter(formatter)
    return formatter
