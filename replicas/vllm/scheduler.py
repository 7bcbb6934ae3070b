"""halffull's engine policies inside vLLM's V1 scheduler: a thin ``Scheduler`` subclass.

    LLM(model, scheduler_cls="halffull.replicas.vllm.scheduler.HalffullScheduler", ...)        # or --scheduler-cls
    HALFFULL_ENGINE_POLICY=larry  HALFFULL_ENGINE_PARAMS='{"tau": 0.05}'                 # which policy

The same policy object that runs in halffull's engine core (replicas/engine/policies.py, larry.py) makes
the three decisions; vLLM keeps everything else (token budget, chunked prefill, prefix caching, the
block pool, recompute, outputs, stats). vLLM's ``Request`` already has every field of ``RequestLike``
(``request_id``, ``num_prompt_tokens``, ``num_tokens``, ``num_computed_tokens``, ``max_tokens``,
``arrival_time``, ``priority``), so requests reach the policy as they are; ``VllmEngineView`` adapts the
scheduler to ``EngineView``. vLLM 0.32's ``schedule()`` has no small method per decision, so each hook sits
at the narrowest point that sees it:

=============  ===============================================================================================
decision       hook
=============  ===============================================================================================
order_waiting  ``self.waiting`` is a ``PolicyRequestQueue``: vLLM's FCFS deque (arrivals appended, preempted
               and skipped requests prepended) with the policy's order laid over it. The order is computed at
               the first ``peek_request`` of a step (after the RUNNING loop, as in halffull's engine) and kept
               until the queue changes or the next ``schedule()``.
can_admit      ``kv_cache_manager.allocate_slots`` is wrapped on the instance. A call for a WAITING/PREEMPTED
               request is the WAITING loop's admission: the wrapper builds an ``Admission`` (prefix hit, new
               tokens; blocks for this chunk, for the whole prompt and for prompt + max_tokens, all counted by
               vLLM's own coordinator) and returns None when the policy refuses, which ends admission for the
               step exactly like a failed allocation (head-of-line blocking, as halffull's engine does).
pick_victim    vLLM picks the victim inline: ``self.running[-1]`` for FCFS, ``max(self.running, key=(priority,
               arrival_time))`` for PRIORITY. Only the PRIORITY branch handles a victim anywhere in the running
               list (it fixes the loop index, returns the victim's token budget when it was scheduled earlier
               in the step). So ``self.policy`` is set to PRIORITY and, when a RUNNING allocation fails, the
               wrapper asks the policy for the victim and raises that request's ``priority`` to ``VICTIM_MARK``
               so vLLM's ``max`` selects it; ``_preempt_request`` (and, as a safety net, the end of
               ``schedule()``) puts the real priority back. The mark lives only between the failed allocation
               and the preemption, in which vLLM runs no other code. fcfs picks ``running[-1]``, so fcfs here
               makes exactly vLLM's FCFS decisions.
=============  ===============================================================================================

A policy that declines to preempt (``pick_victim`` -> None; only ``no_preempt``, whose reservations should
make it unreachable) cannot leave the request waiting in place inside vLLM's loop: the request that failed to
allocate is preempted instead (vLLM then stops the RUNNING loop, as halffull's engine does).

Choosing the policy (first found wins):

1. ``HalffullScheduler(..., engine_policy=EnginePolicy)`` when constructing the scheduler directly (tests).
2. vLLM's ``additional_config={"halffull": {"engine_policy": "larry", "engine_params": {"tau": 0.05}}}``
   (``--additional-config '{"halffull": {...}}'``); travels with the VllmConfig into the engine process.
3. Environment: ``HALFFULL_ENGINE_POLICY`` (default ``fcfs``) and ``HALFFULL_ENGINE_PARAMS`` (a JSON object);
   inherited by vLLM's engine process and settable in a Ray ``runtime_env``.

Unknown names or parameters fail at engine start (``make_engine_policy``). ``HalffullAsyncScheduler`` is the
same hooks on vLLM's ``AsyncScheduler`` (GPU engines with async scheduling, vLLM's default there); policies
then see vLLM's optimistic ``num_computed_tokens`` (they include the step in flight). Policies see the first
KV cache group's blocks: all groups are equal for a standard decoder-only model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Sequence

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from halffull.replicas.engine.policies import Admission, EnginePolicy, make_engine_policy

ENV_POLICY = "HALFFULL_ENGINE_POLICY"
ENV_PARAMS = "HALFFULL_ENGINE_PARAMS"
ADDITIONAL_CONFIG_KEY = "halffull"
# Every field of halffull.replicas.engine.policies.Admission that _admission fills (a test checks none is missing).
ADMISSION_FIELDS = frozenset(
    {"request", "num_hit_tokens", "num_new_tokens", "blocks_now", "blocks_full", "blocks_prompt"}
)
VICTIM_MARK = sys.maxsize  # priority that makes vLLM's max(running, key=(priority, arrival)) pick the victim


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def policy_from_config(vllm_config: Any = None, environ: dict[str, str] | None = None) -> EnginePolicy:
    """The engine policy named by vLLM's ``additional_config["halffull"]``, else by the environment."""
    extra = getattr(vllm_config, "additional_config", None)
    section = extra.get(ADDITIONAL_CONFIG_KEY) if isinstance(extra, dict) else None
    if section:
        unknown = set(section) - {"engine_policy", "engine_params"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in additional_config[{ADDITIONAL_CONFIG_KEY!r}]")
        return make_engine_policy(section.get("engine_policy", "fcfs"), section.get("engine_params"))
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PARAMS, "").strip()
    params = json.loads(raw) if raw else {}
    if not isinstance(params, dict):
        raise ValueError(f"{ENV_PARAMS} must be a JSON object, got {raw!r}")
    return make_engine_policy(env.get(ENV_POLICY, "fcfs").strip() or "fcfs", params)


