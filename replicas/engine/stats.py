"""What a replica publishes for routers (Ray Serve's ``record_routing_stats``): one flat, JSON-able dict.

Keys and meaning are ReplicaSnapshot's published fields (router/types.py):

  num_running, num_waiting          requests in the engine
  num_waiting_prompt_tokens         tokens still to prefill: waiting requests (incl. preempted ones, which
                                    recompute), net of the prefix-cache hits they would get now, plus the
                                    unfinished prefill chunks of running requests
  num_decode_tokens_remaining       sum over requests of the estimator's expected remaining output tokens
  num_free_blocks, num_total_blocks, block_size
  decode_cost_ratio                 latency model's decode-token cost in prefill-token equivalents at the
                                    current batch size (1.0 without a latency model)
  num_preemptions                   total so far
  stats_time                        the replica's clock when published
"""

from __future__ import annotations

from typing import Any

from halffull.replicas.engine.scheduler import Scheduler
from halffull.router.estimate import OutputLengthEstimator

STATS_KEYS = (
    "num_running", "num_waiting", "num_waiting_prompt_tokens", "num_decode_tokens_remaining",
    "num_free_blocks", "num_total_blocks", "block_size", "decode_cost_ratio", "num_preemptions", "stats_time",
)


def engine_stats(
    scheduler: Scheduler, estimator: OutputLengthEstimator, *, now: float, latency: Any = None,
    pending_steps: int = 0,
) -> dict[str, Any]:
    """The stats dict. ``pending_steps`` decode steps of every running request that an executor has run but
    not yet applied to the scheduler count as applied, the blocks they take included (the virtual-time
    replica's pending run, whose first step ``schedule`` allocated; nothing may be waiting then)."""
    assert not (pending_steps and scheduler.waiting), "pending decode steps with requests waiting"
    waiting_tokens = pending_blocks = 0
    decode_left = 0.0
    context = 0
    remaining = estimator.expected_remaining
    pool, bs = scheduler.pool, scheduler.block_size
    for r in scheduler.waiting:
        # Net of prefix-cache hits (what admission will find now): cache-friendly queues are cheaper.
        hits = len(pool.find_cached_prefix(r)) * bs if r.num_computed_tokens == 0 else 0
        waiting_tokens += r.num_tokens - r.num_computed_tokens - hits
        decode_left += remaining(r.max_tokens, r.num_output_tokens)
    req_blocks = pool.req_blocks
    for r in scheduler.running:
        computed, generated = r.num_computed_tokens, r.num_output_tokens
        left = r.num_prompt_tokens + generated - computed  # a decode step adds to both
        if left > 1:
            waiting_tokens += left
        decode_left += remaining(r.max_tokens, generated + pending_steps)
        context += computed
        if pending_steps:
            # as Scheduler._allocate_run, counting only: step i (0 = allocated) needs slot c + i + 1
            first = len(req_blocks[r.request_id]) * bs - computed
            if first < pending_steps:
                pending_blocks += (pending_steps - 1 - first) // bs + 1
    num_running = len(scheduler.running)
    context += pending_steps * num_running  # (ints: the same sum as adding it per request)
    ratio = 1.0
    if latency is not None:
        batch = num_running or 1
        ratio = latency.decode_cost_ratio(batch, context / batch if num_running else 0.0)
    return {
        "num_running": num_running,
        "num_waiting": len(scheduler.waiting),
        "num_waiting_prompt_tokens": waiting_tokens,
        "num_decode_tokens_remaining": decode_left,
        "num_free_blocks": pool.num_free_blocks - pending_blocks,
        "num_total_blocks": scheduler.num_total_blocks,
        "block_size": scheduler.block_size,
        "decode_cost_ratio": ratio,
        "num_preemptions": scheduler.num_preemptions,
        "stats_time": now,
    }
