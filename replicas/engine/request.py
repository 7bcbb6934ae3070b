"""Request state inside one engine, and the chained block hashes that make prefix caching work.

A request is a prompt (token ids, or only a length plus trace block ids when replaying a trace) and the
tokens generated so far. Following vLLM V1 there is no prefill or decode phase: each step the scheduler lets
``num_computed_tokens`` catch up toward ``num_tokens``; whenever they meet, a token is sampled.

Block hashes are chained: the hash of block j covers every token before the end of block j, so two requests
share block j exactly when they share all tokens up to it. Three sources of hashes:

  prompt token ids    hash((parent, tuple(block token ids)))   (``hash_token_blocks``, halffull/prefix_hash.py:
                      the router hashes prompts the same way)
  trace hash_ids      a trace id covers ``trace_block`` (512) tokens; engine block j lies inside trace block
                      k = j * block_size // trace_block and gets hash((parent, hash_ids[k], j)), so requests
                      that share the first k trace ids share the engine blocks inside them
  anything else       hash((parent, salt, j)) with a per-request salt (generated tokens; prompts given by
                      length only): never shared between requests, but a preempted request finds its own
                      blocks again

Only ints go into hashes, so they agree across processes (Python salts only str and bytes hashes).
"""

from __future__ import annotations

import enum
import zlib
from typing import Sequence

from halffull.prefix_hash import hash_token_blocks  # noqa: F401  (re-exported beside Request; defined once there)

TRACE_BLOCK_TOKENS = 512


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3
    ABORTED = 4


def hash_trace_blocks(
    hash_ids: Sequence[int], num_prompt_tokens: int, block_size: int, trace_block: int = TRACE_BLOCK_TOKENS
) -> list[int]:
    """Engine block hashes derived from a trace's per-512-token ids (see module docstring)."""
    if trace_block % block_size:
        raise ValueError(f"block_size {block_size} must divide the trace block size {trace_block}")
    num_full = min(num_prompt_tokens // block_size, len(hash_ids) * trace_block // block_size)
    hashes, parent = [], 0
    for j in range(num_full):
        parent = hash((parent, hash_ids[j * block_size // trace_block], j))
        hashes.append(parent)
    return hashes


class Request:
    """One request's scheduling state. ``stop_after_tokens`` is read by executors only, never by policies."""

    __slots__ = (
        "request_id", "num_prompt_tokens", "max_tokens", "arrival_time", "priority", "prompt_token_ids",
        "block_hashes", "stop_after_tokens", "num_computed_tokens", "num_output_tokens", "status",
        "num_preemptions", "num_cached_tokens", "first_token_time", "finish_time", "admit_seq",
        "first_admit_time", "output_token_ids", "output_limit",
    )

    def __init__(
        self,
        request_id: str,
        num_prompt_tokens: int,
        max_tokens: int,
        arrival_time: float = 0.0,
        *,
        priority: int = 0,
        prompt_token_ids: Sequence[int] | None = None,
        block_hashes: Sequence[int] = (),
        stop_after_tokens: int | None = None,
    ):
        if num_prompt_tokens < 1:
            raise ValueError(f"request {request_id}: prompt must have at least one token")
        if max_tokens < 1:
            raise ValueError(f"request {request_id}: max_tokens must be >= 1")
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.arrival_time = arrival_time
        self.priority = priority
        self.prompt_token_ids = prompt_token_ids
        self.block_hashes: list[int] = list(block_hashes)
        self.stop_after_tokens = stop_after_tokens
        # Output tokens at which it stops: max_tokens, or the simulated EOS if that comes first (executors).
        self.output_limit = max_tokens if stop_after_tokens is None else min(max_tokens, stop_after_tokens)
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.output_token_ids: list[int] | None = None
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.first_admit_time: float | None = None
        self.admit_seq = -1  # admission order, for "last admitted" victims

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_total_tokens_max(self) -> int:
        """Tokens the request can ever hold: prompt plus max_tokens."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED

    def wants_stop(self) -> bool:
        """Executor-side stop check after a token was sampled: max_tokens or the simulated EOS."""
        return self.num_output_tokens >= self.output_limit

    def extend_block_hashes(self, block_size: int, num_tokens: int | None = None) -> None:
        """Hash the full blocks among the first ``num_tokens`` (default: all) tokens that have no hash yet.

        These are private blocks (generated tokens, or a prompt given by length only), salted per request:
        they can only ever match this request's own blocks. Nobody else can look them up, so the engine
        hashes and registers them only when the request is preempted, which is what lets it find its KV
        again on re-admission, as vLLM's recompute does.
        """
        hashes = self.block_hashes
        full = (self.num_tokens if num_tokens is None else num_tokens) // block_size
        if len(hashes) >= full:
            return
        parent = hashes[-1] if hashes else 0
        # crc32, not hash(): str hashes change between processes and runs must be reproducible.
        salt = zlib.crc32(self.request_id.encode()) | (1 << 40)
        for j in range(len(hashes), full):
            parent = hash((parent, salt, j))
            hashes.append(parent)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id}, prompt={self.num_prompt_tokens}, out={self.num_output_tokens}/"
            f"{self.max_tokens}, computed={self.num_computed_tokens}, {self.status.name})"
        )
