"""The Backend contract that every embedding backend (built-in or plugin) implements."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict

__all__ = ["Backend", "BackendOptions", "Task", "TASKS", "count_with_tokenizer", "split_with_tokenizer",
           "TokenizerTextMixin", "EstimatedTextMixin", "counting_tokenizer", "estimate_tokens", "split_by_chars"]

#: Weaviate's two task types; `passage` is used when a request names none.
Task = Literal["query", "passage"]
TASKS: tuple[str, ...] = ("query", "passage")

#: Characters per token used when a backend has no tokenizer of its own.
CHARS_PER_TOKEN = 4


def count_with_tokenizer(tokenizer, texts: Sequence[str]) -> list[int]:
    """Token counts (no special tokens) from a Hugging Face `tokenizers.Tokenizer`."""
    return [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def split_with_tokenizer(tokenizer, text: str, max_tokens: int) -> list[str]:
    """Cut `text` at token offsets into windows of at most `max_tokens` tokens.

    A cut backs off (by at most half a window) to a token that starts a word,
    so no window begins mid-word (a split word can re-tokenize longer).
    """
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    windows, start = [], 0
    while start < len(offsets):
        end = min(start + max_tokens, len(offsets))
        if end < len(offsets):
            cut = end
            while cut > start + max_tokens // 2 and offsets[cut][0] == offsets[cut - 1][1]:
                cut -= 1
            end = cut if cut > start + max_tokens // 2 else end
        a = offsets[start][0]
        b = offsets[end][0] if end < len(offsets) else len(text)
        windows.append(text[a:b].strip() or text[a:b])
        start = end
    return [w for w in windows if w.strip()] or [text]


def counting_tokenizer(tokenizer):
    """A private copy of a `tokenizers.Tokenizer` for exact counts: never padded or truncated, never reconfigured,
    so request threads may count with it while encoder threads pad and truncate the model's own."""
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(tokenizer.to_str())
    counter.no_truncation()
    counter.no_padding()
    return counter


def estimate_tokens(texts: Sequence[str]) -> list[int]:
    """Token counts estimated from characters (for backends and rerankers without a tokenizer)."""
    return [max(1, math.ceil(len(t) / CHARS_PER_TOKEN)) for t in texts]


def split_by_chars(text: str, max_tokens: int) -> list[str]:
    """Windows of about `max_tokens` tokens, cut by the character estimate."""
    size = max(1, max_tokens * CHARS_PER_TOKEN)
    return [text[i:i + size] for i in range(0, len(text), size)] or [text]


class EstimatedTextMixin:
    """The default token methods of `Backend` and `Reranker`: estimates from characters."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Return each text's token count; the default estimates from characters."""
        return estimate_tokens(texts)

    def split_text(self, text: str, max_tokens: int) -> list[str]:
        """Split `text` into consecutive windows of at most `max_tokens` tokens."""
        return split_by_chars(text, max_tokens)


