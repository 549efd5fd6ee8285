"""Plugin manager: built-ins, plugin folders, entry points and the register_backends hook."""
from __future__ import annotations

import importlib.metadata
import textwrap

import pytest
import yaml

from fakebackend import FakeBackend, FakePlugin
from vecshim import Backend, ConfigError, __version__, hookimpl
from vecshim.app import create_app
from vecshim.plugins import DEFAULT_PLUGINS, collect_backends, get_plugin_manager, plugin_infos

BUILTIN_OWNERS = {
    "sentence-transformers": "vecshim.backends.local",
    "openai": "vecshim.backends.openai_api",
    "cohere": "vecshim.backends.cohere_api",
}

PLUGIN_FILE = '''
from vecshim import Backend, hookimpl


class {cls}(Backend):
    name = {name!r}

    def info(self):
        return {{"model": "constant-2d"}}

    def embed(self, texts, task):
        return [[1.0, 0.0] for _ in texts]


@hookimpl
def register_backends(register):
    register({cls})
'''


def plugin_file(folder, stem, backend_name, cls="FileBackend"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(PLUGIN_FILE.format(cls=cls, name=backend_name))
    return path


def registry(**kwargs):
    kwargs.setdefault("load_entrypoints", False)
    return collect_backends(get_plugin_manager(**kwargs))


# -- built-ins ------------------------------------------------------------------

def test_builtins_are_registered_through_the_hook():
    pm = get_plugin_manager(load_entrypoints=False)
    assert sorted(pm.get_name(p) for p in pm.get_plugins()) == sorted(DEFAULT_PLUGINS)
    callers = {impl.plugin_name for impl in pm.hook.register_backends.get_hookimpls()}
    assert callers == set(BUILTIN_OWNERS.values())
    rerankers = {impl.plugin_name for impl in pm.hook.register_rerankers.get_hookimpls()}
    assert rerankers == set(DEFAULT_PLUGINS) - callers
    reg = collect_backends(pm)
    assert reg.owners == BUILTIN_OWNERS
    assert reg.reranker_owners == {"bi-encoder": "vecshim.rerankers.bi_encoder",
                                   "cross-encoder": "vecshim.rerankers.cross_encoder",
                                   "cohere": "vecshim.rerankers.cohere_rerank"}


def test_plugin_infos_for_builtins():
    infos = plugin_infos(get_plugin_manager(load_entrypoints=False))
    assert infos == [{"name": name, "version": __version__,
                      "hooks": ["register_rerankers" if ".rerankers." in name else "register_backends"]}
                     for name in sorted(DEFAULT_PLUGINS)]


def test_extra_plugin_objects_are_registered():
    reg = registry(plugins=[FakePlugin()])
    assert reg.get("fake") is FakeBackend
    assert reg.owners["fake"] not in DEFAULT_PLUGINS


def test_each_manager_is_fresh():
    registry(plugins=[FakePlugin()])
    assert "fake" not in registry().backends


# -- the register callback ------------------------------------------------------------

def test_duplicate_backend_name_names_both_plugins(tmp_path):
    plugin_file(tmp_path, "my_openai", "openai")
    with pytest.raises(ConfigError) as excinfo:
        registry(dirs=[tmp_path])
    msg = excinfo.value.message
    assert "backend name 'openai' registered twice" in msg
    assert "'vecshim.backends.openai_api'" in msg and "'my_openai'" in msg


def test_duplicate_between_two_plugin_objects():
    class Again:
        @hookimpl
        def register_backends(self, register):
            register(FakeBackend)

    with pytest.raises(ConfigError, match="backend name 'fake' registered twice"):
        registry(plugins=[FakePlugin(), Again()])


def registering(obj):
    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(obj)
    return Plugin()


class NotABackend:
    name = "nope"


class Nameless(Backend):
    def embed(self, texts, task):
        return []


class Abstract(Backend):
    name = "abstract"


@pytest.mark.parametrize("obj, message", [
    (NotABackend, "which is not a vecshim.Backend subclass"),
    (FakeBackend(FakeBackend.Options()), "which is not a vecshim.Backend subclass"),
    ("fake", "which is not a vecshim.Backend subclass"),
    (Nameless, "backend Nameless has no name"),
    (Abstract, "backend 'abstract' does not implement embed"),
])
def test_registering_something_else_fails_clearly(obj, message):
    with pytest.raises(ConfigError, match=message):
        registry(plugins=[registering(obj)])


def test_hookimpl_may_take_no_arguments():
    class Quiet:
        @hookimpl
        def register_backends(self):
            pass

    assert set(registry(plugins=[Quiet()]).backends) == set(BUILTIN_OWNERS)


def test_exception_in_a_hook_names_the_plugin():
    class Broken:
        @hookimpl
        def register_backends(self, register):
            raise RuntimeError("kaboom")

    with pytest.raises(ConfigError, match=r"failed in register_backends: RuntimeError: kaboom"):
        registry(plugins=[Broken()])


def test_unknown_backend_lists_registered_names():
    with pytest.raises(ConfigError, match="unknown backend 'x'; installed backends: cohere, openai, sentence-"):
        registry().get("x")


# -- hook validation -------------------------------------------------------------------

def test_misspelled_hook_fails_at_startup(tmp_path):
    (tmp_path / "typo.py").write_text(textwrap.dedent("""
        from vecshim import hookimpl

        @hookimpl
        def register_backend(register):
            pass
    """))
    with pytest.raises(ConfigError) as excinfo:
        get_plugin_manager(dirs=[tmp_path], load_entrypoints=False)
    assert excinfo.value.message.startswith("plugin 'typo': ")
    assert "register_backend" in excinfo.value.message


def test_hookimpl_with_wrong_arguments_fails_at_startup(tmp_path):
    (tmp_path / "wrongargs.py").write_text(textwrap.dedent("""
        from vecshim import hookimpl

        @hookimpl
        def register_backends(registry):
            pass
    """))
    with pytest.raises(ConfigError, match=r"(?s)plugin 'wrongargs': .*registry"):
        get_plugin_manager(dirs=[tmp_path], load_entrypoints=False)


# -- plugin folders ----------------------------------------------------------------------

def test_py_files_in_plugin_dirs_are_loaded(tmp_path):
    plugin_file(tmp_path, "alpha", "alpha")
    plugin_file(tmp_path, "beta", "beta", cls="Beta")
    plugin_file(tmp_path, "_private", "private")
    (tmp_path / "notes.txt").write_text("not a plugin")
    pm = get_plugin_manager(dirs=[str(tmp_path)], load_entrypoints=False)
    reg = collect_backends(pm)
    assert reg.owners["alpha"] == "alpha" and reg.owners["beta"] == "beta"
    assert "private" not in reg.backends
    infos = {p["name"]: p for p in plugin_infos(pm)}
    assert infos["alpha"] == {"name": "alpha", "version": None, "hooks": ["register_backends"]}


def test_relative_dirs_resolve_against_base_dir(tmp_path, monkeypatch):
    plugin_file(tmp_path / "plugins", "relative_one", "relative-one")
    monkeypatch.chdir(tmp_path.parent)
    assert "relative-one" in registry(dirs=["plugins"], base_dir=tmp_path).backends
    with pytest.raises(ConfigError, match=r"plugins\.dirs: plugins is not a directory"):
        registry(dirs=["plugins"])


def test_relative_dirs_resolve_against_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    plugin_file(conf / "myplugins", "from_config_dir", "from-config-dir")
    path = conf / "vecshim.yaml"
    path.write_text(yaml.safe_dump({"plugins": {"dirs": ["myplugins"], "entrypoints": False},
                                    "models": {"m": {"backend": "from-config-dir"}}}))
    monkeypatch.chdir(tmp_path)
    state = create_app(str(path), load=False).extensions["vecshim"]
    assert type(state.models["m"].backend).__name__ == "FileBackend"


def test_plugin_dir_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"plugins\.dirs: .*missing is not a directory"):
        registry(dirs=[tmp_path / "missing"])


