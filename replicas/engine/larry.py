"""LARRY: memory-aware engine scheduling (project definition after Kossmann et al.; DESIGN.md §4.2).

Three independent elements, each switchable for ablations:

1. Pressure-aware ordering with aging (``pressure_order``). Memory pressure ``u`` = fraction of KV blocks in
   use. Below ``u_low`` waiting requests keep FCFS order. At or above it they are ordered by

       score_r = m_r * f(u) - wait_r / tau            (smallest first; ties by arrival)
       f(u)    = min(1, (u - u_low) / (1 - u_low))    (0 at u_low, 1 at full memory)

   ``m_r`` = KV blocks the request needs to hold its tokens after prefix-cache hits, ``wait_r`` = seconds
   since arrival, ``tau`` = seconds of waiting worth one block. Large requests are delayed under pressure and
   never starved: every second of waiting is worth 1/tau blocks, and a request that has waited
   ``max_wait_s`` goes to the front (oldest first) whatever its size.

2. Growth reserve at admission (``growth_reserve``). A request is admitted only if

       free_blocks - reserve >= m_r  (blocks for its whole prompt after hits, not just this step's chunk)
       reserve = sum over running r of blocks r needs to grow ``horizon_tokens`` more tokens
                 (capped at r's prompt + max_tokens)

   so admissions do not eat the memory the running requests are about to decode into (the cause of
   admit-then-preempt thrashing under vLLM's greedy admission). ``horizon_tokens`` defaults to one block.

3. Least-progress victim (``least_progress_victim``). When memory runs out, preempt the running request with
   the fewest computed tokens (least work thrown away by recompute); ties go to the most recently admitted.
   Off: vLLM's choice, the last admitted.

With all three off LARRY is exactly fcfs. Parameters (``LarryParams``):

  u_low              0.75   pressure threshold, in [0, 1)
  tau                0.05   seconds of waiting worth one KV block, > 0
  max_wait_s         5.0    hard aging bound, > 0
  horizon_tokens     None   growth reserve horizon in tokens (None: one block)
  pressure_order, growth_reserve, least_progress_victim    True

The policy reads only RequestLike / EngineView (replicas/engine/policies.py), so the same object runs in the
engine core and inside vLLM's scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from halffull.replicas.engine.policy_base import Admission, EnginePolicy, EngineView, RequestLike


@dataclass(frozen=True)
class LarryParams:
    u_low: float = 0.75
    tau: float = 0.05
    max_wait_s: float = 5.0
    horizon_tokens: int | None = None
    pressure_order: bool = True
    growth_reserve: bool = True
    least_progress_victim: bool = True

    def __post_init__(self):
        # Written as "not (valid)" so that NaN, which fails every comparison, is rejected too.
        if not 0.0 <= self.u_low < 1.0:
            raise ValueError(f"u_low must be in [0, 1), got {self.u_low}")
        if not (self.tau > 0 and self.max_wait_s > 0):
            raise ValueError(f"tau and max_wait_s must be > 0, got {self.tau}, {self.max_wait_s}")
        if self.horizon_tokens is not None and self.horizon_tokens < 0:
            raise ValueError("horizon_tokens must be >= 0")


def pressure(view: EngineView) -> float:
    return 1.0 - view.num_free_blocks / view.num_total_blocks


def pressure_weight(u: float, u_low: float) -> float:
    """f(u): 0 at u_low, rising linearly to 1 at full memory."""
    return min(1.0, max(0.0, (u - u_low) / (1.0 - u_low)))


class LarryPolicy(EnginePolicy):
    name = "larry"
    Params = LarryParams

    def __init__(self, params: LarryParams | None = None):
        self.params = params or LarryParams()
        # Order depends on memory use when pressure ordering is on; the simulator then stops decode runs at
        # the first block allocation.
        self.stable_order = not self.params.pressure_order

    # ---- 1. ordering ---------------------------------------------------------------------------------
    def order_waiting(self, waiting: Sequence[RequestLike], view: EngineView) -> Sequence[RequestLike]:
        p = self.params
        if not p.pressure_order:
            return waiting
        u = pressure(view)
        if u < p.u_low:
            return waiting
        f, now, tau, max_wait = pressure_weight(u, p.u_low), view.now, p.tau, p.max_wait_s

        def key(r: RequestLike) -> tuple:
            wait = now - r.arrival_time
            if wait >= max_wait:
                return (0, r.arrival_time, 0.0)  # starving: front, oldest first
            return (1, view.prompt_blocks(r) * f - wait / tau, r.arrival_time)

        return sorted(waiting, key=key)

    def order_stable_until(self, waiting: Sequence[RequestLike], view: EngineView) -> float:
        """Next time a waiting request crosses ``max_wait_s`` (the only way time alone changes the order).

        Between such crossings every waiting request ages at the same rate, so ``wait / tau`` shifts all
        scores equally and the order holds.
        """
        if not self.params.pressure_order:
            return math.inf
        now, max_wait = view.now, self.params.max_wait_s
        pending = [r.arrival_time + max_wait for r in waiting if now - r.arrival_time < max_wait]
        return min(pending, default=math.inf)

    # ---- 2. admission --------------------------------------------------------------------------------
    def can_admit(self, admission: Admission, view: EngineView) -> bool:
        if not self.params.growth_reserve:
            return True
        # m_r is the whole prompt after hits: admitting a first chunk that cannot grow into its prompt
        # only sets up a preemption.
        return view.num_free_blocks - self.growth_reserve(view) >= admission.blocks_prompt

    def growth_reserve(self, view: EngineView) -> int:
        bs = view.block_size
        horizon = bs if self.params.horizon_tokens is None else self.params.horizon_tokens
        total = 0
        for r in view.running:
            target = min(r.num_tokens + horizon, r.num_prompt_tokens + r.max_tokens)
            total += max(-(-target // bs) - view.num_blocks_of(r), 0)
        return total

    # ---- 3. victim -----------------------------------------------------------------------------------
    def pick_victim(self, running: Sequence[RequestLike], view: EngineView) -> RequestLike | None:
        if not self.params.least_progress_victim:
            return running[-1]
        # Scan from the back so that among equals the most recently admitted wins.
        best = running[-1]
        for r in reversed(running):
            if r.num_computed_tokens < best.num_computed_tokens:
                best = r
        return best
