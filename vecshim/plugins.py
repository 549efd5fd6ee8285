"""Plugin manager: built-in backends and rerankers, plugin folders and entry points."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable

import pluggy
from pydantic import ValidationError

from . import hookspecs
from .backend import Backend
from .config import format_validation_error
from .errors import ConfigError, UnknownBackendError
from .reranker import Reranker

__all__ = ["DEFAULT_PLUGINS", "Registry", "get_plugin_manager", "collect_backends", "plugin_infos", "build_plugin",
           "plugin_origin"]

#: Built-in backends and rerankers, registered exactly like third-party plugins.
DEFAULT_PLUGINS = (
    "vecshim.backends.local",
    "vecshim.backends.openai_api",
    "vecshim.backends.cohere_api",
    "vecshim.rerankers.bi_encoder",
    "vecshim.rerankers.cross_encoder",
    "vecshim.rerankers.cohere_rerank",
)


@dataclass
class Registry:
    """Backend and reranker classes by name, with the plugin that registered each."""

    backends: dict[str, type[Backend]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    #: Backend name -> {"plugin", "distribution", "version"} of its registering plugin.
    origins: dict[str, dict] = field(default_factory=dict)
    rerankers: dict[str, type[Reranker]] = field(default_factory=dict)
    reranker_owners: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> type[Backend]:
        """Return the backend class called `name` or raise UnknownBackendError."""
        try:
            return self.backends[name]
        except KeyError:
            raise UnknownBackendError(name, self.backends) from None

    def get_reranker(self, name: str) -> type[Reranker]:
        """Return the reranker class called `name` or raise UnknownBackendError."""
        try:
            return self.rerankers[name]
        except KeyError:
            raise UnknownBackendError(name, self.rerankers, kind="reranker") from None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the distribution version of each entry-point plugin."""

    def __init__(self):
        super().__init__(hookspecs.NAME)
        self.versions: dict[str, str] = {}
        self.distributions: dict[str, str] = {}


def _load_file(pm: pluggy.PluginManager, path: Path) -> None:
    name = f"vecshim_plugin_{path.stem}"
    if pm.get_plugin(path.stem) is not None or pm.is_blocked(path.stem):
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses and pydantic look a class's module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"plugin file {path} failed to import: {type(err).__name__}: {err}") from err
    _register(pm, module, path.stem)


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> None:
    # A hookimpl whose arguments don't match the hookspec fails here, not at first call.
    try:
        pm.register(plugin, name)
    except (pluggy.PluginValidationError, ValueError) as err:
        raise ConfigError(f"plugin {name or plugin!r}: {err}") from None


def _load_entrypoints(pm: PluginManager, attempt) -> None:
    # Like pm.load_setuptools_entrypoints, but an import failure names the plugin.
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != hookspecs.NAME or pm.get_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            attempt("plugins.entrypoints", _load_entrypoint, pm, dist, ep)


def _load_entrypoint(pm: PluginManager, dist, ep) -> None:
    try:
        plugin = ep.load()
    except Exception as err:
        raise ConfigError(
            f"plugin {ep.name!r} from {dist.metadata['Name']} failed to load: "
            f"{type(err).__name__}: {err}") from err
    _register(pm, plugin, ep.name)
    pm.versions[ep.name] = dist.version
    pm.distributions[ep.name] = dist.metadata["Name"]


def get_plugin_manager(*, dirs: Iterable[str | Path] = (), disable: Iterable[str] = (),
                       plugins: Iterable[object] = (), load_entrypoints: bool = True,
                       base_dir: Path | None = None, errors: list[tuple[str, str]] | None = None) -> PluginManager:
    """Build a fresh plugin manager: built-ins, plugin folders, entry points, extras.

    `disable` blocks plugins by name (built-ins are named by module, e.g.
    `vecshim.backends.cohere_api`; folder plugins by file stem; entry points
    by entry-point name). A hook name that matches no hookspec fails here.
    With an `errors` list, each failing plugin is recorded there as
    (config path, problem) and skipped instead (`vecshim config check`).
    """
    def attempt(path: str, step, *args) -> None:
        try:
            step(*args)
        except ConfigError as err:
            if errors is None:
                raise
            errors.append((path, err.message))

    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name in disable:
        pm.set_blocked(name)
    for modname in DEFAULT_PLUGINS:
        if not pm.is_blocked(modname):
            pm.register(importlib.import_module(modname), modname)
    for i, d in enumerate(dirs):
        folder = Path(d)
        if not folder.is_absolute() and base_dir is not None:
            folder = base_dir / folder
        if not folder.is_dir():
            if errors is None:
                raise ConfigError(f"plugins.dirs: {folder} is not a directory")
            errors.append((f"plugins.dirs.{i}", f"{folder} is not a directory"))
            continue
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                attempt(f"plugins.dirs.{i}", _load_file, pm, path)
    if load_entrypoints:
        _load_entrypoints(pm, attempt)
    for plugin in plugins:
        _register(pm, plugin)
    attempt("plugins", _check_pending, pm)
    return pm


def plugin_origin(pm: pluggy.PluginManager, plugin: object) -> dict:
    """Which plugin registered a backend: a stable name, its distribution and version.

    Part of every model's fingerprint, so it must not change between processes:
    an object registered without a name is named by its class, not pluggy's id().
    """
    from . import __version__

    name = pm.get_name(plugin) or ""
    dist = getattr(pm, "distributions", {}).get(name)
    version = getattr(pm, "versions", {}).get(name)
    if name.startswith("vecshim.") and dist is None:
        dist, version = "vecshim", __version__
    if name.isdigit() or not name:  # pluggy names an unnamed object by id()
        cls = plugin if inspect.ismodule(plugin) or inspect.isclass(plugin) else type(plugin)
        name = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"
    if version is None:
        module = plugin if inspect.ismodule(plugin) else sys.modules.get(getattr(plugin, "__module__", ""))
        version = getattr(plugin, "__version__", None) or getattr(module, "__version__", None)
    return {"plugin": name, "distribution": dist, "version": None if version is None else str(version)}


def _check_pending(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        name = pm.get_name(err.plugin)
        pm.unregister(err.plugin)  # so a collecting caller can go on without it
        raise ConfigError(f"plugin {name!r}: {err}") from None


def collect_backends(pm: pluggy.PluginManager, errors: list[tuple[str, str]] | None = None) -> Registry:
    """Call every `register_backends` and `register_rerankers` hook; duplicate names fail.

    With an `errors` list, a failing plugin is recorded there and skipped.
    """
    registry = Registry()
    _collect(pm, "register_backends", Backend, "backend", registry.backends, registry.owners, errors,
             registry.origins)
    _collect(pm, "register_rerankers", Reranker, "reranker", registry.rerankers, registry.reranker_owners,
             errors)
    return registry


def _collect(pm: pluggy.PluginManager, hook: str, base: type, kind: str, classes: dict, owners: dict,
             errors: list[tuple[str, str]] | None, origins: dict | None = None) -> None:
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
        owner = impl.plugin_name
        origin = plugin_origin(pm, impl.plugin)

        def register(cls, _owner=owner, origin=origin):
            if not (inspect.isclass(cls) and issubclass(cls, base)):
                raise ConfigError(f"plugin {_owner!r} registered {cls!r}, which is not a "
                                  f"vecshim.{base.__name__} subclass")
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"plugin {_owner!r}: {kind} {cls.__name__} has no name")
            if inspect.isabstract(cls):
                missing = ", ".join(sorted(cls.__abstractmethods__))
                raise ConfigError(f"plugin {_owner!r}: {kind} {name!r} does not implement {missing}")
            if name in classes:
                raise ConfigError(
                    f"{kind} name {name!r} registered twice: by plugin {owners[name]!r} "
                    f"and by plugin {_owner!r}")
            classes[name] = cls
            owners[name] = _owner
            if origins is not None:
                origins[name] = origin

        args = {"register": register}
        try:
            try:
                impl.function(*(args[a] for a in impl.argnames))
            except ConfigError:
                raise
            except Exception as err:
                raise ConfigError(f"plugin {owner!r} failed in {hook}: {type(err).__name__}: {err}") from err
        except ConfigError as err:
            if errors is None:
                raise
            errors.append(("plugins", err.message))


def plugin_infos(pm: pluggy.PluginManager) -> list[dict]:
    """Name, version and hooks of every registered plugin (for /meta and the CLI)."""
    from . import __version__

    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        version = getattr(pm, "versions", {}).get(name)
        if version is None and name.startswith("vecshim."):
            version = __version__
        out.append({"name": name, "version": version, "hooks": hooks})
    return sorted(out, key=lambda p: p["name"])


def build_plugin(cls, options: dict, path: str, kind: str):
    """Construct a registered backend or reranker class from its config section at `path`.

    A missing pip extra and invalid options are ConfigErrors naming `path`
    (`models.NAME` or `rerankers.NAME`); `kind` words the message.
    """
    missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
    if missing:
        extra = f"vecshim[{cls.extra}]" if cls.extra else " ".join(missing)
        raise ConfigError(f"{path}: {kind} {cls.name!r} needs: pip install '{extra}'")
    try:
        parsed = cls.Options.model_validate(options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix=f"{path}.options", root=cls.Options)) from None
    return cls(parsed)
