"""Torch-free loading of a cached ONNX export: `tokenizers` + ONNX Runtime + numpy pooling.

The first start exports through torch and sentence-transformers
(`runtimes.py`) and writes `manifest.json` next to the export: everything the
model's sentence-transformers pipeline does around the encoder (lower-casing,
sequence length, prompts, pooling, normalisation). Later starts load only the
export and that manifest, skipping ~3.5 s of importing torch, transformers and
sentence-transformers. The check set still runs on every load, so any
difference to torch's vectors shows in the verdict and the fingerprint.

Only pipelines of Transformer -> Pooling (mean or CLS) [-> Normalize] get a
manifest; any other model keeps the full sentence-transformers path.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MANIFEST", "dir_digest", "write_manifest", "LightModel", "TokenStore", "pipeline_pooling"]

MANIFEST = "manifest.json"
#: Bounds of the count-to-encode store: about what a batcher queue holds (4,096 texts,
#: 4 x 16,384 tokens), so texts waiting to be encoded stay in it and a flood of texts
#: that are counted but never encoded (413s, probes of long texts) cannot grow it.
STORE_TEXTS = 4096
STORE_TOKENS = 131_072


def dir_digest(folder: Path) -> str:
    """Content hash of every file of a local model folder (its identity for the cache)."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
        h.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions that can change an export, read without importing the packages."""
    out = {}
    for dist in ("torch", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def pipeline_pooling(st_model) -> str | None:
    """`mean` or `cls` if the model is Transformer -> Pooling [-> Normalize], else None.

    Only then is pooling a separate step over token embeddings that another
    strategy may replace.
    """
    modules = list(st_model)
    names = [type(m).__name__ for m in modules]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    pooling = modules[1]
    mode = getattr(pooling, "pooling_mode", None) or (
        "mean" if getattr(pooling, "pooling_mode_mean_tokens", False) else
        "cls" if getattr(pooling, "pooling_mode_cls_token", False) else None)
    return mode if mode in ("mean", "cls") else None


def write_manifest(st_model, folder: Path) -> bool:
    """Describe the pipeline around the encoder into `folder`; False if it is not supported."""
    modules = list(st_model)
    names = [type(m).__name__ for m in modules]
    mode = pipeline_pooling(st_model)
    if mode is None:
        return False
    tok = st_model.tokenizer
    manifest = {
        "max_seq_length": st_model.max_seq_length,
        "do_lower_case": bool(getattr(modules[0], "do_lower_case", False)),
        "special_tokens": tok.num_special_tokens_to_add(pair=False),
        "pooling": mode,
        "normalize": names[-1] == "Normalize",
        "prompts": dict(st_model.prompts),
        "pad_id": tok.pad_token_id or 0,
        "pad_token": tok.pad_token or "[PAD]",
    }
    tmp = folder / f".{MANIFEST}.{os.getpid()}"
    (folder / "tokenizer.json.tmp").write_text(tok.backend_tokenizer.to_str())
    os.replace(folder / "tokenizer.json.tmp", folder / "tokenizer.json")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, folder / MANIFEST)
    return True


def cpu_session(path: Path, threads: int, spin: bool = True, stop_spin: bool = True):
    """An ONNX Runtime CPU session: `threads` intra-op threads, one inter-op, every graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")  # "1": ORT's default
    if spin and stop_spin and threads > 1:
        # Spin between the operators of a run (no futex wake-up per operator), but stop when
        # run() returns: ORT's default keeps spinning after it, on cores a batch may need.
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class TokenStore:
    """The count step's encodings, by text, for the encoder to reuse (LRU, bounded).

    Tokenizing is deterministic, so an encoding found under the exact text it was
    computed from is the encoding the encoder would compute again.
    """

    def __init__(self, max_texts: int = STORE_TEXTS, max_tokens: int = STORE_TOKENS):
        self.max_texts, self.max_tokens = max_texts, max_tokens
        self._items: OrderedDict[str, Any] = OrderedDict()
        self.tokens = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, texts: list[str], encodings: list) -> None:
        with self._lock:
            for text, enc in zip(texts, encodings):
                n = len(enc.ids)
                if n > self.max_tokens:
                    continue
                old = self._items.pop(text, None)
                if old is not None:
                    self.tokens -= len(old.ids)
                self._items[text] = enc
                self.tokens += n
            while self._items and (len(self._items) > self.max_texts or self.tokens > self.max_tokens):
                self.tokens -= len(self._items.popitem(last=False)[1].ids)

    def take(self, text: str):
        """The stored encoding of `text` (removed from the store), or None."""
        with self._lock:
            enc = self._items.pop(text, None)
            if enc is None:
                self.misses += 1
                return None
            self.tokens -= len(enc.ids)
            self.hits += 1
            return enc


