"""`vecshim plugin new NAME`: write an installable plugin distribution to start from."""
from __future__ import annotations

import re
from pathlib import Path

from . import __version__
from .errors import VecshimError

__all__ = ["NAME_RE", "create_plugin", "plugin_files"]

#: Backend names the scaffold accepts: what a config's `backend:` may say.
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")

SETUP_CFG = """\
[metadata]
name = vecshim-{name}
version = 0.1.0
description = {title} embedding backend for vecshim
long_description = file: README.md
long_description_content_type = text/markdown

[options]
packages = find:
python_requires = >=3.11
install_requires =
    vecshim>={vecshim_version}
    numpy

[options.packages.find]
include = {package}

[options.extras_require]
test =
    pytest>=8

# vecshim finds the plugin through this entry point group: no config needed.
[options.entry_points]
vecshim =
    {name} = {package}

[tool:pytest]
testpaths = tests
filterwarnings =
    error
"""

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"
"""

MODULE = '''\
"""The `{name}` vecshim backend.

Replace `embed` with your model. The core batches, caches, retries,
handles long text and checks every vector, so this class only embeds.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
from pydantic import Field

from vecshim import Backend, BackendOptions, hookimpl

__all__ = ["{cls}", "{cls}Options"]

_WORD = re.compile(r"\\w+")


class {cls}Options(BackendOptions):
    """The `options:` of a model using this backend; unknown keys are rejected."""

    dimensions: int = Field(128, ge=8, le=4096)


class {cls}(Backend):
    """A working placeholder: hashed bag of words, L2-normalised."""

    name = "{name}"
    Options = {cls}Options
    normalized = True
    max_batch_size = 128
    max_input_tokens = 1024

    def load(self) -> None:
        """Load weights or open clients here (runs once per server worker)."""

    def info(self) -> dict[str, Any]:
        """Shown in /meta. Never include secrets."""
        return {{"model": "{name}-hashing", "dimensions": self.options.dimensions}}

    def fingerprint_parts(self) -> dict[str, Any]:
        """What decides the vectors: bump `version` when embed() changes."""
        return {{"model": "{name}-hashing", "version": 1, "dimensions": self.options.dimensions}}

    def embed(self, texts, task):
        """One vector per text, all the same length; raise vecshim.BackendError on failure."""
        dim = self.options.dimensions
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()) or [""]:
                digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                out[row, int.from_bytes(digest[:4], "little") % dim] += 1.0 if digest[4] & 1 else -1.0
            norm = np.linalg.norm(out[row])
            out[row] = out[row] / norm if norm else np.eye(1, dim, 0, dtype=np.float32)[0]
        return out


@hookimpl
def register_backends(register):
    """Register the `{name}` backend with vecshim."""
    register({cls})
'''

TESTS = '''\
"""Run vecshim's conformance kit against the `{name}` backend."""
from vecshim.testing import BackendConformance

from {package} import {cls}


class Test{cls}(BackendConformance):
    backend_class = {cls}
    options = {{"dimensions": 64}}
    invalid_options = ({{"dimensions": 2}}, {{"dimensions": "many"}})


def test_similar_texts_are_closer():
    backend = {cls}({cls}.Options())
    a, b, c = backend.embed(["red apples", "apples red and ripe", "tax law"], "passage")
    assert a @ b > a @ c
'''

README = """\
# vecshim-{name}

A vecshim embedding backend named `{name}`.

## Install and use

```sh
pip install -e .            # registers the `vecshim` entry point `{name}`
vecshim backends            # lists `{name}`
```

```yaml
# vecshim.yaml
models:
  {name}:
    backend: {name}
    options: {{dimensions: 128}}
```

```sh
vecshim serve --config vecshim.yaml
```

## Develop

Edit `{package}/__init__.py` (`embed()` is the only required method), then
run the conformance kit, which checks the Backend contract: stable
dimension, batch equals one-by-one, query/passage, long text, options
validation, thread safety and no secrets in `info()`:

```sh
pip install -e '.[test]'
pytest
```
"""


def plugin_files(name: str) -> dict[str, str]:
    """Relative path -> text of each file of the `vecshim-<name>` distribution."""
    if not NAME_RE.match(name):
        raise VecshimError(f"plugin name {name!r}: use lower-case letters, digits, '-' or '_' "
                          f"(starting with a letter), e.g. 'acme-embed'")
    package = "vecshim_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name)) + "Backend"
    fields = {"name": name, "package": package, "cls": cls, "vecshim_version": __version__,
              "title": name.replace("-", " ").replace("_", " ").title()}
    return {
        "setup.cfg": SETUP_CFG.format(**fields),
        "pyproject.toml": PYPROJECT,
        f"{package}/__init__.py": MODULE.format(**fields),
        "tests/test_conformance.py": TESTS.format(**fields),
        "README.md": README.format(**fields),
    }


def create_plugin(name: str, parent: str | Path = ".") -> Path:
    """Write `vecshim-<name>/` under `parent` and return its path; never overwrites."""
    files = plugin_files(name)
    root = Path(parent) / f"vecshim-{name}"
    if root.exists():
        raise VecshimError(f"{root} already exists; choose another name or --dir")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