class VllmEngineView:
    """``EngineView`` over a vLLM scheduler (read-only; computed on access)."""

    def __init__(self, scheduler: Scheduler, clock: Callable[[], float] = time.time):
        self._scheduler = scheduler
        self._manager = scheduler.kv_cache_manager
        self._pool = scheduler.kv_cache_manager.block_pool
        self._group0 = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        self._clock = clock  # vLLM stamps arrival_time with time.time()
        self.block_size = scheduler.block_size
        self.num_total_blocks = self._pool.num_gpu_blocks - 1  # vLLM reserves block 0 as the null block
        self.max_model_len = scheduler.max_model_len

    @property
    def now(self) -> float:
        return self._clock()

    @property
    def num_free_blocks(self) -> int:
        return self._pool.get_num_free_blocks()

    @property
    def running(self) -> Sequence[Request]:
        return self._scheduler.running

    def num_blocks_of(self, request: Request) -> int:
        return len(self._group0.req_to_blocks.get(request.request_id, ()))

    def prompt_blocks(self, request: Request) -> int:
        hit_blocks = 0
        if request.num_computed_tokens == 0:
            _, num_hit_tokens, _ = self._manager.get_computed_blocks(request)
            hit_blocks = num_hit_tokens // self.block_size
        return max(cdiv(request.num_tokens, self.block_size) - hit_blocks - self.num_blocks_of(request), 0)


class PolicyRequestQueue(RequestQueue):
    """vLLM's FCFS waiting queue with an engine policy's order laid over it (see the module docstring).

    ``_queue`` holds vLLM's FCFS order. ``_order`` is the policy's order of the same requests, computed on the
    first peek/pop after a change or after ``new_step()``, and consumed from the front as vLLM pops.
    """

    def __init__(self, policy: EnginePolicy, view: VllmEngineView):
        self._policy = policy
        self._view = view
        self._queue: deque[Request] = deque()
        self._order: deque[Request] | None = None
        # fcfs and friends keep the queue order: skip the per-step copy.
        self._identity = type(policy).order_waiting is EnginePolicy.order_waiting

    def new_step(self) -> None:
        self._order = None

    def _ordered(self) -> deque[Request]:
        if self._identity:
            return self._queue
        if self._order is None:
            order = self._policy.order_waiting(list(self._queue), self._view)
            self._order = deque(order)
        return self._order

    # ---- RequestQueue --------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self._queue.append(request)
        self._order = None

    def pop_request(self) -> Request:
        if self._identity:
            return self._queue.popleft()
        request = self._ordered().popleft()
        self._queue.remove(request)
        return request

    def peek_request(self) -> Request:
        order = self._ordered()
        if not order:
            raise IndexError("peek from an empty queue")
        return order[0]

    def prepend_request(self, request: Request) -> None:
        self._queue.appendleft(request)
        self._order = None

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        # Same semantics as vLLM's FCFSRequestQueue (extendleft: reversed).
        self._queue.extendleft(requests)
        self._order = None

    def remove_request(self, request: Request) -> None:
        self._queue.remove(request)
        self._order = None

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = set(requests)
        self._queue = deque(r for r in self._queue if r not in gone)
        self._order = None

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        # The order of the current step when one was computed, else vLLM's FCFS order (no policy call).
        return iter(list(self._queue if self._order is None else self._order))