class BackendOptions(BaseModel):
    """Base for a backend's `Options`: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Backend(EstimatedTextMixin, ABC):
    """An embedding backend: turns a list of texts into a list of vectors.

    Subclasses set `name` and `Options`, may override `load()` for heavy
    start-up work and `info()` for `/meta`, and must implement `embed()`.
    The core does batching, caching, retries, long-text handling,
    dimension checks and normalisation around it.

    The capabilities below may be class attributes or set in `__init__` or
    `load()`: the core reads them once `load()` has returned.
    `fingerprint_parts()` (by default `info()`) must not be empty: it says
    which model's vectors `embed()` returns.
    """

    #: Name used as `backend:` in the YAML config. Must be unique.
    name: ClassVar[str]
    #: Pydantic model validating the `options:` mapping of the config.
    Options: ClassVar[type[BaseModel]] = BackendOptions

    #: Most texts one `embed()` call may take (None: no limit).
    max_batch_size: int | None = None
    #: Most tokens per text the model reads (None: no limit). Longer texts
    #: go through the model's long-text policy.
    max_input_tokens: int | None = None
    #: Most tokens summed over one `embed()` call (None: no limit).
    max_batch_tokens: int | None = None
    #: True if `embed()` treats `query` and `passage` differently.
    task_aware: bool = False
    #: True if the returned vectors are already unit length.
    normalized: bool = False
    #: True if the model is trained for Matryoshka truncation (any prefix of
    #: the vector is itself a good embedding), so `dimensions` may be honoured.
    matryoshka: bool = False
    #: Length of every vector `embed()` returns, if known (None: the core learns
    #: it at load from a fixed set of short, long and multilingual texts).
    dimension: int | None = None
    #: `pooling_strategy` values a request may choose (the first is the model's
    #: own); `embed()` then gets `pooling=` for any other. Empty: the pooling is
    #: fixed and only Weaviate's default `masked_mean` is accepted.
    pooling_strategies: tuple[str, ...] = ()
    #: Worker threads the batcher runs against this backend (None: core default).
    concurrency: int | None = None
    #: Batch cost model `(a, b, c)`: one call on n texts padded to L tokens
    #: takes about `a + b*n*L + c*n*L*L` seconds. Lets the batcher group texts
    #: by length (None: the backend does not pad, group only by its limits).
    batch_cost: tuple[float, float, float] | None = None
    #: Importable modules the backend needs, checked when the config is
    #: validated, and the pip extra that installs them.
    requires: ClassVar[tuple[str, ...]] = ()
    #: True if the backend holds model weights in this process (one copy per
    #: gunicorn worker), so `vecshim serve` defaults to a single worker.
    in_process: ClassVar[bool] = False
    #: True if `embed()` is local compute that always returns (no network, no
    #: waiting on anything else): a text that finds the model idle is then
    #: embedded on the request's own thread, without the batcher's thread
    #: hand-offs. Leave False for calls that may hang: the batcher's timeout and
    #: hung-call watchdog only act on calls run by its own threads.
    inline_calls: ClassVar[bool] = False
    extra: ClassVar[str | None] = None

    def __init__(self, options: BaseModel):
        self.options = options

    def plan_threads(self, callers: int) -> None:
        """Called before `load()`: `callers` batch threads will call `embed()` at once.

        A backend with its own thread pool (a local model) sizes it from this;
        the default ignores it.
        """

    def load(self) -> None:
        """Do heavy start-up work (import SDKs, load weights, open clients)."""

    def preflight(self) -> list[tuple[str, str]]:
        """Return problems visible without loading, as (option, problem) pairs.

        Called by `vecshim config check` and before `vecshim serve` starts
        workers: a missing API key, an unreadable key file. Cheap, no network.
        """
        return []

    def info(self) -> dict[str, Any]:
        """Return JSON-safe facts for `/meta` (model id, revision...). Never secrets."""
        return {}

    def fingerprint_parts(self) -> dict[str, Any]:
        """Return what identifies this backend's vector space (model id, revision...).

        Must name the model (an empty identity is a config error): two backends
        with the same parts and name are assumed to return the same vectors.
        """
        return self.info()

    @abstractmethod
    def embed(self, texts: list[str], task: Task) -> Sequence[Sequence[float]]:
        """Embed `texts` for `task` and return one vector per text, in order.

        A backend with `pooling_strategies` also takes a keyword `pooling`
        (one of them other than the first). Raise `vecshim.BackendError` (or any exception) on failure; the core
        turns it into a JSON error for the callers of this batch.
        """

    def close(self) -> None:
        """Release clients and threads at shutdown."""


class TokenizerTextMixin(EstimatedTextMixin):
    """`count_tokens` and `split_text` from a `tokenizers.Tokenizer` kept in `self._counter`.

    Put it before `Backend` or `Reranker` in the bases; until `load()` sets
    `_counter`, the character-based estimates apply.
    """

    _counter = None

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Exact token counts (without special tokens) from the model's tokenizer."""
        if self._counter is None:
            return super().count_tokens(texts)
        return count_with_tokenizer(self._counter, texts)

    def split_text(self, text: str, max_tokens: int) -> list[str]:
        """Cut at token boundaries, preferring word starts, into windows of <= max_tokens."""
        if self._counter is None:
            return super().split_text(text, max_tokens)
        return split_with_tokenizer(self._counter, text, max_tokens)
