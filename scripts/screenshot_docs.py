#!/usr/bin/env python
"""Serve vecshim on 127.0.0.1, open /docs in headless Chromium, save a screenshot.

    python scripts/screenshot_docs.py [--out docs/openapi-docs.png] [--chromium PATH]

Chromium comes from Debian (`apt-get install -y chromium`). The page has no
external assets, so the browser runs with networking features off and a
fresh profile. `render()` is also used by tests/test_openapi.py.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def render(url: str, *, chromium: str, screenshot: Path | None = None, size: str = "1280,1900",
           timeout: float = 60) -> str:
    """Load `url` in a fresh headless profile; return the DOM after scripts ran (and save a PNG if asked)."""
    with tempfile.TemporaryDirectory(prefix="vecshim-chromium-") as profile:
        base = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout,
                             check=True).stdout
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=timeout,
                           check=True)
    return dom


def docs_app():
    """An app whose only job is to serve /docs: one placeholder model, never loaded."""
    from vecshim import Backend, hookimpl
    from vecshim.app import create_app

    class Placeholder(Backend):
        name = "docs-placeholder"

        def embed(self, texts, task):
            raise NotImplementedError("serves /docs only")

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(Placeholder)

    config = {"models": {"minilm": {"backend": "docs-placeholder"}}, "cache": {"enabled": False}}
    return create_app(config, plugins=[Plugin()], load_entrypoints=False, load=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "openapi-docs.png")
    parser.add_argument("--chromium", default=find_chromium())
    parser.add_argument("--open", default="post-/v1/embeddings", help="operation to show expanded")
    args = parser.parse_args(argv)
    if not args.chromium:
        print("chromium not found; install it with: apt-get install -y chromium", file=sys.stderr)
        return 2
    server = make_server("127.0.0.1", 0, docs_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/docs?open={args.open}"
        dom = render(url, chromium=args.chromium, screenshot=args.out.resolve())
    finally:
        server.shutdown()
        server.server_close()
    if 'class="method post"' not in dom:
        print("the page did not render its operations", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
