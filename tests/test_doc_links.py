"""Docs cite only files that are in this repository; served pages cite no repository paths."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

TRACKED = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
DOCS = sorted(p for p in TRACKED if p.endswith(".md"))
BASENAMES = {p.rsplit("/", 1)[-1] for p in TRACKED}
#: A markdown link: [text](target "title")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: A file named in backticks: `docs/guide.md`, `test_soak.py`.
CITED = re.compile(r"`([A-Za-z0-9_./-]+\.(?:md|py|ya?ml|json|toml|cfg|sh|txt|lock))`")
#: Files the docs name that the reader creates or vecshim writes, never repository files.
NOT_REPO_FILES = {
    "manifest.json",             # written into the ONNX cache next to an export
    "plugins/shouty_hash.py",    # where the reader saves the docs' example plugin
    "vecshim_NAME/__init__.py",  # what `vecshim plugin new` creates
    "schema/compose-spec.json",  # its path upstream, in tests/schemas/README.md's provenance note
}


def test_there_are_docs():
    assert {"README.md", "docs/guide.md", "docs/hosted.md", "bench/README.md"} <= set(DOCS)


@pytest.mark.parametrize("doc", DOCS)
def test_links_point_to_files_in_the_repository(doc):
    path = ROOT / doc
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        file = target.split("#", 1)[0]
        resolved = (path.parent / file).resolve()
        if not resolved.exists() or not str(resolved).startswith(str(ROOT)):
            broken.append(target)
    assert not broken, f"{doc} links to files not in the repository: {broken}"


@pytest.mark.parametrize("doc", DOCS)
def test_cited_files_are_in_the_repository(doc):
    path = ROOT / doc
    missing = []
    for name in CITED.findall(path.read_text(encoding="utf-8")):
        if name.startswith("/") or name in NOT_REPO_FILES:
            continue  # a path on the reader's machine
        if "/" in name:
            if not ((ROOT / name).exists() or (path.parent / name).exists()):
                missing.append(name)
        elif name not in BASENAMES:
            missing.append(name)
    assert not missing, f"{doc} cites files not in the repository: {missing}"


def test_the_check_catches_a_missing_file(tmp_path):
    """The patterns above do find a link and a citation of a file that does not exist."""
    text = "See [the contract](../shared/CONTRACTS.md) and `CONTRACTS.md` §1.4."
    assert LINK.findall(text) == ["../shared/CONTRACTS.md"]
    assert CITED.findall(text) == ["CONTRACTS.md"]
    assert "CONTRACTS.md" not in BASENAMES


def test_served_docs_name_no_repository_paths():
    from vecshim.openapi import get_spec

    text = json.dumps(get_spec())
    assert not re.findall(r"\b(?:docs|tests|bench|vecshim)/[\w./-]+\.(?:md|py)\b", text)


def test_run_conformance_works_without_pytest(tmp_path):
    """docs/plugins.md: `run_conformance` needs no pytest (BackendConformance alone imports it)."""
    doc = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    (tmp_path / "doc_example.py").write_text(re.findall(r"```python example\n(.*?)```", doc, flags=re.S)[0])
    script = (
        "import sys\n"
        "sys.modules['pytest'] = None  # any `import pytest` now fails\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from vecshim.plugins import collect_backends, get_plugin_manager\n"
        "from vecshim.testing import run_conformance\n"
        f"reg = collect_backends(get_plugin_manager(dirs=[{str(tmp_path)!r}], load_entrypoints=False))\n"
        "names = run_conformance(reg.get('shouty-hash'), {'dimensions': 16})\n"
        "print(len(names))\n"
        "try:\n"
        "    from vecshim.testing import BackendConformance\n"
        "except ImportError:\n"
        "    print('BackendConformance needs pytest')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, note = proc.stdout.split()[0], proc.stdout.splitlines()[1]
    assert int(count) >= 8
    assert note == "BackendConformance needs pytest"
