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

__all__ = ["configure_logging", "request_id_var", "new_request_id", "VecshimFormatter",
           "register_secret", "redact", "url_secrets", "SDK_KEY_ENV", "QUIET_LOGGERS"]

#: Environment variables the provider SDKs read keys from: always redacted when set.
SDK_KEY_ENV = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "CO_API_KEY",
               "COHERE_API_KEY", "VOYAGE_API_KEY", "MISTRAL_API_KEY", "JINA_API_KEY", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN")
#: HTTP client and SDK loggers: their request lines carry URLs (and credentials in them),
#: so they log at WARNING unless logging.level is DEBUG (and are redacted even then).
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "cohere", "urllib3", "hpack", "h2")
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
        register_secret(*(secrets or []))

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
    register_secret(*(os.environ.get(name) for name in SDK_KEY_ENV))
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
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    for name in ("gunicorn.error", "gunicorn.access"):
        for h in logging.getLogger(name).handlers:
            h.setFormatter(formatter)
    return formatter
