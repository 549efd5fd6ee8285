"""The `vecshim` command: serve, config check, backends, embed."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import ConfigError

__all__ = ["main"]


def _config(path: str | None):
    from .config import load_config
    return load_config(path)


def cmd_serve(args) -> int:
    """Validate the config, then run gunicorn with vecshim's defaults."""
    from .server import DEFAULTS, VecshimServer, default_workers

    cfg = _config(args.config)
    workers = args.workers or default_workers(cfg)
    settings = dict(DEFAULTS, bind=args.bind, workers=workers)
    if args.threads:
        settings["threads"] = args.threads
    if args.gunicorn_config:
        settings["config"] = args.gunicorn_config
    path = os.path.abspath(args.config) if args.config else os.environ.get("VECSHIM_CONFIG")
    VecshimServer(path, settings).run()
    return 0


def cmd_config_check(args) -> int:
    """Validate a config file, its backends and their options, without loading models."""
    from .server import default_workers

    cfg = _config(args.file)
    default_workers(cfg)
    print(f"ok: {len(cfg.models)} model(s): {', '.join(cfg.models)}; default {cfg.default_model!r}")
    return 0


def cmd_backends(args) -> int:
    """List installed backends, the plugin that registers each, and plugins."""
    from .plugins import collect_backends, get_plugin_manager, plugin_infos

    cfg = _config(args.config) if args.config else None
    pm = get_plugin_manager(dirs=cfg.plugins.dirs if cfg else (), disable=cfg.plugins.disable if cfg else ())
    reg = collect_backends(pm)
    out = {"backends": [{"name": n, "plugin": reg.owners[n], "class": f"{c.__module__}.{c.__qualname__}",
                         "options": sorted(c.Options.model_fields)} for n, c in sorted(reg.backends.items())],
           "plugins": plugin_infos(pm)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for b in out["backends"]:
            print(f"{b['name']:24} {b['plugin']}  options: {', '.join(b['options'])}")
    return 0


def _progress(done: int, total: int) -> None:
    width = 30
    fill = int(width * done / total) if total else width
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
    sys.stderr.flush()


def cmd_embed(args) -> int:
    """Embed texts (arguments, or stdin lines) and print JSON lines."""
    from .app import create_app

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in texts if t]
    app = create_app(args.config)
    state = app.extensions["vecshim"]
    model = state.get_model(args.model)
    if not state.wait_ready(args.timeout):
        print(f"error: {state.not_ready_reason()}", file=sys.stderr)
        return 1
    show = sys.stderr.isatty() and len(texts) > 100 and not args.quiet
    step = 256
    try:
        for start in range(0, len(texts), step):
            chunk = texts[start:start + step]
            for text, vec in zip(chunk, model.embed(chunk, args.task, args.dimensions)):
                sys.stdout.write(json.dumps({"text": text, "vector": vec.tolist()}) + "\n")
            if show:
                _progress(min(start + step, len(texts)), len(texts))
    finally:
        if show:
            sys.stderr.write("\n")
        state.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the `vecshim` command."""
    p = argparse.ArgumentParser(prog="vecshim", description=__doc__)
    p.add_argument("--version", action="version", version=f"vecshim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the configured models with gunicorn")
    s.add_argument("--config", "-c", help="YAML config (default: $VECSHIM_CONFIG or the bundled model)")
    s.add_argument("--bind", "-b", default=os.environ.get("VECSHIM_BIND", "0.0.0.0:8080"), help="HOST:PORT")
    s.add_argument("--workers", "-w", type=int, help="gunicorn workers (default: 1 for local models, else 2)")
    s.add_argument("--threads", type=int, help="threads per worker (default 64)")
    s.add_argument("--gunicorn-config", help="extra gunicorn config file (python)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config file without serving")
    cc.add_argument("file")
    cc.set_defaults(func=cmd_config_check)

    b = sub.add_parser("backends", help="list installed backends and plugins")
    b.add_argument("--config", "-c")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_backends)

    e = sub.add_parser("embed", help="embed texts from arguments or stdin lines, print JSON lines")
    e.add_argument("texts", nargs="*")
    e.add_argument("--config", "-c")
    e.add_argument("--model", "-m", help="model name (default: the default model)")
    e.add_argument("--task", choices=("query", "passage"), default="passage")
    e.add_argument("--dimensions", type=int)
    e.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model to load")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_embed)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error:\n{err.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
