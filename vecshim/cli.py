"""The `vecshim` command: serve, config check, backends, embed, plugin new."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
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


def _print_report(report) -> bool:
    """Print a config check's findings to stderr; True when there is no error."""
    for line in report.lines():
        print(line, file=sys.stderr)
    return not report.errors


def cmd_serve(args) -> int:
    """Check the config (every problem at once), then run gunicorn with vecshim's defaults."""
    from .check import check_config
    from .logs import gunicorn_logconfig
    from .server import (DEFAULTS, VecshimServer, default_workers, prepare_metrics_dir,
                         read_gunicorn_config, remove_metrics_dir, use_engine, check_models)

    # A configuration error (a missing key, a typo) exits 2 here, before any worker
    # retries it forever; only transient failures (an upstream down) retry after start.
    if not _print_report(check_config(args.config)):
        return 2
    metrics_dir = prepare_metrics_dir()  # before anything imports prometheus_client
    try:
        cfg = _config(args.config)
        # Precedence: flags, then $VECSHIM_BIND, then the gunicorn config file, then vecshim's defaults.
        settings = dict(DEFAULTS, workers=default_workers(cfg, check_models(cfg, _base_dir(args.config))))
        if args.gunicorn_config:
            settings.update(read_gunicorn_config(args.gunicorn_config))
        if args.bind or os.environ.get("VECSHIM_BIND"):
            settings["bind"] = args.bind or os.environ["VECSHIM_BIND"]
        if args.workers:
            settings["workers"] = args.workers
        if args.threads:
            settings["threads"] = args.threads
        if not settings.get("logconfig_dict") and not settings.get("logconfig"):
            # The master's own lines (booting, worker exits) in the workers' format, on one stream.
            settings["logconfig_dict"] = gunicorn_logconfig(cfg.logging, cfg.secrets(), settings.get("errorlog"))
        path = os.path.abspath(args.config) if args.config else os.environ.get("VECSHIM_CONFIG")
        VecshimServer(path, settings, engine=use_engine(args.engine, settings["workers"])).run()
    finally:
        remove_metrics_dir(metrics_dir)
    return 0


def cmd_config_check(args) -> int:
    """Report every problem of a config file (schema, backends, options, keys, plugins, fallbacks)."""
    from .check import check_config

    report = check_config(args.file)
    if not _print_report(report):
        return 2
    cfg = report.config
    print(f"ok: {len(cfg.models)} model(s): {', '.join(cfg.models)}; default {cfg.default_model!r}")
    return 0


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation)
    for noise in ("typing.", "pathlib.", "pydantic.types.", "NoneType"):
        text = text.replace(noise, "None" if noise == "NoneType" else "")
    return text


def option_table(options_cls) -> dict[str, dict]:
    """name -> {type, required, default} for a backend's Options class."""
    out = {}
    for name, f in options_cls.model_fields.items():
        row = {"type": _type_name(f.annotation), "required": f.is_required()}
        if not f.is_required():
            default = f.get_default(call_default_factory=True)
            row["default"] = default if isinstance(default, (str, int, float, bool, type(None))) else str(default)
        if f.description:
            row["help"] = f.description
        out[name] = row
    return out


def cmd_backends(args) -> int:
    """List installed backends with their options (type, default), the plugin of each, and plugins."""
    from .plugins import collect_backends, get_plugin_manager, plugin_infos

    cfg = _config(args.config) if args.config else None
    pm = get_plugin_manager(dirs=cfg.plugins.dirs if cfg else (), disable=cfg.plugins.disable if cfg else (),
                            load_entrypoints=cfg.plugins.entrypoints if cfg else True,
                            base_dir=_base_dir(args.config))
    reg = collect_backends(pm)
    out = {"backends": [{"name": n, "plugin": reg.owners[n], "class": f"{c.__module__}.{c.__qualname__}",
                         "options": option_table(c.Options)} for n, c in sorted(reg.backends.items())],
           "plugins": plugin_infos(pm)}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    for b in out["backends"]:
        print(f"{b['name']}  (plugin {b['plugin']})")
        for name, o in b["options"].items():
            default = "required" if o["required"] else f"default {json.dumps(o['default'], default=str)}"
            print(f"    {name}: {o['type']}  ({default})")
    return 0


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


