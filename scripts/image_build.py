"""The container image's build steps, run by the Dockerfile and by tests/test_deploy.py.

    python image_build.py deps      torch (CPU) and every dependency of VECSHIM_EXTRAS,
                                    pinned by requirements.lock; not vecshim itself
    python image_build.py export    the ONNX exports named in ONNX_EXPORT, into VECSHIM_ONNX_CACHE
    python image_build.py check     the installed vecshim serves the bundled model offline
                                    without exporting anything at start

Settings come from the environment (the Dockerfile's build args): VECSHIM_EXTRAS,
ONNX_EXPORT ("RUNTIME[:MAX_SEQ_LENGTH] ..."), TORCH_VERSION, TORCH_INDEX_URL.
`deps` reads setup.cfg and requirements.lock from the working directory.
"""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: Extras that pull torch (the `local` extra), which must come from the CPU index first.
TORCH_EXTRAS = {"local", "onnx", "all"}
ONNX_EXTRAS = {"onnx", "all"}


def extras() -> list[str]:
    return [e.strip() for e in os.environ.get("VECSHIM_EXTRAS", "").split(",") if e.strip()]


def requirements(setup_cfg: Path, wanted: list[str]) -> list[str]:
    """install_requires plus the requirements of each wanted extra, as setup.cfg lists them."""
    cfg = configparser.ConfigParser()  # basic interpolation resolves %(local)s
    cfg.read(setup_cfg, encoding="utf-8")
    known = cfg["options.extras_require"]
    unknown = [e for e in wanted if e not in known]
    if unknown:
        sys.exit(f"VECSHIM_EXTRAS: unknown extra(s) {', '.join(unknown)}; setup.cfg has {', '.join(known)}")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in wanted:
        lines += known[extra].splitlines()
    out: list[str] = []
    for line in (ln.strip() for ln in lines):
        if line and not line.startswith("#") and line not in out:
            out.append(line)
    return out


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True)


def deps() -> None:
    wanted = extras()
    reqs = requirements(Path("setup.cfg"), wanted)
    if TORCH_EXTRAS & set(wanted):
        index = os.environ.get("TORCH_INDEX_URL", "")
        pip(f"torch=={os.environ['TORCH_VERSION']}", *(["--index-url", index] if index else []))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(reqs) + "\n")
    try:
        pip("-c", "requirements.lock", "-r", f.name)
    finally:
        os.unlink(f.name)


def exports() -> list[tuple[str, int | None]]:
    """(runtime, max_seq_length) pairs named in ONNX_EXPORT."""
    out = []
    for entry in os.environ.get("ONNX_EXPORT", "").split():
        runtime, _, seq = entry.partition(":")
        out.append((runtime, int(seq) if seq else None))
    return out


def export() -> None:
    wanted = exports()
    if wanted and not ONNX_EXTRAS & set(extras()):
        sys.exit(f"ONNX_EXPORT={os.environ['ONNX_EXPORT']!r} needs the onnx extra in VECSHIM_EXTRAS")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vecshim.backends.local import SentenceTransformersBackend as Local

    for runtime, seq in wanted:
        opts = {"runtime": runtime, "threads": 1, **({"max_seq_length": seq} if seq else {})}
        backend = Local(Local.Options(**opts))
        backend.concurrency = 1
        backend.load()
        backend.close()
    cache = Path(os.environ["VECSHIM_ONNX_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    for folder in sorted(cache.iterdir()):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"export {folder.name}: {size / 1e6:.1f} MB")


def check() -> None:
    cache = Path(os.environ["VECSHIM_ONNX_CACHE"])
    before = set(os.listdir(cache)) if cache.is_dir() else set()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    vecshim = str(Path(sys.executable).with_name("vecshim"))
    if TORCH_EXTRAS & set(extras()):
        subprocess.run([vecshim, "embed", "--quiet", "build check"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    else:
        subprocess.run([vecshim, "backends"], check=True, env=env)
    added = set(os.listdir(cache)) - before if cache.is_dir() else set()
    if added:
        sys.exit(f"the default model exported {sorted(added)} at start: add its runtime to ONNX_EXPORT")


def main(argv: list[str]) -> None:
    steps = {"deps": deps, "export": export, "check": check}
    if len(argv) != 1 or argv[0] not in steps:
        sys.exit(f"usage: image_build.py {{{','.join(steps)}}}")
    steps[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
