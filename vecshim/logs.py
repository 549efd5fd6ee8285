"""Logging: JSON or text lines, a request id on each, secrets redacted everywhere."""
from __future__ import annotations

import base64
import contextvars
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from urllib.parse import quote, quote_plus, unquote, urlsplit

from gunicorn.glogging import Logger as _GunicornBaseLogger

__all__ = ["configure_logging", "request_id_var", "new_request_id", "VecshimFormatter", "VecshimHandler",
           "gunicorn_logconfig", "QUIET_LOGGERS", "register_secret", "redact", "url_secrets", "SDK_KEY_ENV"]

#: Environment variables the provider SDKs read keys from: always redacted when set.
SDK_KEY_ENV = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "CO_API_KEY",
               "COHERE_API_KEY", "VOYAGE_API_KEY", "MISTRAL_API_KEY", "JINA_API_KEY", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN")
#: A key shown masked by a provider ("Zq7Xv9Lm****5Fg0Sa"): redacted whatever its key.
_MASKED = re.compile(r"[A-Za-z0-9_+/=.\-]*(?:\*{3,}|\u2022{3,})[A-Za-z0-9_+/=\-]*")
#: Shorter values are not treated as secrets (they would redact ordinary words).
MIN_SECRET = 4


class _Redactor:
    """Every secret the process knows, in each form it may be echoed back in."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._passes: list[re.Pattern] = []

    def add(self, *values: str | None) -> None:
        new = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET} - self._values
        if not new:
            return
        with self._lock:
            self._values |= new
            whole: set[str] = set()
            for v in self._values:
                whole |= _forms(v)
            ends = {e for v in self._values if len(v) >= 16 for e in (v[:8], v[-8:])}
            # Whole forms first: an end matched first could split a whole form and leave its middle.
            self._passes = [re.compile("|".join(map(re.escape, sorted(group, key=len, reverse=True))))
                            for group in (whole, ends - whole) if group]

    def redact(self, text: str) -> str:
        for pattern in self._passes:
            text = pattern.sub("***", text)
        return _MASKED.sub("***", text) if ("***" in text or "\u2022" in text) else text


def _forms(secret: str) -> set[str]:
    """The secret plain, URL-encoded, JSON-escaped and in base64 at any alignment."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1],
             json.dumps(secret)[1:-1].replace("/", "\\/")}
    raw = secret.encode("utf-8", "surrogatepass")
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw).decode()
        full = (shift + len(raw)) // 3 * 4  # characters that encode only whole groups
        core = enc[4 if shift else 0:full]
        forms |= {core, core.replace("+", "-").replace("/", "_")}
    return {f for f in forms if len(f) >= 6 or f == secret}


_REDACTOR = _Redactor()


def register_secret(*values: str | None) -> None:
    """Add secrets (keys resolved at run time, tokens, passwords) to the one redaction list."""
    _REDACTOR.add(*values)


def redact(text: str) -> str:
    """`text` without any registered secret (in any of its encodings) or masked key."""
    return _REDACTOR.redact(text)


def url_secrets(url: str) -> list[str]:
    """The credentials inside a URL (`scheme://user:password@host`), decoded and as written."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
        if parts.username:
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password)}"
            found += [userinfo, base64.b64encode(userinfo.encode()).decode()]
    elif parts.username and "@" in parts.netloc:  # a token as the user name (https://TOKEN@host)
        found += [parts.username, unquote(parts.username)]
    return [f for f in found if len(f) >= MIN_SECRET]

#: The current request's id, set by the app for each request.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("vecshim_request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HANDLER_FLAG = "_vecshim_handler"
#: Loggers of HTTP client libraries: one INFO line per upstream request is DEBUG detail for us
#: (and its URL may carry credentials: shown only at DEBUG, redacted even then).
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "cohere", "urllib3", "hpack", "h2")


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
        register_secret(*(secrets or []), *(os.environ.get(name) for name in SDK_KEY_ENV))

    def redact(self, text: str) -> str:
        """Replace every known secret in `text` (see `redact`)."""
        return redact(text)

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
    register_secret(*(os.environ.get(name) for name in SDK_KEY_ENV))  # the gunicorn master's too
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


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's logger, with gunicorn's access lines only when an `accesslog` is set.

    With `logconfig_dict` set, gunicorn builds every request's access-log
    fields even though its access logger has no handler; vecshim writes its
    own access lines, so that work (about 5 % of a cache hit) is skipped.
    """

    def _compute_access_log_enabled(self):
        return bool(self.cfg.accesslog) and super()._compute_access_log_enabled()