class _PolicyHooks:
    """The three hooks; mixed into vLLM's ``Scheduler`` and ``AsyncScheduler`` below."""

    def __init__(self, *args: Any, engine_policy: EnginePolicy | None = None,
                 clock: Callable[[], float] = time.time, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.engine_policy = engine_policy or policy_from_config(self.vllm_config)
        self.engine_view = VllmEngineView(self, clock)
        self.waiting = PolicyRequestQueue(self.engine_policy, self.engine_view)
        # Route every preemption through vLLM's general victim code (see the module docstring).
        self.policy = SchedulingPolicy.PRIORITY
        self._marked_victim: tuple[Request, int] | None = None
        self._vllm_allocate_slots = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_slots

    def schedule(self, *args: Any, **kwargs: Any):
        self.waiting.new_step()  # memory and time changed: recompute the order at the first peek
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self._unmark_victim()

    def _allocate_slots(self, request: Request, num_new_tokens: int, *args: Any, **kwargs: Any):
        self._unmark_victim()
        if request.status == RequestStatus.RUNNING:
            blocks = self._vllm_allocate_slots(request, num_new_tokens, *args, **kwargs)
            if blocks is None:
                self._mark_victim(request)
            return blocks
        if not self.engine_policy.can_admit(self._admission(request, num_new_tokens, **kwargs), self.engine_view):
            return None
        return self._vllm_allocate_slots(request, num_new_tokens, *args, **kwargs)

    # ---- victim --------------------------------------------------------------------------------------
    def _mark_victim(self, request: Request) -> None:
        victim = self.engine_policy.pick_victim(self.running, self.engine_view)
        if victim is None:
            victim = request  # vLLM's loop cannot leave it waiting in place; see the module docstring
        elif not any(r is victim for r in self.running):
            raise RuntimeError(f"policy {self.engine_policy.name!r} picked a victim that is not running")
        self._marked_victim = (victim, victim.priority)
        victim.priority = VICTIM_MARK

    def _unmark_victim(self) -> None:
        if self._marked_victim is not None:
            victim, priority = self._marked_victim
            victim.priority = priority
            self._marked_victim = None

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self._unmark_victim()
        super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args: Any, **kwargs: Any):
        # What a policy learns output lengths from (EnginePolicy.on_finished): finished, not aborted.
        if request.status != RequestStatus.FINISHED_ABORTED:
            self.engine_policy.on_finished(request)
        return super()._free_request(request, *args, **kwargs)

    # ---- admission -----------------------------------------------------------------------------------
    def _admission(self, request: Request, num_new_tokens: int, *, num_new_computed_tokens: int = 0,
                   new_computed_blocks: Any = None, num_lookahead_tokens: int = 0,
                   num_external_computed_tokens: int = 0, num_encoder_tokens: int = 0, **_: Any) -> Admission:
        hits = (new_computed_blocks or self.kv_cache_manager.empty_kv_cache_blocks).blocks
        num_local = request.num_computed_tokens + num_new_computed_tokens
        num_computed = num_local + num_external_computed_tokens
        full = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)

        def blocks_for(num_tokens: int, num_main: int, cap: bool) -> int:
            # vLLM's own count (what allocate_slots checks): new blocks plus prefix hits sitting in the free queue.
            return self.kv_cache_manager.coordinator.get_num_blocks_to_allocate(
                request_id=request.request_id, num_tokens=num_tokens, new_computed_blocks=hits,
                num_encoder_tokens=num_encoder_tokens, total_computed_tokens=num_computed,
                num_local_computed_tokens=num_local, num_tokens_main_model=num_main, apply_admission_cap=cap,
                prefill_end=max(request.num_prompt_tokens, request.num_tokens - 1),
            )

        num_main = min(num_computed, self.max_model_len) + num_new_tokens
        prompt = min(request.num_tokens, self.max_model_len)  # what vLLM's full-ISL gate counts
        return Admission(
            request=request,
            num_hit_tokens=num_new_computed_tokens + num_external_computed_tokens,
            num_new_tokens=num_new_tokens,
            blocks_now=blocks_for(min(num_main + num_lookahead_tokens, self.max_model_len), num_main, False),
            blocks_full=blocks_for(full, full, True),
            blocks_prompt=blocks_for(prompt, prompt, True),
        )


class HalffullScheduler(_PolicyHooks, Scheduler):
    """vLLM's V1 ``Scheduler`` deciding with a halffull engine policy (CPU engines, sync scheduling)."""


class HalffullAsyncScheduler(_PolicyHooks, AsyncScheduler):
    """The same on vLLM's ``AsyncScheduler`` (GPU engines, where vLLM turns async scheduling on)."""
