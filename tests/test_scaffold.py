"""`vecshim plugin new`: the scaffold installs into a fresh venv, passes the kit and serves /vectors."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import yaml

from conftest import VENV_BIN, free_port, wait_http, stop_process
from goclient import GoClient
from vecshim.scaffold import create_plugin, plugin_files
from vecshim import VecshimError


def test_files_and_entry_point():
    files = plugin_files("acme-embed")
    assert sorted(files) == ["README.md", "pyproject.toml", "setup.cfg", "tests/test_conformance.py",
                             "vecshim_acme_embed/__init__.py"]
    assert "vecshim =\n    acme-embed = vecshim_acme_embed\n" in files["setup.cfg"]
    assert "class TestAcmeEmbedBackend(BackendConformance):" in files["tests/test_conformance.py"]


@pytest.mark.parametrize("name", ["Acme", "1abc", "a b", "a--b", "vecshim/x", ""])
def test_bad_names_are_refused(name, tmp_path):
    with pytest.raises(VecshimError, match="plugin name"):
        create_plugin(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites(tmp_path):
    create_plugin("acme", tmp_path)
    with pytest.raises(VecshimError, match="already exists"):
        create_plugin("acme", tmp_path)


@pytest.mark.slow
def test_scaffold_installs_passes_the_kit_and_serves(tmp_path):
    cli = subprocess.run([str(VENV_BIN / "vecshim"), "plugin", "new", "acme-embed", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    root = tmp_path / "vecshim-acme-embed"
    assert cli.stdout.startswith(f"created {root}\n")

    # A fresh venv that sees vecshim and its dependencies through a .pth, not by copying them.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    main_site = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib, "_main_venv.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({main_site!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VECSHIM_CONFIG", "VECSHIM_BIND", "PYTHONPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "-e", str(root)], capture_output=True, text=True, env=env, timeout=120)
    assert pip.returncode == 0, pip.stderr
    # The plugin is installed in the new venv only.
    assert not (tmp_path / "venv").samefile(sys.prefix)

    kit = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root,
                         capture_output=True, text=True, env=env, timeout=120)
    assert kit.returncode == 0, kit.stdout + kit.stderr
    assert "10 passed, 1 skipped" in kit.stdout

    config = tmp_path / "vecshim.yaml"
    config.write_text(yaml.safe_dump({"models": {"acme": {"backend": "acme-embed", "options": {"dimensions": 32}}},
                                      "cache": {"enabled": False}}))
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([py, "-m", "vecshim.cli", "serve", "--config", str(config), "--bind",
                             f"127.0.0.1:{port}", "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/.well-known/ready", 60, proc=proc)
        client = GoClient("127.0.0.1", port)
        a = client.vectors("red apples are ripe")
        b = client.vectors("ripe red apples")
        c = client.vectors("the tax code", task_type="query")
        assert (a.status, b.status, c.status) == (200, 200, 200), (a.body, b.body, c.body)
        va, vb, vc = (np.array(r.json()["vector"]) for r in (a, b, c))
        assert a.json()["dims"] == 32 and len(va) == 32
        assert va @ vb > va @ vc
        meta = client.request("GET", "/meta").json()
        assert {"name": "acme-embed", "version": "0.1.0", "hooks": ["register_backends"]} in meta["plugins"]
        client.close()
    finally:
        stop_process(proc)
        log.close()
