"""The shipped deployments, run as far as this machine allows without a container engine.

- The image's build steps (scripts/image_build.py, as the Dockerfile calls them,
  with docker-compose.yml's build args) in a fresh venv: dependencies from the
  lock, the ONNX export from only the modules the export layer copies, the
  wheel, and the check that nothing is exported at start.
- The Kubernetes ConfigMap's and the compose config, served by a real
  `vecshim serve` offline with no secrets set, reach ready.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import vecshim_serve
from test_deploy import (COMPOSE, COMPOSE_CONFIG, DOCKERFILE, Dockerfile, effective_build_args, exported,
                         k8s, local_exports_needed, parse_quantity, shipped_hosted_configs, split_flags,
                         vecshim_container, vecshim_deployment)

ROOT = Path(__file__).resolve().parent.parent
#: Variables a secret would set; the tests run with none of them.
SECRET_ENV = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "CO_API_KEY", "COHERE_API_KEY")


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


# ------------------------------------------------------------ image build ----

def run_steps(df: Dockerfile) -> list[tuple[str, str, dict[str, str]]]:
    """(stage, step, inline env) of each `image_build.py STEP` in the Dockerfile's RUNs."""
    steps = []
    for stage in df.stages:
        for run in df.all("RUN", stage):
            for segment in run.split("&&"):
                words = shlex.split(segment.strip())
                at = [i for i, w in enumerate(words[1:], 1) if w.endswith("image_build.py") and words[i - 1] == "python"]
                if not at:
                    continue
                env = dict(w.split("=", 1) for w in words[:at[0]] if re.fullmatch(r"[A-Z_]+=\S*", w))
                steps.append((stage["name"], words[at[0] + 1], env))
    return steps


def copies(stage: dict, df: Dockerfile) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context in a stage."""
    out = []
    for args in df.all("COPY", stage):
        flags, rest = split_flags(args)
        if "from" not in flags:
            *srcs, dest = rest.split()
            out.append((srcs, dest))
    return out


def place(srcs: list[str], dest: str, root: Path, workdir: Path) -> None:
    """Do a COPY into a directory tree standing for the image's filesystem."""
    target = root / dest.lstrip("/") if dest.startswith("/") else workdir / dest
    for src in srcs:
        path = ROOT / src
        into = target / path.name if dest.endswith("/") or len(srcs) > 1 else target
        into.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, into)


