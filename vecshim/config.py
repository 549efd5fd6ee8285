"""Configuration: one YAML file, `${VAR}` expansion, strict pydantic validation."""
from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .budget import BudgetConfig, RateLimit
from .errors import ConfigError
from .resilience import CircuitPolicy, RetryPolicy

__all__ = [
    "Config", "ModelConfig", "RerankerConfig", "BatchConfig", "CacheConfig", "ServerConfig",
    "load_config", "parse_config", "expand_env", "format_validation_error",
    "DEFAULT_MODEL_NAME", "ENV_CONFIG", "cross_field_problems", "did_you_mean", "CHECK_CONTEXT",
]

ENV_CONFIG = "VECSHIM_CONFIG"
DEFAULT_MODEL_NAME = "minilm"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}|\$\$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_SECRET_KEY = re.compile(r"key|token|secret|password|passwd|credential|auth", re.I)
#: Validation context under which Config skips its cross-field rules
#: (vecshim.check reports those itself, next to the schema errors).
CHECK_CONTEXT = {"vecshim_skip_cross_field": True}


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
    #: Most tokens (long-text windows included) one request may bring (413 beyond).
    #: None: 16,384 for a model computed in-process, 1,048,576 for a hosted one.
    max_request_tokens: int | None = Field(None, ge=1)
    #: Queued tokens beyond which requests above one text's worth get a 503 (None: 4 x max_request_tokens).
    max_queue_tokens: int | None = Field(None, ge=1)


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
    #: Most concurrent backend calls (None: one per batch worker). For a hosted
    #: backend the start and ceiling of its adaptive (AIMD) window.
    max_concurrency: int | None = Field(None, ge=1)
    #: Known limits of a hosted backend's account; the lower of these and what
    #: the upstream's headers announce applies.
    rate_limit: RateLimit | None = None
    #: Models tried in order when this one fails; each must share the fingerprint.
    fallbacks: list[str] = Field(default_factory=list)
    #: Extra names this model answers to on the OpenAI/Ollama routes.
    aliases: list[str] = Field(default_factory=list)
    #: false: a model that cannot start (unset `${VAR}`, missing extra, failed
    #: load) does not hold the server out of ready; its own routes answer 503.
    required: bool = True