def _input_lines(args):
    """(lines, count or None) from the arguments, --input FILE, or stdin."""
    from .bulk import count_lines, stdin_lines

    if args.texts:
        return list(args.texts), len(args.texts)
    if args.input and args.input != "-":
        try:
            f = open(args.input, encoding="utf-8", errors="replace", newline="\n")
        except OSError as err:
            raise VecshimError(f"cannot read {args.input}: {err.strerror}") from None
        return f, count_lines(args.input)
    if sys.stdin.isatty():
        print("reading texts from the terminal, one per line; end with Ctrl-D", file=sys.stderr)
    return stdin_lines(), None


def cmd_embed(args) -> int:
    """Embed texts through the server's model and batcher; one output record per input line."""
    from tqdm import tqdm

    from . import bulk
    from .app import create_app

    to_stdout = args.output in (None, "-")
    if args.format != "jsonl" and to_stdout and sys.stdout.isatty():
        raise VecshimError(f"--format {args.format} is binary: use --output FILE or a pipe")
    lines, total = _input_lines(args)
    # Load only the model asked for: a broken or slow other model must not block it.
    app = create_app(args.config, load=False)
    state = app.extensions["vecshim"]
    if not args.verbose:  # stderr is for the progress bar and errors
        logging.getLogger("vecshim").setLevel(logging.WARNING)
    interrupted = False
    try:
        model = state.get_model(args.model)
        problem = _load(model, args.timeout)
        if problem:
            raise VecshimError(problem)
        dims = model.check_dimensions(args.dimensions) or model.dimension
        out = sys.stdout.buffer if to_stdout else open(args.output, "wb")
        writer = bulk.WRITERS[args.format](out, dims, args.input_format, args.id_field)
        records = bulk.read_records(lines, args.input_format, args.text_field, args.id_field)
        failed = blank = done = 0
        started, cpu_started = time.monotonic(), time.process_time()
        bar = tqdm(total=total, unit=" lines", file=sys.stderr, dynamic_ncols=True, smoothing=0.05,
                   disable=args.quiet or not sys.stderr.isatty())
        with bar:
            for rec, vec in bulk.embed_records(model, records, args.task, args.dimensions):
                writer.write(rec, vec)
                done += 1
                if vec is None:
                    failed += rec.text is not None
                    blank += rec.text is None
                bar.update(1)
        writer.close()
        if args.stats:
            secs = time.monotonic() - started
            print(json.dumps({"lines": done, "vectors": done - failed - blank, "seconds": round(secs, 3),
                              "lines_per_s": round(done / secs, 1) if secs else None,
                              "cpu_seconds": round(time.process_time() - cpu_started, 3)}), file=sys.stderr)
        if blank:
            print(f"note: {blank} line(s) had no text to embed (error records written)", file=sys.stderr)
        if failed:
            print(f"error: {failed} line(s) could not be embedded (error records written)", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        state.close(timeout=1.0 if interrupted else 30.0)


def cmd_plugin_new(args) -> int:
    """Scaffold an installable plugin distribution."""
    from .scaffold import create_plugin

    root = create_plugin(args.name, args.dir)
    print(f"created {root}\nnext: pip install -e '{root}[test]' && pytest {root}")
    return 0


def _sub(sub, name: str, help: str, example: str):
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the `vecshim` command; every argument has help, every command an example."""
    p = argparse.ArgumentParser(prog="vecshim", description=__doc__, epilog="example:\n  vecshim serve -c vecshim.yaml",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vecshim {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _sub(sub, "serve", "check the config, then serve the configured models with gunicorn",
             "vecshim serve --config vecshim.yaml --bind 0.0.0.0:8080")
    s.add_argument("--config", "-c", help="YAML config (default: $VECSHIM_CONFIG or the bundled model)")
    s.add_argument("--bind", "-b", help="HOST:PORT (default: $VECSHIM_BIND or 0.0.0.0:8080)")
    s.add_argument("--workers", "-w", type=int, help="HTTP workers (default 4; see docs/operations.md)")
    s.add_argument("--engine", choices=("auto", "on", "off"), default=os.environ.get("VECSHIM_ENGINE", "auto"),
                   help="run the models once in an engine process shared by all workers "
                        "(auto: when there is more than one worker; default $VECSHIM_ENGINE or auto)")
    s.add_argument("--threads", type=int, help="threads per worker (default 64)")
    s.add_argument("--gunicorn-config", help="gunicorn config file (python); overrides vecshim's defaults")
    s.set_defaults(func=cmd_serve)

    c = _sub(sub, "config", "configuration tools", "vecshim config check vecshim.yaml")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    cc = _sub(csub, "check", "report every problem of a config file in one run (exit 2 if any), "
              "without loading models", "vecshim config check deploy/vecshim.yaml")
    cc.add_argument("file", help="the YAML config file to check")
    cc.set_defaults(func=cmd_config_check)

    b = _sub(sub, "backends", "list installed backends (options with type and default) and plugins",
             "vecshim backends --config vecshim.yaml --json")
    b.add_argument("--config", "-c", help="also load the plugins this config names (plugins.dirs, disable)")
    b.add_argument("--json", action="store_true", help="print JSON instead of text")
    b.set_defaults(func=cmd_backends)

    e = _sub(sub, "embed", "embed texts through the server's model and batcher; one output record "
             "per input line (blank lines get an error record)",
             "vecshim embed -c vecshim.yaml --input docs.jsonl --input-format jsonl --text-field body "
             "--format npy -o vectors.npy")
    e.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: lines of --input or stdin)")
    e.add_argument("--input", "-i", metavar="FILE", help="read lines from FILE ('-': stdin, the default)")
    e.add_argument("--input-format", choices=("text", "jsonl"), default="text",
                   help="text: one text per line; jsonl: one JSON object per line (default: text)")
    e.add_argument("--text-field", default="text", metavar="F", help="jsonl field holding the text (default: text)")
    e.add_argument("--id-field", default="id", metavar="F",
                   help="jsonl field copied to each output record (default: id)")
    e.add_argument("--format", "-f", choices=("jsonl", "npy", "parquet"), default="jsonl",
                   help="output: jsonl (compact JSON lines, float32 numbers), npy (float32 matrix, NaN rows "
                        "for lines without a vector) or parquet (needs vecshim[parquet]); default jsonl")
    e.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: stdout)")
    e.add_argument("--config", "-c", help="YAML config (default: $VECSHIM_CONFIG or the bundled model)")
    e.add_argument("--model", "-m", help="model name (default: the default model)")
    e.add_argument("--task", choices=("query", "passage"), default="passage",
                   help="embed as queries or as passages (default: passage)")
    e.add_argument("--dimensions", type=int, help="output size for Matryoshka models (default: native)")
    e.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model to load")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar (it shows only on a terminal)")
    e.add_argument("--verbose", "-v", action="store_true", help="log model loading to stderr")
    e.add_argument("--stats", action="store_true",
                   help="at the end, print one JSON line to stderr: lines, vectors, seconds, lines_per_s, "
                        "cpu_seconds (from the first input line, model already loaded)")
    e.set_defaults(func=cmd_embed)

    pl = _sub(sub, "plugin", "tools for plugin authors", "vecshim plugin new acme-embed")
    plsub = pl.add_subparsers(dest="plugin_command", required=True, metavar="COMMAND")
    pn = _sub(plsub, "new", "scaffold an installable backend plugin (vecshim-NAME/)",
              "vecshim plugin new acme-embed --dir ~/src")
    pn.add_argument("name", help="backend name, e.g. acme-embed")
    pn.add_argument("--dir", default=".", help="folder to create vecshim-NAME/ in (default: .)")
    pn.set_defaults(func=cmd_plugin_new)
    return p


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit-time flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


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
    except BrokenPipeError:  # `vecshim backends --json | head`: the reader left; end quietly
        _quiet_stdout()
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
