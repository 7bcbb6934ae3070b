"""The engine backend interface the replica deployment hosts (simulated now, vLLM later). No Ray imports.

A backend runs requests given as token ids and streams token ids back:

    validate(request)             raise ValueError if it can never run (too long for the context / KV cache)
    generate(request, outcome)    async iterator of output token ids; closing it early aborts the request;
                                  ``outcome`` (optional) is filled in as the request runs and when it ends
    generate_batches(request, outcome)   the same as lists of token ids: everything produced since the
                                  previous list (at least one token; one engine step's while the consumer keeps
                                  up, more when it lags). What the replica streams (replicas/deployment.py);
                                  the simulated engine gives it as ``submit(...).batches()``
    abort(request_id)             drop a request, free its KV blocks
    stats(now)                    the routing stats dict of replicas/engine/stats.py
    check_health()                raise if the engine cannot serve
    max_model_len                 context length (prompt + output tokens)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol, Sequence

# OpenAI request fields a sampling engine (vLLM) applies; the simulated model's output is deterministic (the
# ingress refuses logit_bias and response_format for it, and applies stop strings itself, on the text).
# ``stop``: a list of strings; ``logit_bias``: {token id as a string: bias}; ``response_format``:
# {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}, ...}}.
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop", "logit_bias",
                   "response_format")


@dataclass(frozen=True)
class GenerateRequest:
    """What a backend needs to run one request."""

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    ignore_eos: bool = False
    priority: int = 0
    min_tokens: int = 0  # no end (EOS, stop) before this many output tokens
    sampling: Mapping[str, Any] = field(default_factory=dict)  # SAMPLING_FIELDS the client set


@dataclass
class RequestOutcome:
    """What happened to a request; ``finish_reason`` is None while it runs, then "stop", "length" or "abort"."""

    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None


class Backend(Protocol):
    @property
    def max_model_len(self) -> int: ...

    def validate(self, request: GenerateRequest) -> None: ...

    def generate(self, request: GenerateRequest, outcome: RequestOutcome | None = None) -> AsyncIterator[int]: ...

    def generate_batches(self, request: GenerateRequest,
                         outcome: RequestOutcome | None = None) -> AsyncIterator[list[int]]: ...

    def abort(self, request_id: str) -> bool: ...

    def stats(self, now: float | None = None) -> dict[str, Any]: ...

    def check_health(self) -> None: ...
