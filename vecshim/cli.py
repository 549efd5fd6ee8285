"""The `vecshim` command: serve, config check, backends, embed, plugin new."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import ConfigError, VecshimError

__all__ = ["main"]


def _config(path: str | None):
    from .config import load_config
    return load_config(path)


def _base_dir(path: str | None) -> Path | None:
    """The folder relative `plugins.dirs` resolve against: the config file's."""
    path = path or os.environ.get("VECSHIM_CONFIG")
    return Path(path).resolve().parent if path else None


def cmd_serve(args) -> int:
    """Validate the config, then run gunicorn with vecshim's defaults."""
    from .server import (DEFAULTS, VecshimServer, check_models, default_workers, prepare_metrics_dir,
                         read_gunicorn_config, remove_metrics_dir, use_engine)

    metrics_dir = prepare_metrics_dir()  # before anything imports prometheus_client
    try:
        cfg = _config(args.config)
        # Precedence: flags, then $VECSHIM_BIND, then the gunicorn config file, then vecshim's defaults.
        registry = check_models(cfg, _base_dir(args.config))
        settings = dict(DEFAULTS, workers=default_workers(cfg, registry))
        if args.gunicorn_config:
            settings.update(read_gunicorn_config(args.gunicorn_config))
        if args.bind or os.environ.get("VECSHIM_BIND"):
            settings["bind"] = args.bind or os.environ["VECSHIM_BIND"]
        if args.workers:
            settings["workers"] = args.workers
        if args.threads:
            settings["threads"] = args.threads
        path = os.path.abspath(args.config) if args.config else os.environ.get("VECSHIM_CONFIG")
        VecshimServer(path, settings, engine=use_engine(args.engine, settings["workers"])).run()
    finally:
        remove_metrics_dir(metrics_dir)
    return 0


def cmd_config_check(args) -> int:
    """Validate a config file, its backends and their options, without loading models."""
    from .server import check_models

    cfg = _config(args.file)
    check_models(cfg, _base_dir(args.file))
    print(f"ok: {len(cfg.models)} model(s): {', '.join(cfg.models)}; default {cfg.default_model!r}")
    return 0


def cmd_backends(args) -> int:
    """List installed backends, the plugin that registers each, and plugins."""
    from .plugins import collect_backends, get_plugin_manager, plugin_infos

    cfg = _config(args.config) if args.config else None
    pm = get_plugin_manager(dirs=cfg.plugins.dirs if cfg else (), disable=cfg.plugins.disable if cfg else (),
                            load_entrypoints=cfg.plugins.entrypoints if cfg else True,
                            base_dir=_base_dir(args.config))
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


def _load(model, timeout: float) -> str | None:
    """Load one model within `timeout` seconds; return why it failed, or None."""
    failed: list[Exception] = []

    def run():
        try:
            model.load()
        except Exception as err:
            failed.append(err)

    loader = threading.Thread(target=run, name="vecshim-loader", daemon=True)
    loader.start()
    loader.join(timeout)
    if loader.is_alive():
        return f"model {model.name!r} did not load within {timeout:g} s"
    if failed:
        err = failed[0]
        msg = err.message if isinstance(err, VecshimError) else str(err)
        return f"model {model.name!r} failed to load: {type(err).__name__}: {msg}"
    return None


def cmd_embed(args) -> int:
    """Embed texts (arguments, or stdin lines) and print JSON lines."""
    from .app import create_app

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in texts if t]
    # Load only the model asked for: a broken or slow other model must not block it.
    app = create_app(args.config, load=False)
    state = app.extensions["vecshim"]
    if not args.verbose:  # stderr is for the progress bar and errors
        logging.getLogger("vecshim").setLevel(logging.WARNING)
    show = sys.stderr.isatty() and len(texts) > 100 and not args.quiet
    step = 256
    try:
        model = state.get_model(args.model)
        problem = _load(model, args.timeout)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
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


def cmd_plugin_new(args) -> int:
    """Scaffold an installable plugin distribution."""
    from .scaffold import create_plugin

    root = create_plugin(args.name, args.dir)
    print(f"created {root}\nnext: pip install -e '{root}[test]' && pytest {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the `vecshim` command."""
    p = argparse.ArgumentParser(prog="vecshim", description=__doc__)
    p.add_argument("--version", action="version", version=f"vecshim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the configured models with gunicorn")
    s.add_argument("--config", "-c", help="YAML config (default: $VECSHIM_CONFIG or the bundled model)")
    s.add_argument("--bind", "-b", help="HOST:PORT (default: $VECSHIM_BIND or 0.0.0.0:8080)")
    s.add_argument("--workers", "-w", type=int, help="HTTP workers (default 4; see docs/operations.md)")
    s.add_argument("--engine", choices=("auto", "on", "off"), default=os.environ.get("VECSHIM_ENGINE", "auto"),
                   help="run the models once in an engine process shared by all workers "
                        "(auto: when there is more than one worker; default $VECSHIM_ENGINE or auto)")
    s.add_argument("--threads", type=int, help="threads per worker (default 64)")
    s.add_argument("--gunicorn-config", help="gunicorn config file (python); overrides vecshim's defaults")
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
    e.add_argument("--verbose", "-v", action="store_true", help="log model loading to stderr")
    e.set_defaults(func=cmd_embed)

    pl = sub.add_parser("plugin", help="tools for plugin authors")
    plsub = pl.add_subparsers(dest="plugin_command", required=True)
    pn = plsub.add_parser("new", help="scaffold an installable backend plugin (vecshim-NAME/)")
    pn.add_argument("name", help="backend name, e.g. acme-embed")
    pn.add_argument("--dir", default=".", help="folder to create vecshim-NAME/ in (default: .)")
    pn.set_defaults(func=cmd_plugin_new)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error:\n{err.message}", file=sys.stderr)
        return 2
    except VecshimError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