@pytest.mark.slow
def test_image_build_steps_run_in_a_fresh_venv_with_the_compose_build_args(tmp_path):
    df = Dockerfile(DOCKERFILE)
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    args = effective_build_args(df, compose)
    steps = run_steps(df)
    assert [(s, step) for s, step, _ in steps] == [("deps", "deps"), ("onnx", "export"), ("runtime", "check")]

    image = tmp_path / "image"          # stands for the image's root filesystem
    venv = image / "opt" / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    cache = image / "opt" / "vecshim" / "onnx"
    # The build args, as Docker passes them to RUN. torch comes from this machine's
    # configured index, not the CPU index URL (no internet here but package registries).
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and not k.startswith("VECSHIM_")}
    env.update(VECSHIM_EXTRAS=args["VECSHIM_EXTRAS"], ONNX_EXPORT=args["ONNX_EXPORT"],
               TORCH_VERSION=args["TORCH_VERSION"], TORCH_INDEX_URL="", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), VECSHIM_ONNX_CACHE=str(cache), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_NO_CACHE_DIR", None)  # the pip cache keeps this bounded
    # Same files as the image, minus the bytecode pip would compile. "0" is not a typo:
    # pip reads a PIP_NO_* variable as the value of the positive option (compile=False).
    env["PIP_NO_COMPILE"] = "0"

    def step(stage_name: str, name: str, cwd: Path, extra: dict[str, str] | None = None, timeout: float = 1200):
        stage = next(s for s in df.stages if s["name"] == stage_name)
        for srcs, dest in copies(stage, df):
            place(srcs, dest, image, cwd)
        inline = {k: str(image / v.lstrip("/")) if v.startswith("/") else v
                  for k, v in next(e for s, n, e in steps if (s, n) == (stage_name, name)).items()}
        out = subprocess.run([str(py), str(cwd / "image_build.py"), name], cwd=cwd, env={**env, **inline, **(extra or {})},
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{name}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    build = image / "build"
    build.mkdir(parents=True)
    step("deps", "deps", build)
    # the lock is honoured: each installed distribution the lock names has the locked version
    lock = dict(ln.split("==") for ln in (ROOT / "requirements.lock").read_text().splitlines()
                if "==" in ln and not ln.startswith("#"))
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    installed = dict(ln.split("==") for ln in freeze.splitlines() if "==" in ln)
    norm = lambda n: n.lower().replace("_", "-")  # noqa: E731
    locked = {norm(k): v for k, v in lock.items()}
    drift = {k: (v, locked[norm(k)]) for k, v in installed.items()
             if norm(k) in locked and v.split("+")[0] != locked[norm(k)]}
    assert not drift, drift
    assert "vecshim" not in {norm(k) for k in installed}, "the deps layer must not install vecshim"
    assert list(venv.glob("lib/python3*/site-packages/torch/__init__.py"))

    # The ONNX export and the wheel build need only the deps layer: build the wheel meanwhile,
    # as Docker builds independent stages side by side.
    src = tmp_path / "src"
    for srcs, dest in copies(next(s for s in df.stages if s["name"] == "wheel"), df):
        place(srcs, dest, image, src)
    wheels = tmp_path / "wheels"
    wheel_build = subprocess.Popen([str(py), "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), "."],
                                   cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        export = step("onnx", "export", build)
        wheel_log = wheel_build.communicate(timeout=600)[0]
    finally:
        if wheel_build.poll() is None:
            wheel_build.kill()
            wheel_build.wait()
    assert wheel_build.returncode == 0, wheel_log[-3000:]
    sizes = {m.group(1): float(m.group(2)) for m in re.finditer(r"export (\S+): ([\d.]+) MB", export.stdout)}
    assert len(sizes) == len(exported(args["ONNX_EXPORT"])), export.stdout
    # the emptyDir a pod exports into when a runtime was left out of the build holds
    # the bundled model's export with room for int8 scratch
    volumes = vecshim_deployment()["spec"]["template"]["spec"]["volumes"]
    tmp_limit = parse_quantity(next(v for v in volumes if v["name"] == "tmp")["emptyDir"]["sizeLimit"])
    assert tmp_limit >= 2 * max(sizes.values()) * 1e6, (sizes, tmp_limit)

    # the wheel's install without dependencies, as the runtime stage does
    (wheel,) = wheels.glob("vecshim-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   env=env, check=True, timeout=600, capture_output=True)
    before = sorted(os.listdir(cache))
    step("runtime", "check", build)
    assert sorted(os.listdir(cache)) == before

    # compose's config loads both its models from the build's exports, exporting nothing
    out = subprocess.run([str(venv / "bin" / "vecshim"), "embed", "--quiet", "--config", str(COMPOSE_CONFIG),
                          "--model", "minilm-128", "probe"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(cache)) == before


# ---------------------------------------------------------- served configs ----

def configmap_text() -> str:
    return k8s("ConfigMap", "vecshim-config")["data"]["config.yaml"]


SERVED = {
    "kubernetes-as-shipped": configmap_text,
    "kubernetes-with-hosted-model": lambda: dict(shipped_hosted_configs())["kubernetes"],
    "compose-with-hosted-model": lambda: dict(shipped_hosted_configs())["compose"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVED))
def test_shipped_config_serves_offline_with_no_secrets(name, tmp_path, monkeypatch):
    for var in SECRET_ENV:
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(SERVED[name](), encoding="utf-8")
    # the container's env from the Deployment, secrets left out (the optional Secret is absent)
    c = vecshim_container()
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert env.pop("HF_HUB_OFFLINE") == "1"  # vecshim_serve sets it
    env["VECSHIM_CONFIG"] = str(path)
    with vecshim_serve(env=env, ready_timeout=300, log_path=tmp_path / "serve.log") as (_, port):
        base = f"http://127.0.0.1:{port}"
        meta = json.loads(http("GET", f"{base}/meta")[2])
        status, _, body = http("POST", f"{base}/vectors", {"text": "a shipped config"})
        assert status == 200 and len(json.loads(body)["vector"]) == 384
        for model, info in meta["models"].items():
            if info["backend"] == "openai":
                assert info["state"] == "unavailable" and info["required"] is False
                assert "OPENAI_API_KEY" in info["error"]
                status, headers, body = http("POST", f"{base}/models/{model}/vectors", {"text": "x"})
                assert status == 503 and headers["Content-Type"].startswith("application/json")
                assert "OPENAI_API_KEY" in json.loads(body)["error"]
            else:
                assert info["state"] == "ready", (model, info)
        assert ("hosted" in name) == any(i["backend"] == "openai" for i in meta["models"].values())
