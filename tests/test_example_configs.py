"""Every example in config/ validates: keys, backends and backend options."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from vecshim.config import load_config
from vecshim.server import check_models

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "config").glob("*.yaml"))


def test_the_examples_named_in_the_design_exist():
    assert {p.stem for p in CONFIGS} >= {"default", "openai", "cohere", "multi-model", "custom"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path, monkeypatch):
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text()))
    for name in required:  # variables with no default must be given by the operator
        monkeypatch.setenv(name, "https://example.invalid" if "ENDPOINT" in name else "dummy-value")
    cfg = load_config(path)
    assert cfg.default_model in cfg.models
    check_models(cfg, path.parent)  # resolves plugins and validates every backend's options
