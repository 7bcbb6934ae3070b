"""Routing stats read from vLLM's scheduler inside its engine process (served by replicas/vllm/backend.py).

``AsyncLLM`` always runs the engine core in a separate process (vLLM 0.32: ``AsyncLLM`` with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` raises NotImplementedError), so the frontend cannot read the scheduler.
It asks instead, with vLLM's engine-core utility call::

    stats = await async_llm.engine_core.call_utility_async("halffull_routing_stats")

which the engine core runs between two steps (``getattr(engine_core, name)()``): a consistent snapshot, no
race with ``schedule()``. Importing this module in the engine process adds that method to vLLM's
``EngineCore``; the engine process imports it because the backend's ``scheduler_cls`` is one of the two
classes below (halffull's schedulers plus a preemption counter).

Fields, with the definitions of replicas/engine/stats.py::

  num_running, num_waiting     ``scheduler.get_request_counts()`` (waiting includes preempted requests)
  num_waiting_prompt_tokens    waiting requests' tokens still to compute, net of the prefix-cache hits vLLM
                               would find now (``kv_cache_manager.get_computed_blocks``), plus the unfinished
                               prefill chunks of running requests
  num_free_blocks              ``block_pool.get_num_free_blocks()`` (cached blocks nobody holds count as free,
                               as in vLLM)
  num_total_blocks             ``block_pool.num_gpu_blocks - 1`` (block 0 is vLLM's null block)
  block_size                   ``scheduler.block_size``
  num_preemptions              preemptions since the engine started (``_preempt_request`` calls)
  num_requests                 requests the engine holds (``len(scheduler.requests)``): 0 once every stream
                               ended or was aborted
  scheduler, engine_policy     the scheduler class and halffull policy name running in the engine

The frontend adds ``num_decode_tokens_remaining`` (it knows each request's ``max_tokens`` and tokens so far),
``decode_cost_ratio`` (1.0: no latency model for a real engine) and ``stats_time``.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.engine.core import EngineCore

from halffull.replicas.vllm.scheduler import HalffullAsyncScheduler, HalffullScheduler

UTILITY_METHOD = "halffull_routing_stats"


def routing_stats(scheduler: Any) -> dict[str, Any]:
    """The engine-side routing stats of a vLLM V1 scheduler (see the module docstring)."""
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    waiting_tokens = 0
    for request in [*scheduler.waiting, *getattr(scheduler, "kv_holding_waiting", ())]:
        hits = manager.get_computed_blocks(request)[1] if request.num_computed_tokens == 0 else 0
        waiting_tokens += max(request.num_tokens - request.num_computed_tokens - hits, 0)
    for request in scheduler.running:
        left = request.num_tokens - request.num_computed_tokens
        if left > 1:  # more than the one decode token: a prefill (chunk) still to run
            waiting_tokens += left
    num_running, num_waiting = scheduler.get_request_counts()
    return {
        "num_running": num_running,
        "num_waiting": num_waiting,
        "num_waiting_prompt_tokens": waiting_tokens,
        "num_free_blocks": pool.get_num_free_blocks(),
        "num_total_blocks": pool.num_gpu_blocks - 1,
        "block_size": scheduler.block_size,
        "num_preemptions": getattr(scheduler, "num_preemptions", 0),
        "num_requests": len(scheduler.requests),
        "scheduler": type(scheduler).__name__,
        "engine_policy": getattr(getattr(scheduler, "engine_policy", None), "name", "vllm"),
    }


class _CountPreemptions:
    """Counts preemptions (vLLM keeps only per-request counts)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_preemptions = 0

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> None:
        self.num_preemptions += 1
        super()._preempt_request(request, *args, **kwargs)


class ServingScheduler(_CountPreemptions, HalffullScheduler):
    """``HalffullScheduler`` (sync scheduling: CPU) with a preemption counter; what the Serve backend runs."""


class ServingAsyncScheduler(_CountPreemptions, HalffullAsyncScheduler):
    """``HalffullAsyncScheduler`` (async scheduling: vLLM's default on GPU) with a preemption counter."""


def _engine_core_routing_stats(self: EngineCore) -> dict[str, Any]:
    return routing_stats(self.scheduler)


# The engine-core utility method (see the module docstring). Only added, never replacing anything of vLLM's.
if not hasattr(EngineCore, UTILITY_METHOD):
    setattr(EngineCore, UTILITY_METHOD, _engine_core_routing_stats)