class RerankerConfig(_Strict):
    """One named reranker: a reranker backend plus the policies around it."""

    backend: str
    options: dict[str, Any] = Field(default_factory=dict)
    #: Unset `max_size`: the larger of 32 and the reranker's own `max_batch_size`.
    batch: BatchConfig = Field(default_factory=BatchConfig)
    #: Documents longer than the model reads: score every window and keep the best (`max`),
    #: or only the first window (`truncate`).
    long_text: Literal["max", "truncate"] = "max"
    timeout_s: float = Field(45.0, gt=0, le=600)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit: CircuitPolicy = Field(default_factory=CircuitPolicy)
    max_concurrency: int | None = Field(None, ge=1)
    #: Rerankers tried in order when this one fails; each must score with the same model.
    fallbacks: list[str] = Field(default_factory=list)
    #: Extra names this reranker answers to in the `model` field of `/v1|v2/rerank`.
    aliases: list[str] = Field(default_factory=list)
    #: False: while it loads or fails, the rest of the server still reports ready.
    required: bool = True


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
    #: Longest pause while a request's headers and body arrive (408 beyond; gunicorn only).
    read_timeout_s: float = Field(5.0, gt=0, le=300)
    #: Longest time to receive one whole request once it began (408 beyond; gunicorn only).
    read_total_s: float = Field(30.0, gt=0, le=600)
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
    #: Absent: one bi-encoder reranker over the default model; `{}`: none.
    rerankers: dict[str, RerankerConfig] | None = None
    default_reranker: str | None = None
    cache: CacheConfig = Field(default_factory=CacheConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    #: Where hosted models share their rate budget (Redis for a fleet).
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    #: `required: false` models that cannot start -> why (set by parse_config).
    _unavailable: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def unavailable(self) -> dict[str, str]:
        """Optional models whose config cannot be completed (e.g. an unset `${VAR}`) -> the reason."""
        return self._unavailable

    @model_validator(mode="after")
    def _check_models(self, info):
        if not self.models:
            self.models = {DEFAULT_MODEL_NAME: ModelConfig(backend="sentence-transformers")}
        if (info.context or {}).get("vecshim_skip_cross_field"):
            if self.default_model not in self.models:
                self.default_model = next(iter(self.models))
            self._check_rerankers(strict=False)
            return self
        problems = cross_field_problems(self.default_model, {n: m.fallbacks for n, m in self.models.items()},
                                        optional={n for n, m in self.models.items() if not m.required})
        if problems:
            raise _PathError(*problems[0])
        if self.default_model is None:
            self.default_model = next(iter(self.models))
        self._check_rerankers()
        return self

    def _check_rerankers(self, strict: bool = True) -> None:
        if self.rerankers is None:
            name = f"{self.default_model}-rerank"
            self.rerankers = {name: RerankerConfig(backend="bi-encoder", options={"model": self.default_model})}
        if not strict:  # `vecshim config check` reports the rest itself
            if self.default_reranker is None:
                self.default_reranker = next(iter(self.rerankers), None)
            return
        for name, rr in self.rerankers.items():
            if not re.match(_NAME, name):
                raise _PathError(f"rerankers.{name}", f"reranker name {name!r} must match {_NAME}")
            if name in self.models:
                # /models/<name>/meta and /ready serve both kinds: one name, one thing.
                raise _PathError(f"rerankers.{name}", f"{name!r} is also the name of a model; use another")
            for fb in rr.fallbacks:
                if fb not in self.rerankers or fb == name:
                    raise _PathError(f"rerankers.{name}.fallbacks", f"{fb!r} is not another configured reranker")
        if self.default_reranker is None:
            self.default_reranker = next(iter(self.rerankers), None)
        elif self.default_reranker not in self.rerankers:
            raise _PathError("default_reranker",
                             f"{self.default_reranker!r} is not in rerankers ({', '.join(self.rerankers) or 'none'})")

    def secrets(self) -> list[str]:
        """Every secret in the config (for log redaction): values under secret-looking keys
        (key, token, secret, password, at any depth of a model's options), bearer tokens,
        and credentials inside any URL."""
        from .logs import url_secrets

        found = list(self.server.auth.embed_tokens) + list(self.server.auth.metrics_tokens)

        def walk(value, secret: bool) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    # a *_file option names where the secret is; its content is registered on reading
                    walk(v, secret or (bool(_SECRET_KEY.search(str(k))) and not str(k).endswith("_file")))
            elif isinstance(value, (list, tuple)):
                for v in value:
                    walk(v, secret)
            elif isinstance(value, str) and value:
                if secret:
                    found.append(value)
                if "@" in value and "://" in value:
                    found.extend(url_secrets(value))

        for model in [*self.models.values(), *(self.rerankers or {}).values()]:
            walk(model.options, False)
        for url in (self.cache.redis_url, self.budget.redis_url):
            if url:
                found.extend(url_secrets(url))
        return [s for s in found if len(s) >= 4]


def cross_field_problems(default_model: str | None, fallbacks: dict[str, list],
                         optional=frozenset()) -> list[tuple[str, str]]:
    """(path, problem) for model names, `default_model` and fallbacks that name no model.

    `fallbacks` maps every configured model name to its fallback list;
    `optional` holds the names of `required: false` models.
    """
    out = []
    names = list(fallbacks)
    for name in names:
        if not re.match(_NAME, str(name)):
            out.append((f"models.{name}", f"model name {name!r} must match {_NAME}"))
    if default_model is not None and default_model not in fallbacks:
        out.append(("default_model", f"{default_model!r} is not in models ({', '.join(map(str, names))})"
                    + did_you_mean(default_model, names)))
    default = default_model if default_model in fallbacks else (names[0] if default_model is None and names
                                                                else None)
    if default in optional:
        out.append((f"models.{default}.required", "the default model must be required (Weaviate's /vectors "
                                                  "calls it)"))
    for name, fbs in fallbacks.items():
        for i, fb in enumerate(fbs or ()):
            if fb not in fallbacks or fb == name:
                others = [n for n in names if n != name]
                out.append((f"models.{name}.fallbacks.{i}",
                            f"{fb!r} is not another configured model" + did_you_mean(fb, others)))
    return out


def did_you_mean(word: Any, choices) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or ''."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def expand_env(value: Any, env: dict[str, str] | None = None, *, path: str = "",
               missing: list[str] | None = None) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string; `$$` is a literal `$`.

    An unset `${VAR}` is a ConfigError, or, when `missing` is a list, an empty
    string with the error appended to it.
    """
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: expand_env(v, env, path=f"{path}.{k}" if path else str(k), missing=missing)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, path=f"{path}.{i}" if path else str(i), missing=missing)
                for i, v in enumerate(value)]
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
        message = f"{path or '<root>'}: environment variable {name} is not set"
        if missing is None:
            raise ConfigError(message)
        missing.append(message)
        return ""

    return _VAR.sub(sub, value)


def _model_at(root: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class validating the mapping at `loc` under `root`, if known."""
    t: Any = root
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(str(part))
            if field is None:
                return None
            t = field.annotation
        elif typing.get_origin(t) in (dict, list):
            t = typing.get_args(t)[-1]
        else:
            return None
    t = _unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _unwrap(t: Any) -> Any:
    if typing.get_origin(t) in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _hint(e: dict, root: type[BaseModel] | None) -> str:
    """A did-you-mean for an unknown key or a near-miss of an allowed value."""
    if e["type"] == "extra_forbidden" and e["loc"]:
        parent = _model_at(root, tuple(e["loc"][:-1]))
        return did_you_mean(e["loc"][-1], parent.model_fields) if parent else ""
    if e["type"] == "literal_error":
        allowed = re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", "")))
        return did_you_mean(e.get("input"), allowed)
    return ""


