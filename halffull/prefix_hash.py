"""The prefix-block hash: chained hashes of a token sequence's full blocks.

The one definition both sides of a call share: the ingress hashes a prompt for the router
(router/serve_router.py ``routing_kwarg``, at the router's ``prefix_block_size``), and the engine core hashes
prompts for its KV blocks' prefix cache (replicas/engine, at the engine's ``block_size``). It lives in the thin
``halffull`` package, not in router/ or replicas/, so neither imports the other's internals for it
(DESIGN.md §2).

Chained: the hash of block j covers every token before the end of block j,

    h_j = hash((h_{j-1}, tuple(token_ids[j * block_size : (j + 1) * block_size])))      h_{-1} = parent (0)

so two sequences share block j's hash exactly when they share all tokens up to the end of block j. A trailing
partial block gets no hash. Only ints go into the hashes, so they agree across processes (Python salts only
str and bytes hashes).
"""

from __future__ import annotations

from typing import Sequence


def hash_token_blocks(token_ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """Chained hashes of every full block of ``token_ids``."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes
