"""The `cross-encoder` reranker: a sentence-transformers `CrossEncoder` (hub id or folder) on CPU.

Scores are what `CrossEncoder.predict` returns, as in Weaviate's reference
container: raw logits for models whose config says so (ms-marco), sigmoid
probabilities otherwise; `activation` overrides it. The core batches pairs
grouped by token length; documents longer than the model's window follow
the reranker's `long_text` policy (best window, or the first).

`runtime: onnx` exports the classifier once with `torch.onnx.export` into
the ONNX cache folder, checks it against torch on fixed pairs, and then
runs it in ONNX Runtime (tokenizing with the model's own tokenizer).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..backend import TokenizerTextMixin, counting_tokenizer
from ..errors import BackendError, ConfigError
from ..hookspecs import hookimpl
from ..reranker import Reranker, RerankerOptions

__all__ = ["CrossEncoderReranker", "CrossEncoderOptions", "CHECK_PAIRS"]

log = logging.getLogger("vecshim.rerankers.cross_encoder")
#: ONNX scores must match torch's on these pairs within `ONNX_TOLERANCE`, or the export is refused.
CHECK_PAIRS = (
    ("which animal jumps?", "The quick brown fox jumps over the lazy dog."),
    ("capital of france", "Paris is the capital of France."),
    ("capital of france", ""),
    ("Ünïcödé 漢字", "emoji 🚀 and <html> & entities " * 20),
)
ONNX_TOLERANCE = 1e-3
_ACTIVATIONS = ("model", "identity", "sigmoid")


class CrossEncoderOptions(RerankerOptions):
    """Options of the `cross-encoder` reranker."""

    #: A Hugging Face hub id (from the local cache when offline) or a folder saved by `CrossEncoder.save`.
    model: str
    revision: str | None = None
    #: Tokens of query + document the model reads (None: the model's own limit).
    max_length: int | None = Field(None, ge=8)
    #: Pairs per forward pass.
    batch_size: int = Field(32, ge=1, le=1024)
    #: `model`: what the model's config asks for; or force raw logits / sigmoid.
    activation: Literal["model", "identity", "sigmoid"] = "model"
    runtime: Literal["torch", "onnx"] = "torch"
    #: Intra-op threads of ONNX Runtime (None: every CPU this process may use).
    threads: int | None = Field(None, ge=1)
    cache_dir: Path | None = None


class CrossEncoderReranker(TokenizerTextMixin, Reranker):
    """Scores each (query, document) pair jointly with one transformer."""

    name = "cross-encoder"
    Options = CrossEncoderOptions
    requires = ("sentence_transformers", "torch")
    extra = "local"
    in_process = True

    def __init__(self, options: CrossEncoderOptions):
        super().__init__(options)
        self.max_batch_size = options.batch_size
        self._ce: Any = None
        self._session: Any = None
        self._sigmoid = False

    def load(self) -> None:
        """Load the model (and its ONNX export), learn the window and the activation."""
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise ConfigError("reranker 'cross-encoder' needs: pip install 'vecshim[local]'") from None
        opts = self.options
        try:
            self._ce = CrossEncoder(opts.model, device="cpu", max_length=opts.max_length, revision=opts.revision)
        except (OSError, ValueError) as err:
            raise ConfigError(f"reranker 'cross-encoder' cannot load {opts.model!r}: {err}") from None
        labels = getattr(self._ce.config, "num_labels", 1)
        if labels != 1:
            raise ConfigError(f"reranker 'cross-encoder': {opts.model!r} has {labels} labels; a reranker "
                              f"needs a model with one relevance logit")
        if opts.activation == "model":
            self._sigmoid = type(self._ce.activation_fn).__name__ == "Sigmoid"
        else:
            self._sigmoid = opts.activation == "sigmoid"
        self.score_range = (0.0, 1.0) if self._sigmoid else (None, None)
        tok = self._ce.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            self._counter = counting_tokenizer(backend)
        self.max_input_tokens = int(self._ce.max_seq_length) - tok.num_special_tokens_to_add(pair=True)
        if opts.runtime == "onnx":
            self._session = self._load_onnx()

    def info(self) -> dict[str, Any]:
        """Model id, runtime, window and activation."""
        return {"model": self.options.model, "revision": self.options.revision, "runtime": self.options.runtime,
                "max_length": int(self._ce.max_seq_length) if self._ce is not None else self.options.max_length,
                "activation": "sigmoid" if self._sigmoid else "identity"}

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        """One forward pass per `batch_size` pairs."""
        if self._ce is None:
            raise BackendError("reranker 'cross-encoder' is not loaded")
        pairs = [(query, d) for d in documents]
        if self._session is not None:
            logits = np.concatenate([self._onnx_logits(pairs[i:i + self.options.batch_size])
                                     for i in range(0, len(pairs), self.options.batch_size)])
        else:
            logits = self._torch_logits(pairs)
        return 1.0 / (1.0 + np.exp(-logits)) if self._sigmoid else logits

    def close(self) -> None:
        """Drop the model and the ONNX session."""
        self._ce = self._session = None

    # -- runtimes -------------------------------------------------------
    def _torch_logits(self, pairs) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self._ce.predict(pairs, batch_size=self.options.batch_size, activation_fn=torch.nn.Identity(),
                                   convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def _features(self, pairs, tensors: str):
        return self._ce.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True,
                                  truncation="longest_first", max_length=self._ce.max_seq_length,
                                  return_tensors=tensors)

    def _onnx_logits(self, pairs) -> np.ndarray:
        feats = self._features(pairs, "np")
        feed = {i.name: feats[i.name].astype(np.int64) for i in self._session.get_inputs()}
        return self._session.run(None, feed)[0].astype(np.float64).reshape(-1)

    def _load_onnx(self):
        from ..backends.onnx_light import cpu_session
        from ..backends.runtimes import default_cache_dir
        from ..cpus import available_cpus

        digest = hashlib.blake2b(digest_size=12)
        for name, tensor in sorted(self._ce.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes()[:4096])
        folder = (self.options.cache_dir or default_cache_dir()) / f"cross-{digest.hexdigest()}-{self._ce.max_seq_length}"
        path = folder / "model.onnx"
        if not path.exists():
            self._export(folder)
        session = cpu_session(path, self.options.threads or available_cpus())
        self._session = session
        got = self._onnx_logits(list(CHECK_PAIRS))
        want = self._torch_logits(list(CHECK_PAIRS))
        if not np.allclose(got, want, atol=ONNX_TOLERANCE, rtol=0):
            raise ConfigError(f"reranker 'cross-encoder': the ONNX export of {self.options.model!r} differs from "
                              f"torch by {np.abs(got - want).max():.3g} on the check pairs; use runtime: torch")
        return session

    def _export(self, folder: Path) -> None:
        import torch

        from ..backends.runtimes import positional_module

        feats = self._features([CHECK_PAIRS[0], CHECK_PAIRS[3]], "pt")
        names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in feats]
        classifier = positional_module(self._ce.model.eval(), names, "logits")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
        axes = {k: {0: "batch", 1: "sequence"} for k in names} | {"logits": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(classifier, tuple(feats[k] for k in names), str(tmp / "model.onnx"),
                              input_names=names, output_names=["logits"], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
        try:
            os.rename(tmp, folder)  # atomic: a concurrent worker's export wins or ours does
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("another process exported %s first", folder)


@hookimpl
def register_rerankers(register):
    """Register the `cross-encoder` reranker."""
    register(CrossEncoderReranker)