def format_validation_error(err: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    """Render pydantic errors as `path.to.key: message` lines (paths under `prefix`).

    With `root` (the model class validated), an unknown key or a near-miss of
    an allowed value gets a `(did you mean ...?)` hint.
    """
    lines = []
    for e in err.errors():
        parts = [prefix, *(str(p) for p in e["loc"])]
        msg = e["msg"]
        cause = (e.get("ctx") or {}).get("error")
        if e["type"] == "value_error" and isinstance(cause, ValueError):
            msg = str(cause)  # drop pydantic's "Value error, " prefix
            if isinstance(cause, _PathError):
                parts.append(cause.path)
        elif e["type"] == "extra_forbidden":
            msg = "unknown key"
        loc = ".".join(p for p in parts if p) or "<root>"
        lines.append(f"{loc}: {msg}{_hint(e, root)}")
    return "\n".join(lines)


def _is_false(value: Any) -> bool:
    """Whether pydantic reads `value` as a false bool (`false`, "false", "no", 0...)."""
    return value is False or (isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0", "f", "n"))


def parse_config(data: Any, env: dict[str, str] | None = None) -> Config:
    """Validate a mapping (already loaded from YAML) into a Config."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("<root>: the config must be a mapping")
    models = data.get("models")
    optional = {n: m for n, m in models.items() if isinstance(m, dict) and _is_false(m.get("required"))} \
        if isinstance(models, dict) else {}
    # An optional model's unset ${VAR}s make that model unavailable, not the config invalid.
    unavailable, expanded = {}, {}
    for name, mdata in optional.items():
        errors: list[str] = []
        expanded[name] = expand_env(mdata, env, path=f"models.{name}", missing=errors)
        if errors:
            unavailable[name] = "; ".join(errors)
    rest = {**data, "models": {n: m for n, m in models.items() if n not in optional}} if optional else data
    data = expand_env(rest, env)
    if optional:
        data["models"] = {n: expanded.get(n, data["models"].get(n)) for n in models}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, root=Config)) from None
    cfg._unavailable.update(unavailable)
    return cfg


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
