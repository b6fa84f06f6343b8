"""The prompt-embedding cache: text-encoder outputs kept by toonark, bounded in bytes, LRU.

    cache = PromptEmbeddingCache(max_bytes=64 << 20)
    key = cache.key(input_ids)                                  # + text_encoder_lora=... when one is applied
    embedding = cache.get(key)
    if embedding is None:
        embedding = encode(input_ids)
        cache.put(key, embedding, rows=input_ids.shape[0])     # refused (False) when it is not a good embedding

Why toonark owns it instead of Triton's response cache (issue 18): Triton 2.51 stores a *failed* response
too and replays it as an empty success until the server restarts (recipe gotcha 6), so one transient fault
of the text encoder (its process killed mid-request) became a permanent outage for that prompt. Here only
an embedding that `put` checked is stored: a failure never reaches `put` (the caller raises first), and
an empty, non-finite or wrongly shaped array is refused.

The key is everything that changes the embedding: the exact token ids (prompt and negative prompt rows,
their dtype and shape) and the text encoder's identity (`text_encoder_lora`: the id of a LoRA applied to the
text encoder, None without one; `model`: anything else that selects weights, e.g. an engine version). The
seed, size, steps and guidance do not change it, so a repeated prompt hits with any of them.

Core module (rank 0): numpy and the stdlib only. One cache per process (each Triton model instance is its
own process, so each text_encoder instance has its own cache); thread-safe for offline use.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_MAX_BYTES = 64 << 20   # SD-1.5: one (2, 77, 768) fp32 entry is 0.47 MB, so ~140 prompts; the tiny build ~40 k


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    refused: int = 0      # put() calls whose value was not a good embedding (never stored)
    entries: int = 0
    bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class PromptEmbeddingCache:
    """LRU map key -> read-only embedding, at most `max_bytes` of arrays and keys together."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"prompt cache size must be >= 0 bytes (0 turns it off), got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def key(input_ids: np.ndarray, *, text_encoder_lora: str | None = None, model: str = "") -> tuple:
        """The exact inputs of the text encoder plus what selects its weights. Raw bytes, not a hash: no
        collision can serve another prompt's embedding (a key is ~1.2 KB for SD-1.5, counted in the budget).
        text_encoder_lora: the hook for a LoRA on the text encoder (its id and scale as one string)."""
        ids = np.ascontiguousarray(input_ids)
        if ids.size == 0:
            raise ValueError("no token ids to key the prompt cache with")
        return (model, text_encoder_lora or "", ids.dtype.str, ids.shape, ids.tobytes())

    @staticmethod
    def _key_bytes(key: tuple) -> int:
        return len(key[-1]) + 64

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return value

    @staticmethod
    def check(embedding, rows: int | None = None) -> str | None:
        """Why `embedding` must not be cached (None: it may). A text encoder's output is (rows, L, D), finite."""
        if not isinstance(embedding, np.ndarray):
            return f"not an array ({type(embedding).__name__})"
        if embedding.size == 0:
            return f"empty (shape {list(embedding.shape)})"
        if embedding.ndim != 3:
            return f"shape {list(embedding.shape)} is not (rows, tokens, width)"
        if rows is not None and embedding.shape[0] != rows:
            return f"{embedding.shape[0]} rows for {rows} token rows"
        if embedding.dtype.kind != "f":
            return f"dtype {embedding.dtype} is not a float type"
        if not np.isfinite(embedding).all():
            return "not finite (NaN or inf)"
        return None

    def put(self, key: tuple, embedding, rows: int | None = None) -> bool:
        """Store a copy of a good embedding (True), evicting the least recently used entries to stay within
        max_bytes; refuse (False, counted in stats.refused) anything `check` rejects or larger than the cache."""
        if self.check(embedding, rows) is not None:
            with self._lock:
                self.stats.refused += 1
            return False
        size = embedding.nbytes + self._key_bytes(key)
        if size > self.max_bytes:
            return False
        value = np.array(embedding, copy=True)
        value.setflags(write=False)   # callers share it: nobody may change a cached embedding in place
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.stats.bytes -= old.nbytes + self._key_bytes(key)
            while self._entries and self.stats.bytes + size > self.max_bytes:
                old_key, old_value = self._entries.popitem(last=False)
                self.stats.bytes -= old_value.nbytes + self._key_bytes(old_key)
                self.stats.evictions += 1
            self._entries[key] = value
            self.stats.bytes += size
            self.stats.entries = len(self._entries)
        return True

    def get_or_compute(self, key: tuple, compute, rows: int | None = None) -> tuple[np.ndarray, bool]:
        """(embedding, hit). `compute()` runs on a miss; its exceptions pass through and nothing is stored."""
        value = self.get(key)
        if value is not None:
            return value, True
        value = compute()
        reason = self.check(value, rows)
        if reason is not None:
            with self._lock:
                self.stats.refused += 1
            raise RuntimeError(f"the text encoder returned an unusable embedding ({reason}); not cached")
        self.put(key, value, rows)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.stats.entries = self.stats.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
