"""The step scheduler: vLLM V1's algorithm with the policy decisions pulled out into hooks.

Invariant: every step each scheduled request's ``num_computed_tokens`` catches up toward ``num_tokens``
under one token budget (``max_num_batched_tokens``) and at most ``max_num_seqs`` running requests. When a
request's computed tokens meet its token count, a token is sampled. Chunked prefill, decode, prefix hits and
recompute after preemption all follow from that.

One step (``schedule``):

1. RUNNING, in order. Each request asks for ``num_tokens - num_computed_tokens`` tokens (capped by the
   budget). If the block pool cannot give it slots, the policy picks a victim (``pick_victim``), which is
   preempted by recompute: blocks freed, computed tokens reset, put at the front of the waiting queue. This
   repeats until the allocation succeeds, the victim is the request itself, or the policy declines; then the
   running loop stops for this step.
2. WAITING, only if nothing was preempted this step. Requests are taken in the policy's order
   (``order_waiting``); each gets a prefix-cache lookup (when it has no computed tokens), the policy's
   verdict (``can_admit``) and an allocation (with vLLM's watermark when others are scheduled). The first
   refusal ends admission for the step: head-of-line blocking, as in vLLM.

``update_from_output`` then advances computed tokens, samples tokens and finishes requests. Executors that
run identical pure-decode steps back to back can ask ``decode_run_limit`` how many such steps are certain to
repeat and apply them at once with ``commit_decode_run``; the result equals stepping one at a time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from halffull.prefix_hash import hash_token_blocks
from halffull.replicas.engine.block_pool import BlockPool, cdiv
from halffull.replicas.engine.policies import Admission, EnginePolicy, FcfsPolicy
from halffull.replicas.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Engine limits. Defaults follow vLLM V1 on a GPU."""

    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 8192
    watermark: float = 0.0
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0
    # vLLM 0.32's scheduler_reserve_full_isl (on by default): admit a waiting request only if blocks for its
    # whole current sequence (after hits) fit now, not just this step's chunk.
    reserve_full_isl: bool = True

    def __post_init__(self):
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError("watermark must be in [0, 1)")