def test_plugin_file_import_error_names_the_file(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(ConfigError, match=r"plugin file .*broken\.py failed to import: ModuleNotFoundError"):
        registry(dirs=[tmp_path])


def test_plugin_file_may_use_dataclasses_and_postponed_annotations(tmp_path):
    # Both look the defining module up in sys.modules.
    (tmp_path / "annotated.py").write_text(textwrap.dedent("""
        from __future__ import annotations

        from dataclasses import dataclass
        from typing import Literal

        from vecshim import Backend, BackendOptions, hookimpl


        @dataclass
        class Settings:
            size: int = 2


        class Options(BackendOptions):
            mode: Literal["a", "b"] = "a"


        class Annotated(Backend):
            name = "annotated"
            Options = Options

            def embed(self, texts, task):
                return [[1.0] * Settings().size for _ in texts]


        @hookimpl
        def register_backends(register):
            register(Annotated)
    """))
    cls = registry(dirs=[tmp_path]).get("annotated")
    assert cls.Options.model_validate({"mode": "b"}).mode == "b"
    with pytest.raises(ValueError):
        cls.Options.model_validate({"mode": "c"})


# -- disabling -------------------------------------------------------------------------

def test_disable_builtin_by_module_name():
    reg = registry(disable=["vecshim.backends.cohere_api"])
    assert set(reg.backends) == {"sentence-transformers", "openai"}


def test_disable_file_plugin_by_stem(tmp_path):
    plugin_file(tmp_path, "gamma", "gamma")
    plugin_file(tmp_path, "delta", "delta", cls="Delta")
    reg = registry(dirs=[tmp_path], disable=["gamma"])
    assert "delta" in reg.backends and "gamma" not in reg.backends


def test_disabled_plugin_may_reuse_a_builtin_name(tmp_path):
    # Disabling the built-in lets a replacement register the same backend name.
    plugin_file(tmp_path, "my_cohere", "cohere")
    assert registry(dirs=[tmp_path], disable=["vecshim.backends.cohere_api"]).owners["cohere"] == "my_cohere"


# -- entry points ------------------------------------------------------------------------

class EntryPointPlugin:
    """Stands in for an installed distribution's plugin module."""

    @hookimpl
    def register_backends(self, register):
        register(EntryPointBackend)


class EntryPointBackend(Backend):
    name = "from-entry-point"

    def info(self):
        return {"model": "constant-2d"}

    def embed(self, texts, task):
        return [[0.5, 0.5] for _ in texts]


class FakeEntryPoint:
    def __init__(self, name, group, target):
        self.name, self.group, self.value = name, group, f"{name}:plugin"
        self._target = target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


class FakeDistribution:
    def __init__(self, name, version, entry_points):
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = entry_points


@pytest.fixture
def distributions(monkeypatch):
    """Replace installed distributions with the list the test fills (as pluggy's own tests do)."""
    dists = []
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))
    return dists


