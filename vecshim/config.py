"""Configuration: one YAML file, `${VAR}` expansion, strict pydantic validation."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .resilience import CircuitPolicy, RetryPolicy

__all__ = [
    "Config", "ModelConfig", "BatchConfig", "CacheConfig", "ServerConfig",
    "load_config", "parse_config", "expand_env", "format_validation_error",
    "DEFAULT_MODEL_NAME", "ENV_CONFIG",
]

ENV_CONFIG = "VECSHIM_CONFIG"
DEFAULT_MODEL_NAME = "minilm"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}|\$\$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _PathError(ValueError):
    """A cross-field config error that belongs to one key (`path`), not to the root."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class BatchConfig(_Strict):
    """Micro-batching of concurrent requests for one model."""

    max_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    #: Encoder threads pulling batches from the queue (None: the backend's choice).
    workers: int | None = Field(None, ge=1, le=64)
    #: Queued texts beyond which requests get a fast 503 with Retry-After.
    max_queue: int = Field(4096, ge=1)


class PrefixConfig(_Strict):
    """Text put before each input, per task (e5 style: `query: ` / `passage: `)."""

    query: str = ""
    passage: str = ""


class ModelConfig(_Strict):
    """One named model: a backend plus the policies around it."""

    backend: str
    options: dict[str, Any] = Field(default_factory=dict)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    long_text: Literal["chunk_mean", "truncate", "error"] = "chunk_mean"
    prefixes: PrefixConfig = Field(default_factory=PrefixConfig)
    #: L2-normalise outputs: true, false, or null to keep what the backend returns.
    normalize: bool | None = None
    #: Allow `dimensions` below the native size by truncation (Matryoshka
    #: models). null: use the backend's own claim.
    matryoshka: bool | None = None
    #: `dimensions` below the native size: `truncate` (and renormalise, as the
    #: reference container does) for any model, or `strict`: 400 unless Matryoshka.
    dimensions: Literal["truncate", "strict"] = "truncate"
    #: Seconds a request may wait for its vector before a 504.
    timeout_s: float = Field(45.0, gt=0, le=600)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit: CircuitPolicy = Field(default_factory=CircuitPolicy)
    #: Most concurrent backend calls (None: one per batch worker).
    max_concurrency: int | None = Field(None, ge=1)
    #: Models tried in order when this one fails; each must share the fingerprint.
    fallbacks: list[str] = Field(default_factory=list)
    #: Extra names this model answers to on the OpenAI/Ollama routes.
    aliases: list[str] = Field(default_factory=list)


class CacheConfig(_Strict):
    """Vector cache: in-process LRU plus optional shared Redis."""

    enabled: bool = True
    memory_items: int = Field(100_000, ge=0)
    #: Upper bound on the bytes of vectors held in memory per worker.
    memory_mb: float = Field(128, ge=0)
    redis_url: str | None = None
    ttl_s: int | None = Field(None, ge=1)
    redis_timeout_s: float = Field(0.05, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None


class PluginsConfig(_Strict):
    """Where plugins come from."""

    dirs: list[str] = Field(default_factory=list)
    disable: list[str] = Field(default_factory=list)
    entrypoints: bool = True


class AuthConfig(_Strict):
    """Bearer tokens per route group; an empty list leaves the group open."""

    embed_tokens: list[str] = Field(default_factory=list)
    metrics_tokens: list[str] = Field(default_factory=list)


class ServerConfig(_Strict):
    """Request limits and auth."""

    max_request_mb: float = Field(16, gt=0)
    max_texts_per_request: int = Field(2048, ge=1)
    max_text_chars: int = Field(1_000_000, ge=1)
    auth: AuthConfig = Field(default_factory=AuthConfig)


class LoggingConfig(_Strict):
    """Log format and level; texts are logged only at debug with `log_texts`."""

    format: Literal["json", "text"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_texts: bool = False


class Config(_Strict):
    """The whole vecshim configuration."""

    default_model: str | None = None
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check_models(self):
        if not self.models:
            self.models = {DEFAULT_MODEL_NAME: ModelConfig(backend="sentence-transformers")}
        for name in self.models:
            if not re.match(_NAME, name):
                raise _PathError(f"models.{name}", f"model name {name!r} must match {_NAME}")
        if self.default_model is None:
            self.default_model = next(iter(self.models))
        if self.default_model not in self.models:
            raise _PathError("default_model",
                             f"{self.default_model!r} is not in models ({', '.join(self.models)})")
        for name, model in self.models.items():
            for fb in model.fallbacks:
                if fb not in self.models or fb == name:
                    raise _PathError(f"models.{name}.fallbacks", f"{fb!r} is not another configured model")
        return self

    def secrets(self) -> list[str]:
        """Every secret-looking value in the config (for log redaction)."""
        found = list(self.server.auth.embed_tokens) + list(self.server.auth.metrics_tokens)
        for model in self.models.values():
            for key, value in model.options.items():
                if isinstance(value, str) and value and re.search(r"key|token|secret|password", key, re.I):
                    found.append(value)
        if self.cache.redis_url:
            password = urlsplit(self.cache.redis_url).password
            if password:
                found.append(password)
        return [s for s in found if len(s) >= 4]


def expand_env(value: Any, env: dict[str, str] | None = None, *, path: str = "") -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string; `$$` is a literal `$`."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: expand_env(v, env, path=f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, path=f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set")

    return _VAR.sub(sub, value)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """Render pydantic errors as `path.to.key: message` lines (paths under `prefix`)."""
    lines = []
    for e in err.errors():
        parts = [prefix, *(str(p) for p in e["loc"])]
        msg = e["msg"]
        cause = (e.get("ctx") or {}).get("error")
        if e["type"] == "value_error" and isinstance(cause, ValueError):
            msg = str(cause)  # drop pydantic's "Value error, " prefix
            if isinstance(cause, _PathError):
                parts.append(cause.path)
        loc = ".".join(p for p in parts if p) or "<root>"
        lines.append(f"{loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, env: dict[str, str] | None = None) -> Config:
    """Validate a mapping (already loaded from YAML) into a Config."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("<root>: the config must be a mapping")
    data = expand_env(data, env)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Load the YAML file at `path` (or $VECSHIM_CONFIG); no file gives the default model."""
    env_map = os.environ if env is None else env
    path = path or env_map.get(ENV_CONFIG) or None
    if path is None:
        return parse_config({}, env)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: invalid YAML: {err}") from None
    return parse_config(data, env)