class LightModel:
    """The sentence-transformers pipeline rebuilt from a manifest, without torch."""

    def __init__(self, folder: Path, threads: int, max_seq_length: int | None = None,
                 solo_threads: int | None = None, solo_spin: bool = True):
        from tokenizers import Tokenizer

        m = json.loads((folder / MANIFEST).read_text())
        self.manifest = m
        self.max_seq_length = max_seq_length or m["max_seq_length"]
        self.prompts: dict[str, str] = m["prompts"]
        self.normalize = m["normalize"]
        self.counter = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.counter.no_truncation()
        self.counter.no_padding()
        # Configured once and never changed, so encoder threads may share it. It only
        # truncates and adds special tokens to the counter's encodings (post_process), as
        # its encode() would; encode() pads the batch itself (right, pad_id, type 0).
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.tokenizer.no_padding()
        self.store = TokenStore()
        self.session = cpu_session(folder / "model.onnx", threads)
        # A text that arrives alone gets every core: a second session with more intra-op
        # threads, spinning only while it runs (so it steals nothing from a batch after it).
        # It costs one more copy of the weights, once per engine (bench/RESULTS.md "Issue 18").
        # Built by the first lone text (the warm-up), in that thread: built in another thread,
        # ONNX Runtime aborts the process at interpreter exit.
        self.solo = None
        self._solo_plan = ((folder / "model.onnx", solo_threads, solo_spin)
                           if solo_threads and solo_threads > threads else None)
        self._running = 0
        self._lock = threading.Lock()
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _load_solo(self, path: Path, threads: int, spin: bool) -> None:
        self.solo = cpu_session(path, threads, spin=spin)

    @property
    def max_input_tokens(self) -> int:
        """Tokens of text per window, special tokens excluded."""
        return self.max_seq_length - self.manifest["special_tokens"]

    def count(self, texts: list[str]) -> list[int]:
        """Token counts (no special tokens); the encodings wait in `store` for encode()."""
        texts = list(texts)
        enc = self.counter.encode_batch(texts, add_special_tokens=False)
        self.store.put(texts, enc)
        return [len(e.ids) for e in enc]

    def features(self, texts: list[str], reuse: bool = True) -> dict[str, np.ndarray]:
        """The encoder's inputs: counted encodings (or new ones), truncated, with special tokens, padded."""
        enc = [self.store.take(t) for t in texts] if reuse else [None] * len(texts)
        missing = [i for i, e in enumerate(enc) if e is None]
        if missing:
            fresh = self.counter.encode_batch([texts[i] for i in missing], add_special_tokens=False)
            for i, e in zip(missing, fresh):
                enc[i] = e
        enc = [self.tokenizer.post_process(e) for e in enc]
        shape = (len(enc), max(len(e.ids) for e in enc))
        ids = np.full(shape, self.manifest["pad_id"], dtype=np.int64)
        mask, types = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
        for row, e in enumerate(enc):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def encode(self, texts: list[str], prompt: str | None = None, pooling: str | None = None) -> np.ndarray:
        """Sentence embeddings, as the model's sentence-transformers pipeline computes them.

        `pooling` (`mean` or `cls`) replaces the model's own pooling step. Texts
        counted by count() reuse that tokenization, unless a prompt or lower-casing
        changes the text after counting.
        """
        reuse = not prompt and not self.manifest["do_lower_case"]
        if prompt:
            texts = [prompt + t for t in texts]
        if self.manifest["do_lower_case"]:
            texts = [t.lower() for t in texts]
        feeds = self.features(texts, reuse)
        with self._lock:
            self._running += 1
            alone = self._running == 1
        if alone and len(texts) == 1 and self._solo_plan is not None:
            plan, self._solo_plan = self._solo_plan, None
            self._load_solo(*plan)
        try:
            session = self.solo if self.solo is not None and alone and len(texts) == 1 else self.session
            hidden = session.run(None, {k: feeds[k] for k in self.inputs})[0].astype(np.float32)
        finally:
            with self._lock:
                self._running -= 1
        if (pooling or self.manifest["pooling"]) == "cls":
            out = hidden[:, 0]
        else:
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            out = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        if self.normalize:
            out = out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return out.astype(np.float32)
