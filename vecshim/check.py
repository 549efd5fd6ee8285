"""Every problem of a config file in one run (`vecshim config check`, and `serve` before it starts).

Schema, each model's backend and options, cross-field rules, plugin loading,
environment variables, API keys and key files, fallback vector spaces; each
problem a line `FILE: path: problem`. Nothing is loaded and nothing is
called over the network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import (CHECK_CONTEXT, DEFAULT_MODEL_NAME, ENV_CONFIG, Config, ModelConfig, PluginsConfig,
                     cross_field_problems, did_you_mean, expand_env, format_validation_error)
from .errors import ConfigError
from .space import identity_problem

__all__ = ["Problem", "Report", "check_config"]


@dataclass(frozen=True)
class Problem:
    """One finding: `path` is the dotted config key ('' for the whole file)."""

    path: str
    message: str
    warning: bool = False


@dataclass
class Report:
    """What `check_config` found; `config` is set when the file is valid."""

    file: str
    problems: list[Problem] = field(default_factory=list)
    config: Config | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.warning]

    def lines(self) -> list[str]:
        """`FILE: path: problem` for each finding, errors first."""
        out = []
        for p in self.errors + self.warnings:
            where = f"{p.path}: " if p.path else ""
            message = "; ".join(part.strip() for part in p.message.splitlines() if part.strip())  # one line each
            out.append(f"{self.file}: {where}{'warning: ' if p.warning else ''}{message}")
        return out

    def add(self, path: str, message: str, warning: bool = False) -> None:
        """Record a finding once (two checks can reach the same key).

        A warning is a problem of a `required: false` model: it starts
        unavailable (503 on its own routes) instead of stopping the server.
        """
        if warning:
            message += " (required: false: the model will be unavailable)"
        if not any(p.path == path and p.message == message for p in self.problems):
            self.problems.append(Problem(path, message, warning))


def _split(text: str) -> list[tuple[str, str]]:
    """`path: message` lines (format_validation_error's output) -> pairs."""
    out = []
    for line in text.splitlines():
        path, sep, msg = line.partition(": ")
        out.append((path, msg) if sep else ("", line))
    return out


def _optional(raw_models: dict, name: Any) -> bool:
    """A model with `required: false` does not hold the server out of ready."""
    m = raw_models.get(name)
    return isinstance(m, dict) and m.get("required") is False


def _model_of(path: str) -> str | None:
    parts = path.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "models" else None


def check_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Report:
    """Check the config at `path` (or $VECSHIM_CONFIG, or the built-in default) without loading it."""
    env_map = os.environ if env is None else env
    path = path or env_map.get(ENV_CONFIG) or None
    report = Report(str(path) if path else "<default config>")
    data: Any = {}
    base_dir = None
    if path is not None:
        base_dir = Path(path).resolve().parent
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            report.add("", f"cannot read config file: {err.strerror}")
            return report
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            report.add("", f"invalid YAML: {err}")
            return report
    data = {} if data is None else data
    if not isinstance(data, dict):
        report.add("", "the config must be a mapping")
        return report
    raw_models = data.get("models") if isinstance(data.get("models"), dict) else {}

    env_errors: list[str] = []
    data = expand_env(data, env, missing=env_errors)
    for p, msg in _split("\n".join(env_errors)):
        report.add(p, msg, warning=_optional(raw_models, _model_of(p)))

    try:
        report.config = Config.model_validate(data, context=CHECK_CONTEXT)
    except ValidationError as err:
        for p, msg in _split(format_validation_error(err, root=Config)):
            report.add(p, msg)

    registry = _check_plugins(data, base_dir, report)
    models = data["models"] if raw_models else {}
    names = {n: (m.get("fallbacks") if isinstance(m, dict) and isinstance(m.get("fallbacks"), list) else [])
             for n, m in models.items()} or {DEFAULT_MODEL_NAME: []}
    default = data.get("default_model")
    optional = {n for n in names if _optional(raw_models, n)}
    for p, msg in cross_field_problems(default if isinstance(default, str) else None, names, optional):
        report.add(p, msg)
    built = {}
    for name, raw in models.items():
        backend = _check_model(name, raw, registry, report, optional=_optional(raw_models, name))
        if backend is not None:
            built[name] = backend
    _check_fallbacks(models, built, report, registry)
    _check_rerankers(report, registry)
    if report.errors:
        report.config = None
    return report


def _check_rerankers(report: Report, registry) -> None:
    """The `rerankers:` section once the schema is valid: names, fallbacks, backends, options, model references."""
    from .config import _PathError
    from .ranking import build_rankers

    cfg = report.config
    if cfg is None:
        return
    try:
        cfg._check_rerankers()
        build_rankers(cfg, registry, {name: None for name in cfg.models})
    except _PathError as err:
        report.add(err.path, str(err))
    except ConfigError as err:
        for p, msg in _split(err.message):
            report.add(p, msg)


def _check_plugins(data: dict, base_dir: Path | None, report: Report):
    from .plugins import collect_backends, get_plugin_manager

    try:
        plugins = PluginsConfig.model_validate(data.get("plugins") or {})
    except ValidationError:
        plugins = PluginsConfig()  # the schema errors are reported already
    errors: list[tuple[str, str]] = []
    pm = get_plugin_manager(dirs=plugins.dirs, disable=plugins.disable, load_entrypoints=plugins.entrypoints,
                            base_dir=base_dir, errors=errors)
    registry = collect_backends(pm, errors=errors)
    for p, msg in errors:
        report.add(p, msg)
    return registry


def _check_model(name: str, raw: Any, registry, report: Report, optional: bool):
    """Backend name, its options and its preflight; returns (ModelConfig, backend) when both are valid."""
    import importlib.util

    if not isinstance(raw, dict) or not isinstance(raw.get("backend"), str):
        return None
    at = f"models.{name}"
    cls = registry.backends.get(raw["backend"])
    if cls is None:
        installed = ", ".join(sorted(registry.backends)) or "(none)"
        report.add(f"{at}.backend", f"unknown backend {raw['backend']!r}; installed backends: {installed}"
                   + did_you_mean(raw["backend"], registry.backends), warning=optional)
        return None
    missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
    if missing:
        extra = f"vecshim[{cls.extra}]" if cls.extra else " ".join(missing)
        report.add(at, f"backend {cls.name!r} needs: pip install '{extra}'", warning=optional)
        return None
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        return None  # reported by the schema
    try:
        opts = cls.Options.model_validate(options)
    except ValidationError as err:
        for p, msg in _split(format_validation_error(err, prefix=f"{at}.options", root=cls.Options)):
            report.add(p, msg, warning=optional)
        return None
    try:
        backend = cls(opts)
        found = backend.preflight()
        identity = identity_problem(backend)
    except ConfigError as err:
        report.add(at, err.message, warning=optional)
        return None
    except Exception as err:  # a plugin bug: name it, don't crash the check
        report.add(at, f"backend {cls.name!r} failed to construct: {type(err).__name__}: {err}", warning=optional)
        return None
    if identity:
        report.add(at, identity, warning=optional)
        return None
    for option, msg in found:
        p = f"{at}.options.{option}"
        if not any(q.path == p for q in report.problems):  # e.g. already "environment variable X is not set"
            report.add(p, msg, warning=optional)
    try:
        return ModelConfig.model_validate(raw), backend
    except ValidationError:
        return None


def _check_fallbacks(models: dict, built: dict, report: Report, registry) -> None:
    """A fallback must embed into the same vector space, as far as config and options tell."""
    from .model import Model
    from .space import differences

    origins = getattr(registry, "origins", {})
    made = {n: Model(n, cfg, backend, origin=origins.get(cfg.backend)) for n, (cfg, backend) in built.items()}
    for name, m in made.items():
        for i, fb in enumerate(m.cfg.fallbacks):
            other = made.get(fb)
            if other is None:
                continue
            # Parts only loading decides (a learnt dimension) are missing here and compared at start.
            diff = differences(m.fingerprint_parts(), other.fingerprint_parts(), known_only=True)
            if diff:
                report.add(f"models.{name}.fallbacks.{i}",
                           f"fallback {fb}: {'; '.join(diff)} (a fallback must embed into the same vector space)")
