"""ONNX Runtime for the local backend: export, quantise, cache on disk, check against torch.

Only the transformer encoder leaves torch: sentence-transformers still
tokenizes (`preprocess`) and runs the pooling and normalisation modules, so
a model's own pooling is kept. The encoder is exported once per model
weights, runtime and library versions into a cache folder, written to a
temporary folder and renamed into place, so gunicorn workers exporting at the
same time never see a half-written model.

Why not `SentenceTransformer(..., backend="onnx")`: it loads through
`optimum.onnxruntime`, and the only release on PyPI (optimum-onnx 0.1.0)
requires transformers < 4.58 while sentence-transformers 6 requires
transformers >= 5 (it fails at import with transformers 5). The export here
is `torch.onnx.export` and the int8 file comes from ONNX Runtime's own
`quantize_dynamic`, the same dynamic quantisation sentence-transformers'
`export_dynamic_quantized_onnx_model` drives through optimum.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_light import MANIFEST, write_manifest

__all__ = ["RUNTIMES", "RUNTIME_MODULES", "CHECK_TEXTS", "EQUIVALENT_COS", "default_cache_dir",
           "OnnxEncoder", "load_encoder", "cache_key", "check_verdict"]

log = logging.getLogger("vecshim.backends.runtimes")

RUNTIMES = ("torch", "onnx", "onnx-int8")
#: Importable modules each runtime needs beyond the `local` extra.
RUNTIME_MODULES = {"torch": (), "onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx")}
#: Bump when the export itself changes, so old cache entries are not reused.
#: 2: fp32 `onnx` is traced with eager attention (see _export_fp32).
EXPORT_VERSION = 2
#: fp32 ONNX shares torch's vector space only if every check text is at least this close.
EQUIVALENT_COS = 0.9999
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: Fixed check set: short, long (past max_seq_length), punctuation, non-Latin scripts, emoji.
CHECK_TEXTS = (
    "a",
    "Hello world",
    "The London Eye is a ferris wheel on the South Bank of the River Thames.",
    "query: how do vector databases find the nearest neighbours?",
    "Weaviate stores objects and their vectors; vecshim computes the vectors.",
    "Ünïcödé & <html> \u2028 漢字 🙂",
    "Les modèles d'embedding transforment un texte en vecteur.",
    "1234567890 3.14159 2026-01-01T00:00:00Z",
    "   leading and trailing spaces   ",
    "UPPER CASE SHOUTING ABOUT SEMANTIC SEARCH",
    "def embed(texts): return model.encode(texts)",
    "Москва — столица России.",
    "short",
    " ".join(f"sentence {i} talks about topic {i % 7}." for i in range(80)),
    "A much longer passage about embeddings, vector databases and how Weaviate stores objects " * 3,
    "e-mail: someone@example.com, url: https://example.com/a?b=c",
)


def default_cache_dir() -> Path:
    """`$VECSHIM_ONNX_CACHE`, else `$XDG_CACHE_HOME/vecshim/onnx`, else `~/.cache/vecshim/onnx`."""
    if os.environ.get("VECSHIM_ONNX_CACHE"):
        return Path(os.environ["VECSHIM_ONNX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vecshim" / "onnx"


def _weights_digest(module) -> str:
    """Hash of the encoder's weights: the cache key follows the model, not its path."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(model_id: str, runtime: str, weights: str, max_seq_length: int | None) -> str:
    """Folder name of an export: model, runtime, weights digest, sequence length, versions."""
    from .onnx_light import versions

    parts = {"model": model_id, "runtime": runtime, "weights": weights, "max_seq_length": max_seq_length,
             **versions(), "v": EXPORT_VERSION}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in model_id.split("/")[-1])
    return f"{slug}-{runtime}-{digest}"


def weights_id(st_model, model_dir: Path | None) -> str:
    """A local model folder is identified by its files (no torch needed), else by its weights."""
    from .onnx_light import dir_digest

    return dir_digest(model_dir) if model_dir is not None else _weights_digest(st_model[0].auto_model)


def check_verdict(folder: Path, runtime: str, embed) -> dict[str, Any]:
    """Compare `embed(check texts)` with torch's vectors stored at export time."""
    check = json.loads((folder / "check.json").read_text())
    cos = _cosines(np.asarray(embed(check["texts"]), np.float32), np.asarray(check["torch_vectors"], np.float32))
    return {"cache": str(folder), "check_texts": len(cos), "min_cosine_vs_torch": round(float(cos.min()), 6),
            "mean_cosine_vs_torch": round(float(cos.mean()), 6),
            "torch_equivalent": runtime == "onnx" and bool(cos.min() >= EQUIVALENT_COS)}


class OnnxEncoder:
    """Runs the exported encoder in ONNX Runtime, then the model's own pooling modules."""

    def __init__(self, st_model, path: Path, threads: int):
        from .onnx_light import cpu_session

        self.session = cpu_session(path, threads, spin=True)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.post = list(st_model)[1:]

    def __call__(self, features: dict, post: list | None = None) -> np.ndarray:
        """Sentence embeddings for already tokenized `features` (`post`: other modules after the encoder)."""
        import torch

        feed = {k: features[k].numpy() for k in self.inputs}
        features["token_embeddings"] = torch.from_numpy(self.session.run(None, feed)[0])
        with torch.inference_mode():
            for module in post if post is not None else self.post:
                features = module(features)
        return features["sentence_embedding"].float().numpy()