@dataclass(slots=True)
class SchedulerOutput:
    """One step's decisions."""

    num_scheduled_tokens: dict[Request, int] = field(default_factory=dict)
    computed_before: dict[Request, int] = field(default_factory=dict)
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    waiting_blocked: bool = False  # admission stopped at a request that did not fit (or the seq cap)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class Scheduler:
    """Owns the waiting and running queues and the block pool; also serves as the policies' EngineView."""

    def __init__(self, config: SchedulerConfig, policy: EnginePolicy | None = None):
        self.config = config
        self.policy = policy or FcfsPolicy()
        self.pool = BlockPool(config.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order (EngineView.running)
        self.requests: dict[str, Request] = {}
        self.now = 0.0
        self.block_size = config.block_size
        self.num_total_blocks = config.num_blocks
        self.max_model_len = config.max_model_len
        self.watermark_blocks = int(config.watermark * config.num_blocks)
        self._reserve_full_isl = config.reserve_full_isl
        self.num_preemptions = 0
        self.num_steps = 0
        self._admit_seq = 0

    # ---- EngineView ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_of(self, request: Request) -> int:
        return self.pool.num_blocks_of(request)

    def prompt_blocks(self, request: Request) -> int:
        hits = len(self.pool.find_cached_prefix(request)) if request.num_computed_tokens == 0 else 0
        return max(cdiv(request.num_tokens, self.block_size) - hits - self.pool.num_blocks_of(request), 0)

    # ---- request lifecycle ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        total = request.num_prompt_tokens + request.max_tokens  # (num_total_tokens_max)
        if total > self.max_model_len:
            raise ValueError(
                f"request {request.request_id}: prompt {request.num_prompt_tokens} + max_tokens "
                f"{request.max_tokens} exceeds max_model_len {self.max_model_len}"
            )
        if -(-total // self.block_size) > self.num_total_blocks:  # (cdiv)
            raise ValueError(f"request {request.request_id} can never fit in {self.num_total_blocks} KV blocks")
        if not request.block_hashes and request.prompt_token_ids is not None and self.config.enable_prefix_caching:
            request.block_hashes = hash_token_blocks(request.prompt_token_ids, self.block_size)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is; its blocks return to the pool."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.free(request)
        request.status = RequestStatus.ABORTED
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        if now is not None:
            self.now = now
        out = SchedulerOutput({}, {}, [], [])  # (positional: the generated default factories cost more)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted and self.waiting:
            self._schedule_waiting(out, budget)
        self.num_steps += 1
        return out

    def _chunk(self, num_new: int, budget: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < num_new:
            num_new = threshold
        return num_new if num_new < budget else budget  # min(), without the builtin's call cost

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        running, pool, scheduled = self.running, self.pool, out.num_scheduled_tokens
        threshold = self.config.long_prefill_token_threshold
        req_blocks, bs = pool.req_blocks, self.block_size
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            # _chunk, inlined: this loop runs for every running request in every step.
            num_new = request.num_prompt_tokens + request.num_output_tokens - request.num_computed_tokens
            if 0 < threshold < num_new:
                num_new = threshold
            if num_new > budget:
                num_new = budget
            if num_new <= 0:
                i += 1
                continue
            # BlockPool.allocate's fast path, inlined (most decode steps): the last block has room and there
            # is nothing to register.
            held = req_blocks.get(request.request_id)
            computed = request.num_computed_tokens
            if held is not None and not request.block_hashes and computed + num_new <= len(held) * bs:
                scheduled[request] = num_new
                out.computed_before[request] = computed
                budget -= num_new
                i += 1
                continue
            allocated = False
            while True:
                if pool.allocate(request, num_new) is not None:
                    allocated = True
                    break
                victim = self.policy.pick_victim(running, self)
                if victim is None:
                    break  # the policy never preempts: the request waits, in place
                victim_index = running.index(victim)
                del running[victim_index]
                if victim_index < i:
                    i -= 1
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                    out.computed_before.pop(victim)
                self._preempt(victim, out)
                if victim is request:
                    break
            if not allocated:
                break
            scheduled[request] = num_new
            out.computed_before[request] = request.num_computed_tokens
            budget -= num_new
            i += 1
        return budget

    def _release(self, request: Request) -> None:
        """Free a preempted or finished request's blocks, its computed ones registered first.

        vLLM hashes every block as it fills; halffull hashes private blocks (generated tokens, prompts given
        by length) only here, when it can matter: a preempted request finds its KV again, and registered
        blocks go to the free queue's tail (LRU) rather than its head, exactly as in vLLM.
        """
        request.extend_block_hashes(self.block_size, request.num_computed_tokens)
        self.pool.cache_blocks(request, request.num_computed_tokens)
        self.pool.free(request)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self._release(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if not self.waiting:
            return
        order = self.policy.order_waiting(self.waiting, self)
        admitted = out.admitted
        for request in order:
            if budget <= 0:
                break
            if len(self.running) >= self.config.max_num_seqs:
                out.waiting_blocked = True
                break
            if not self._try_admit(request, budget, out):
                out.waiting_blocked = True
                break
            budget -= out.num_scheduled_tokens[request]
        self._remove_admitted(admitted)

    def _try_admit(self, request: Request, budget: int, out: SchedulerOutput) -> bool:
        pool, bs = self.pool, self.block_size
        computed = request.num_computed_tokens
        hits = pool.find_cached_prefix(request) if computed == 0 and request.block_hashes else []
        num_hit = len(hits) * bs
        num_tokens = request.num_prompt_tokens + request.num_output_tokens
        computed += num_hit
        num_new = self._chunk(num_tokens - computed, budget)
        blocks_now, blocks_full, blocks_prompt = pool.blocks_needed_each(
            request, (computed + num_new, request.num_prompt_tokens + request.max_tokens, num_tokens), hits)
        if not self.policy.can_admit(Admission(request, num_hit, num_new, blocks_now, blocks_full, blocks_prompt),
                                     self):
            return False
        # vLLM applies the watermark only when other requests are scheduled this step.
        reserve = self.watermark_blocks if out.num_scheduled_tokens else 0
        if self._reserve_full_isl and blocks_prompt + reserve > pool.num_free_blocks:
            return False
        if pool.allocate(request, num_new, hits, reserve=reserve, needed=blocks_now) is None:
            return False
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
            request.first_admit_time = self.now
        request.num_computed_tokens = computed
        request.status = RequestStatus.RUNNING
        request.admit_seq = self._admit_seq
        self._admit_seq += 1
        self.running.append(request)
        out.num_scheduled_tokens[request] = num_new
        out.computed_before[request] = computed
        out.admitted.append(request)
        return True

    def _remove_admitted(self, admitted: list[Request]) -> None:
        if not admitted:
            return
        waiting = self.waiting
        # Fast path: FCFS admits from the front.
        if len(admitted) == 1 and waiting[0] is admitted[0]:
            waiting.popleft()
            return
        k = len(admitted)
        if k <= len(waiting) and all(waiting[j] is admitted[j] for j in range(k)):
            for _ in range(k):
                waiting.popleft()
            return
        gone = set(map(id, admitted))
        self.waiting = deque(r for r in waiting if id(r) not in gone)

    # ---- after the step ------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, now: float) -> list[Request]:
        """Advance computed tokens, sample one token where computation caught up; return finished requests."""
        self.now = now
        finished = []
        running = RequestStatus.RUNNING
        for request, num in out.num_scheduled_tokens.items():
            if request.status != running:
                continue  # aborted during the step
            request.num_computed_tokens += num
            if request.num_computed_tokens < request.num_prompt_tokens + request.num_output_tokens:
                continue  # partial prefill chunk: nothing sampled
            request.num_output_tokens += 1
            if request.first_token_time is None:
                request.first_token_time = now
            if request.num_output_tokens >= request.output_limit:  # Request.wants_stop, inlined
                finished.append(request)
        for request in finished:
            self._finish(request, now)
        return finished

    def _finish(self, request: Request, now: float) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_time = now
        self.running.remove(request)
        # As _release, minus hashing the private blocks nobody can look up once the request is gone.
        self.pool.free_finished(request, request.num_computed_tokens)
        del self.requests[request.request_id]
        self.policy.on_finished(request)

    def policy_order_stable_until(self) -> float:
        """Time until which the policy's waiting order cannot change by itself (aging bounds)."""
        if not self.waiting:
            return math.inf
        hook = getattr(self.policy, "order_stable_until", None)
        if hook is None:
            return math.inf
        return hook(self.waiting, self)

    # ---- runs of identical decode steps --------------------------------------------------------------
    def decode_run_limit(self, out: SchedulerOutput) -> int:
        """How many steps, counting ``out``'s, are certain to repeat it: same requests, one token each.

        1 means no run. The run ends at the first step in which a request finishes, a block allocation
        would fail (a preemption step), or — for policies whose waiting order is not stable — a block is
        allocated (memory use changes the order).
        """
        running, scheduled = self.running, out.num_scheduled_tokens
        if out.preempted or out.admitted or len(scheduled) != len(running) or not running:
            return 1
        if out.waiting_blocked is False and self.waiting:
            return 1  # budget ran out before admission was tried; keep it simple
        bs, req_blocks = self.block_size, self.pool.req_blocks
        limit = math.inf
        # Per request, the first step index needing a new block (then every bs steps): slots held after step
        # 0's allocation minus computed tokens before step 0 (step i computes token c + i, needs c + i + 1).
        firsts = []
        for request in running:
            generated = request.num_output_tokens
            if scheduled.get(request) != 1 or generated < 1:
                return 1
            left = request.output_limit - generated
            if left < limit:
                limit = left
            firsts.append(len(req_blocks[request.request_id]) * bs - request.num_computed_tokens)
        if self.waiting:
            # A policy whose admission verdict moves with decode progress says for how many steps it holds.
            hook = getattr(self.policy, "decode_steps_stable", None)
            if hook is not None:
                limit = min(limit, hook(self.waiting, self))
        if limit <= 1:
            return 1
        return self._block_limit(limit, firsts)

    def schedule_decode_run(self, now: float) -> tuple[int, int] | None:
        """``schedule(now)`` and ``decode_run_limit`` of its output in one pass, for an executor's commonest
        step: nothing waits and every running request decodes (one token to compute, all of them in budget,
        every block they need free).

        Returns (steps, context): the first step is scheduled exactly as ``schedule`` would (its slots
        allocated in queue order, ``num_steps`` counted), ``steps`` >= 1 steps are certain to repeat it
        (``decode_run_limit``), and ``context`` is the running requests' computed tokens before it. Apply
        them with ``commit_decode_run(None, k, now)``. None, with nothing changed, when the case does not
        hold: call ``schedule``.
        """
        running = self.running
        if self.waiting or not running or len(running) > self.config.max_num_batched_tokens:
            return None
        bs, req_blocks = self.block_size, self.pool.req_blocks
        limit = math.inf
        context = num_crossing = 0
        registering = False
        for request in running:
            computed, generated = request.num_computed_tokens, request.num_output_tokens
            if request.num_prompt_tokens + generated - computed != 1 or generated < 1:
                return None
            left = request.output_limit - generated
            if left < limit:
                limit = left
            context += computed
            if computed >= len(req_blocks[request.request_id]) * bs:
                num_crossing += 1  # its first token needs a new block
            if request.block_hashes:
                registering = True
        pool = self.pool
        if num_crossing or registering:
            if num_crossing > pool.num_free_blocks:
                return None  # some allocation fails: schedule() preempts
            # schedule()'s running loop for one token each: its fast path, else pool.allocate (which cannot
            # fail: one block per crossing request, counted above), in queue order.
            for request in running:
                if request.block_hashes or request.num_computed_tokens >= len(req_blocks[request.request_id]) * bs:
                    pool.allocate(request, 1)
        self.now = now
        self.num_steps += 1
        if limit <= 1:
            return 1, context
        # A request crosses at most limit // bs + 1 block boundaries in the run: with that many free blocks
        # each, no allocation can fail (decode_run_limit's answer without counting them).
        if pool.num_free_blocks >= len(running) * (limit // bs + 1):
            return limit, context
        firsts = [len(req_blocks[r.request_id]) * bs - r.num_computed_tokens for r in running]
        return self._block_limit(limit, firsts), context

    def _block_limit(self, limit: int, firsts: list[int]) -> int:
        """Cap ``limit`` so every block allocation inside the run succeeds (and, if unstable, at the first),
        given each running request's first step needing a block."""
        bs = self.block_size
        num_crossings = 0
        for first in firsts:
            if first < limit:
                num_crossings += (limit - 1 - first) // bs + 1  # len(range(first, limit, bs))
        if not num_crossings:
            return limit
        if self.waiting and not self.policy.stable_order:
            # Admission in a step runs after that step's allocations, so the order may already change there.
            return min(limit, min(firsts))
        free = self.pool.num_free_blocks
        if num_crossings > free:
            crossings = sorted(step for first in firsts for step in range(first, limit, bs))
            return min(limit, crossings[free]) or 1
        return limit

    def commit_decode_run(self, out: SchedulerOutput | None, num_steps: int, now: float) -> list[Request]:
        """Apply ``num_steps`` decode steps (``out`` being the first; None when it came from
        ``schedule_decode_run``) and return finished requests."""
        if num_steps <= 1 and out is not None:
            return self.update_from_output(out, now)
        self._allocate_run(num_steps)
        finished = []
        for request in self.running:
            request.num_computed_tokens += num_steps
            request.num_output_tokens += num_steps
            if request.num_output_tokens >= request.output_limit:  # Request.wants_stop, inlined
                finished.append(request)
        self.num_steps += num_steps - 1
        self.now = now
        for request in finished:
            self._finish(request, now)
        return finished

    def _allocate_run(self, num_steps: int) -> None:
        """Allocate blocks for steps 1..num_steps-1 in exactly the order stepping would (step, then queue).

        Step i (0 = the step already scheduled, whose slots are allocated) computes token c + i of a request
        with c computed tokens; its table holds exactly the blocks for c + 1 tokens, so it first runs out at a
        step ``first`` in 1..block_size and then every block_size steps. The order is therefore round by
        round, each round in (first, queue index) order. The blocks are taken from the free queue in one go
        and dealt out in that order.
        """
        bs = self.block_size
        req_blocks = self.pool.req_blocks
        due = []  # (first, queue index, block table, blocks over the run)
        total = 0
        for index, request in enumerate(self.running):
            blocks = req_blocks[request.request_id]
            first = len(blocks) * bs - request.num_computed_tokens
            if first < num_steps:
                count = (num_steps - 1 - first) // bs + 1
                due.append((first, index, blocks, count))
                total += count
        if not due:
            return
        if len(due) == 1:  # one request takes blocks (common at small batches): all of them, in order
            due[0][2].extend(self.pool.take(total))
            return
        due.sort()
        taken = self.pool.take(total)
        # Every first step lies within one block_size, so all of them take part in the first `rounds` rounds
        # and a prefix of them (in order) in one more: request p gets taken[p], taken[p + n], ... then maybe
        # taken[rounds * n + p].
        n = len(due)
        rounds = (num_steps - 1 - due[-1][0]) // bs + 1
        for p, (_, _, blocks, count) in enumerate(due):
            blocks += taken[p : rounds * n : n]
            if count > rounds:
                blocks.append(taken[rounds * n + p])
