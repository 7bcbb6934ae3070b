"""One-line builders for engine tests: a scheduler with tiny block counts, a request, one checked step. And
``drain_batches``, the token channel tests' reader.

Defaults (8 blocks of 4 tokens, a 16-token budget) are small enough that every block and token count in a
test can be worked out by hand.
"""

from __future__ import annotations

from typing import Sequence

from halffull.replicas.engine.policies import make_engine_policy
from halffull.replicas.engine.request import Request
from halffull.replicas.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def make_sched(
    num_blocks: int = 8, block_size: int = 4, budget: int = 16, max_seqs: int = 8, max_len: int = 64,
    policy: str = "fcfs", **kw,
) -> Scheduler:
    """A scheduler; ``kw`` goes to SchedulerConfig (watermark, enable_prefix_caching, long_prefill_...)."""
    config = SchedulerConfig(
        num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
        max_model_len=max_len, **kw,
    )
    return Scheduler(config, make_engine_policy(policy))


def req(request_id: str, prompt: int | Sequence[int], max_tokens: int, arrival: float = 0.0, **kw) -> Request:
    """A request; ``prompt`` is a length (no shareable ids) or a list of token ids (prefix-cacheable)."""
    if isinstance(prompt, int):
        return Request(request_id, prompt, max_tokens, arrival, **kw)
    return Request(request_id, len(prompt), max_tokens, arrival, prompt_token_ids=list(prompt), **kw)


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def step(sched: Scheduler, now: float | None = None) -> tuple[dict[str, int], list[str], list[str]]:
    """schedule + update_from_output; returns (id -> scheduled tokens, preempted ids, finished ids).

    ``now`` defaults to the step's index (1.0 for the first step), so step k's tokens are stamped k.
    The pool's invariants are checked after the step.
    """
    sched_out, finished = step_out(sched, now)
    scheduled = {r.request_id: n for r, n in sched_out.num_scheduled_tokens.items()}
    return scheduled, [r.request_id for r in sched_out.preempted], [r.request_id for r in finished]


def step_out(sched: Scheduler, now: float | None = None) -> tuple[SchedulerOutput, list[Request]]:
    """As ``step`` but returns the raw SchedulerOutput and finished Request objects."""
    if now is None:
        now = float(sched.num_steps + 1)
    out = sched.schedule(now)
    finished = sched.update_from_output(out, now)
    sched.pool.check_invariants()
    return out, finished


def run_to_idle(sched: Scheduler, max_steps: int = 10_000) -> int:
    """Step until no work is left; returns the number of steps. Fails on a livelock."""
    for n in range(max_steps):
        if not sched.has_work():
            return n
        step(sched)
    raise AssertionError(f"scheduler still has work after {max_steps} steps: {list(sched.requests)}")


async def drain_batches(tokens) -> list[list[int]]:
    """Every batch of a deploy/channel.py ``RunTokens`` until its run ends, one list per read, as the ingress
    reads them."""
    out = []
    try:
        while True:
            out.append(await tokens.next_batch())
    except StopAsyncIteration:
        return out