def test_entry_point_plugin_is_registered_with_its_version(distributions):
    distributions.append(FakeDistribution("vecshim-ep", "1.2.3", [
        FakeEntryPoint("ep_backend", "vecshim", EntryPointPlugin()),
        FakeEntryPoint("other_group", "pytest11", RuntimeError("must not be loaded")),
    ]))
    pm = get_plugin_manager()
    reg = collect_backends(pm)
    assert reg.get("from-entry-point") is EntryPointBackend
    assert reg.owners["from-entry-point"] == "ep_backend"
    infos = {p["name"]: p for p in plugin_infos(pm)}
    assert infos["ep_backend"] == {"name": "ep_backend", "version": "1.2.3", "hooks": ["register_backends"]}
    assert "other_group" not in infos


def test_entry_points_can_be_turned_off(distributions):
    distributions.append(FakeDistribution("vecshim-ep", "1.2.3", [
        FakeEntryPoint("ep_backend", "vecshim", EntryPointPlugin())]))
    assert "from-entry-point" not in registry(load_entrypoints=False).backends


def test_entry_point_disabled_by_name(distributions):
    distributions.append(FakeDistribution("vecshim-ep", "1.2.3", [
        FakeEntryPoint("ep_backend", "vecshim", RuntimeError("disabled plugins are not imported"))]))
    reg = collect_backends(get_plugin_manager(disable=["ep_backend"]))
    assert "from-entry-point" not in reg.backends


def test_entry_point_import_failure_names_the_plugin(distributions):
    distributions.append(FakeDistribution("vecshim-broken", "0.1", [
        FakeEntryPoint("broken_ep", "vecshim", ImportError("No module named 'torchy'"))]))
    with pytest.raises(ConfigError) as excinfo:
        get_plugin_manager()
    assert excinfo.value.message == ("plugin 'broken_ep' from vecshim-broken failed to load: "
                                     "ImportError: No module named 'torchy'")


def test_entry_point_with_a_misspelled_hook_fails(distributions):
    class Typo:
        @hookimpl
        def register_backend(self, register):
            pass

    distributions.append(FakeDistribution("vecshim-typo", "0.1", [FakeEntryPoint("typo_ep", "vecshim", Typo())]))
    with pytest.raises(ConfigError, match=r"^plugin 'typo_ep': .*register_backend"):
        get_plugin_manager()


def test_entry_point_backend_served_by_create_app(distributions):
    distributions.append(FakeDistribution("vecshim-ep", "1.2.3", [
        FakeEntryPoint("ep_backend", "vecshim", EntryPointPlugin())]))
    state = create_app({"models": {"m": {"backend": "from-entry-point"}}}, load=False).extensions["vecshim"]
    assert isinstance(state.models["m"].backend, EntryPointBackend)
    assert {"name": "ep_backend", "version": "1.2.3", "hooks": ["register_backends"]} in state.plugins
