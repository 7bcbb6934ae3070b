"""Prompt text for HTTP trace replay: exactly the trace's token counts, shared text exactly where it shares blocks.

A trace gives each request a prompt *length* (and, for Mooncake, one hash id per 512-token block); replaying it
over HTTP needs real text. The text is built from *words*, a space and three lowercase letters (``" kqz"``).
Under the served model's tokenizer (deploy/tokenizer.py) such a word is one pre-tokenizer piece of 4 bytes, so
exactly one token, and words never merge with their neighbours::

    text of n words  ->  exactly n tokens;   its first k words  ->  exactly its first k tokens

so token positions and word positions coincide and prefix caching sees exactly the sharing the trace describes.

Layout (``TRACE_BLOCK_TOKENS`` = 512 words per block)::

    request with hash_ids (h0, h1, h2), 1300 prompt tokens:
    | block "h:h0" (512 words) | block "h:h1" (512 words) | block "h:h2", first 276 words |
    request without hash_ids (Azure), or blocks past the last hash id:
    | block "r:<request_id>:0" | block "r:<request_id>:1" | ...

A block's text depends only on its key and the seed: the same hash id gives the same words in every request,
the last partial block is a prefix of the full one (the trace's convention for a partial last block), and a
request-unique block (``r:``) is never shared. Each block opens with a *marker* that tells keys apart for
certain (not just with high probability): for hash id ``h``, its two base-17,576 digits, least significant
first (distinct ids below 17,576² = 308,915,776 differ within the first two words, ids that differ mod 17,576
already in the first); for request-unique blocks, the digits of a 64-bit BLAKE2 digest of the key. The rest
of the block is words drawn from ``random.Random`` seeded by (seed, key).

Block texts are memoised (LRU, ``cache_blocks`` blocks), since Mooncake requests share most of their blocks.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import Iterable, Sequence

from halffull.loadtest.sim.traces import TRACE_BLOCK_TOKENS, TraceRequest

__all__ = ["WORDS", "WORD_BASE", "PromptSynthesizer", "synthesize_prompts"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS: tuple[str, ...] = tuple(" " + a + b + c for a in _LETTERS for b in _LETTERS for c in _LETTERS)
WORD_BASE = len(WORDS)  # 17,576
_MARKER_WORDS = 2


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class PromptSynthesizer:
    """Prompt text for trace requests (see the module docstring). Deterministic for a seed."""

    def __init__(self, seed: int = 0, *, block_tokens: int = TRACE_BLOCK_TOKENS, cache_blocks: int = 4096):
        if block_tokens < _MARKER_WORDS:
            raise ValueError(f"block_tokens must be >= {_MARKER_WORDS}, got {block_tokens}")
        self.seed = seed
        self.block_tokens = block_tokens
        self.cache_blocks = cache_blocks
        self._cache: OrderedDict[str, str] = OrderedDict()

    # ---- one block -------------------------------------------------------------------------------------
    def _marker(self, key: str, hash_id: int | None) -> list[str]:
        value = hash_id % WORD_BASE**_MARKER_WORDS if hash_id is not None else _digest64(key)
        return [WORDS[(value // WORD_BASE**i) % WORD_BASE] for i in range(_MARKER_WORDS)]

    def block_text(self, key: str, hash_id: int | None = None) -> str:
        """The full block (``block_tokens`` words) for ``key``: "h:<id>" for a hash id, "r:<rid>:<i>" else."""
        text = self._cache.get(key)
        if text is not None:
            self._cache.move_to_end(key)
            return text
        rng = random.Random(f"{self.seed}:{key}")  # str seeds hash with SHA-512: stable across runs
        words = self._marker(key, hash_id) + rng.choices(WORDS, k=self.block_tokens - _MARKER_WORDS)
        text = "".join(words)
        self._cache[key] = text
        if len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return text

    # ---- one prompt ------------------------------------------------------------------------------------
    def block_keys(self, request_id: str, num_prompt_tokens: int,
                   hash_ids: Sequence[int] = ()) -> list[tuple[str, int | None, int]]:
        """(key, hash id or None, words used) per block of the prompt, in order."""
        out = []
        size = self.block_tokens
        for i, start in enumerate(range(0, num_prompt_tokens, size)):
            words = min(size, num_prompt_tokens - start)
            if i < len(hash_ids):
                out.append((f"h:{hash_ids[i]}", hash_ids[i], words))
            else:
                out.append((f"r:{request_id}:{i}", None, words))
        return out

    def text(self, request_id: str, num_prompt_tokens: int, hash_ids: Sequence[int] = ()) -> str:
        """Prompt text of exactly ``num_prompt_tokens`` tokens (see the module docstring)."""
        if num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
        parts = []
        for key, hash_id, words in self.block_keys(request_id, num_prompt_tokens, hash_ids):
            block = self.block_text(key, hash_id)
            parts.append(block if words == self.block_tokens else block[: 4 * words])  # 4 characters a word
        return "".join(parts)

    def for_request(self, request: TraceRequest) -> str:
        return self.text(request.request_id, request.num_prompt_tokens, request.hash_ids)


def synthesize_prompts(requests: Iterable[TraceRequest], seed: int = 0) -> list[str]:
    """Prompt text for every request, in order."""
    synth = PromptSynthesizer(seed)
    return [synth.for_request(r) for r in requests]
