"""docs/plugins.md documents every hook and every public Backend member, with their real signatures."""
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from conftest import ROOT
from vecshim import Backend, Reranker, hookspecs
from vecshim.plugins import collect_backends, get_plugin_manager
from vecshim.testing import run_conformance, run_reranker_conformance

DOC = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
HEADINGS = re.findall(r"^#{2,4} `([^`]+)`", DOC, flags=re.M)


def signature(fn, drop_self: bool = False) -> str:
    """`name(params) -> ret` as written in the docs (annotations unquoted)."""
    sig = inspect.signature(fn)
    if drop_self:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return f"{fn.__name__}{sig}".replace("'", "")


def _default(value) -> str:
    return value.__name__ if inspect.isclass(value) else repr(value)


def backend_members(cls=Backend) -> dict[str, str]:
    """Every public attribute and method of `cls` (Backend or Reranker) -> its documented heading."""
    out = {}
    annotations = cls.__annotations__
    for name in sorted(set(dir(cls)) | set(annotations)):
        if name.startswith("_"):
            continue
        value = inspect.getattr_static(cls, name, None)
        if inspect.isfunction(value):
            out[name] = signature(value, drop_self=True)
        else:
            text = f"{name}: {annotations[name]}"
            out[name] = text + (f" = {_default(value)}" if name in cls.__dict__ else "")
    return out


def hook_names() -> list[str]:
    pm = get_plugin_manager(load_entrypoints=False)
    return sorted(n for n in dir(pm.hook) if not n.startswith("_"))


def test_there_is_something_to_check():
    assert hook_names() == ["register_backends", "register_rerankers"]
    assert {"score", "score_range", "use_models"} <= set(backend_members(Reranker))
    assert {"embed", "load", "name", "Options", "max_input_tokens"} <= set(backend_members())


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented_with_its_signature(hook):
    assert signature(getattr(hookspecs, hook)) in HEADINGS


@pytest.mark.parametrize("member, heading", sorted(backend_members().items()))
def test_every_backend_member_is_documented_with_its_signature(member, heading):
    assert heading in HEADINGS, f"docs/plugins.md needs a heading `{heading}`"


@pytest.mark.parametrize("member, heading", sorted(backend_members(Reranker).items()))
def test_every_reranker_member_is_documented_with_its_signature(member, heading):
    assert heading in HEADINGS, f"docs/plugins.md needs a heading `{heading}`"


def test_no_documented_member_that_does_not_exist():
    documented = {h.split("(")[0].split(":")[0] for h in HEADINGS}
    members = set(backend_members()) | set(backend_members(Reranker))
    assert documented <= members | set(hook_names()) | {"vecshim plugin new NAME [--dir PATH]"}


def example_code() -> str:
    blocks = re.findall(r"```python example\n(.*?)```", DOC, flags=re.S)
    assert len(blocks) == 1, "docs/plugins.md must have exactly one ```python example block"
    return blocks[0]


def test_the_example_plugin_loads_passes_the_kit_and_embeds(tmp_path):
    (tmp_path / "doc_example.py").write_text(example_code())
    registry = collect_backends(get_plugin_manager(dirs=[tmp_path], load_entrypoints=False))
    cls = registry.get("shouty-hash")
    assert registry.owners["shouty-hash"] == "doc_example"
    run_conformance(cls, {"dimensions": 16})
    backend = cls(cls.Options(dimensions=16))
    vectors = np.asarray(backend.embed(["Hello there", "hello THERE"], "passage"))
    assert vectors.shape == (2, 16) and np.allclose(vectors[0], vectors[1])


def test_the_reranker_example_loads_and_ranks_through_the_core(tmp_path):
    blocks = re.findall(r"```python reranker-example\n(.*?)```", DOC, flags=re.S)
    assert len(blocks) == 1
    (tmp_path / "doc_reranker.py").write_text(blocks[0])
    registry = collect_backends(get_plugin_manager(dirs=[tmp_path], load_entrypoints=False))
    assert registry.reranker_owners["word-overlap"] == "doc_reranker"
    run_reranker_conformance(registry.get_reranker("word-overlap"), {})