def positional_module(model, names: list[str], output: str):
    """`model` taking its inputs `names` by position and returning its `output` field, as torch.onnx.export wants."""
    import torch

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *tensors):
            return getattr(self.m(**dict(zip(names, tensors))), output)

    return Positional().eval()


def _export_fp32(st_model, dest: Path, eager: bool = False) -> None:
    """Trace the encoder into `dest`; `eager`: with the model's eager attention.

    Traced from PyTorch's fused attention (sdpa), the graph carries mask handling
    (IsNaN/Where) ONNX Runtime cannot simplify; the eager attention's graph runs
    ~7-11% less CPU per text on MiniLM with the same vectors (bench/RESULTS.md,
    "Issue 18: backend per-text work (hb)"). The torch model goes back to its own
    attention afterwards, and the check set compares with its vectors.
    """
    import torch

    auto = st_model[0].auto_model
    own = getattr(auto.config, "_attn_implementation", None)
    switched = False
    if eager and own not in (None, "eager") and hasattr(auto, "set_attn_implementation"):
        try:
            auto.set_attn_implementation("eager")
            switched = True
        except (ValueError, ImportError, AttributeError):  # a model without eager attention
            pass
    # Two texts of different lengths, so the traced graph sees padding in the mask.
    feats = st_model.preprocess(["export sample", "a longer export sample with padding in the batch"])
    names = [k for k in _INPUTS if k in feats]
    axes = {k: {0: "batch", 1: "sequence"} for k in (*names, "last_hidden_state")}
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; the check set is the test
            torch.onnx.export(positional_module(auto, names, "last_hidden_state"), tuple(feats[k] for k in names),
                              str(dest), input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
    finally:
        if switched:
            auto.set_attn_implementation(own)


def _quantize_int8(src: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ONNX Runtime logs a "run pre-processing first" hint through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def _torch_vectors(st_model) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return st_model.encode(list(CHECK_TEXTS), batch_size=16, convert_to_numpy=True,
                               show_progress_bar=False).astype(np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _export(st_model, runtime: str, folder: Path) -> None:
    """Write model.onnx and check.json (torch's vectors for the check set) into `folder`."""
    start = time.monotonic()
    fp32 = folder / "model.onnx"
    if runtime == "onnx-int8":
        with tempfile.TemporaryDirectory() as tmp:
            _export_fp32(st_model, Path(tmp) / "fp32.onnx")
            _quantize_int8(Path(tmp) / "fp32.onnx", fp32)
    else:  # int8 keeps the sdpa trace: its quantised vectors stay what they were
        _export_fp32(st_model, fp32, eager=True)
    check = {"texts": list(CHECK_TEXTS), "torch_vectors": _torch_vectors(st_model).tolist(),
             "exported_in_s": round(time.monotonic() - start, 2)}
    write_manifest(st_model, folder)  # lets later starts skip torch (onnx_light.py)
    (folder / "check.json").write_text(json.dumps(check))


def _publish(st_model, runtime: str, cache_dir: Path, key: str) -> Path:
    """Return the cached export for `key`, exporting it first if needed (atomic rename)."""
    final = cache_dir / key
    if (final / "check.json").exists():
        return final
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    except OSError as err:  # read-only image layer: export privately, lose it at exit
        log.warning("ONNX cache %s is not writable (%s); exporting to a temporary folder, "
                    "set onnx_cache_dir to keep exports across restarts", cache_dir, err)
        tmp = Path(tempfile.mkdtemp(prefix="vecshim-onnx-"))
        _export(st_model, runtime, tmp)
        return tmp
    try:
        log.info("exporting %s to %s (first start only)", runtime, final)
        _export(st_model, runtime, tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700: an image built as root must stay readable
        try:
            os.rename(tmp, final)
        except OSError:  # another worker published the same key first: use theirs
            if not (final / "check.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_encoder(st_model, model_id: str, runtime: str, cache_dir: Path, threads: int,
                 preprocess, model_dir: Path | None = None,
                 max_seq_length: int | None = None) -> tuple[OnnxEncoder, dict[str, Any]]:
    """Load (exporting on first use) the encoder for `runtime`; return it and its check verdict.

    The verdict compares this runtime's vectors for the check set with torch's
    vectors stored at export time, on every load (a few ms), so a changed
    ONNX Runtime or CPU cannot silently move the vectors.
    """
    key = cache_key(model_id, runtime, weights_id(st_model, model_dir), max_seq_length)
    folder = _publish(st_model, runtime, cache_dir, key)
    if not (folder / MANIFEST).exists():  # an export from before manifests existed
        try:
            write_manifest(st_model, folder)
        except OSError:
            pass
    encoder = OnnxEncoder(st_model, folder / "model.onnx", threads)
    return encoder, check_verdict(folder, runtime, lambda texts: encoder(preprocess(texts)))
