"""LARRY: memory-aware engine scheduling (project definition after Kossmann et al.; DESIGN.md §4.2).

Seven elements, each switchable for ablations (defaults and why: below the parameter table):

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

Lifetime planning (2026-12, for long-output / reasoning workloads, where a one-block reserve still thrashes:
each running request will still grow by a thousand tokens). The policy learns output lengths from finished
requests only (``on_finished``; a SurvivalLengthEstimator, router/estimate.py) and from each request's
``max_tokens``; it never reads the true length. For a request with ``n`` tokens, ``g`` of them generated:

       E(g)  = expected final output length given g so far (mean of the observed lengths >= g's bucket)
       d_r   = min(max_tokens, ceil(g' + growth_scale * (E(g') - g'))) - g, at least 1 (0 once g reaches
               max_tokens): expected remaining decode tokens, with g' = max(g, blocks held * block_size -
               prompt) for running requests (g for waiting ones): g rounded up to its blocks, so that
               n + d_r changes only when the request takes a block
       M_r   = d_r * (n + d_r / 2) / block_size                            expected remaining memory-time
                                                                            (block-steps)

4. Lifetime reserve (``lifetime_reserve``; replaces element 2 when on). Running request r, expected to
   live d_r more steps, holds about (n_r + t + bs - 1) / bs blocks t steps from now, then none. Admit w
   (held_w = its prompt blocks found in cache, d_w from E(0)) only if the expected peak need fits now (or
   nothing runs):

       need(t) = (sum over r alive at t (d_r > t) of n_r + t + bs - 1) // bs  -  sum over all r of held_r
       admit iff max over t in {d_k - 1} of need(t) <= free_blocks        (running and w together)

   It credits the blocks that finishing requests give back, so it admits far more than reserving every
   request's final size (no_preempt), and far less than a one-block horizon when outputs are long.
5. Memory-time order (``memory_time_order``): under pressure the order's size term is M_w / E(0) (blocks
   held for a typical request's lifetime) instead of the prompt's blocks, so a short prompt with a long
   expected output is no longer "small". Aging (tau, max_wait_s) is unchanged: nothing starves.
6. Memory-time victim (``memory_time_victim``; replaces element 3 when on): preempt the running request with
   the largest M_r / (computed tokens + block_size): the most expected memory relief per token of recompute
   thrown away (pure M_r, tried first, cost single-replica TTFT: the longest requests are the dearest to
   recompute). Ties: the most recently admitted.
7. Queue order (``queue_order``; LARRY's "system load" half): without memory pressure (u < u_low, or
   pressure ordering off) but with at least ``queue_tokens_low`` tokens waiting to be computed, waiting
   requests are ordered by their remaining prompt work with the same aging rule:

       score_r = m_r - wait_r / queue_tau     (m_r = prompt blocks after hits; smallest first)

   and a request that waited ``queue_max_wait_s`` goes to the front. Shortest-remaining-prompt-first cuts
   the mean wait of a prefill-bound queue; the bound keeps the long prompts' wait below the TTFT SLO.

With all elements off LARRY is exactly fcfs. Parameters (``LarryParams``):

  u_low                  0.75   pressure threshold, in [0, 1)
  tau                    0.05   seconds of waiting worth one KV block, > 0
  max_wait_s             5.0    hard aging bound, > 0
  horizon_tokens         None   growth reserve horizon in tokens (None: one block)
  growth_scale           1.0    multiplies expected remaining growth (> 0; < 1 admits more, > 1 preempts less)
  prior_output_tokens    256.0  E before enough requests finished (tokens, > 0)
  plan_horizon_tokens    None   element 4 plans this many tokens ahead at most (None: whole lifetimes)
  queue_tokens_low       8192   element 7 acts from this many waiting tokens (>= 0; one H100 step budget)
  queue_tau              0.05   element 7's seconds of waiting worth one block, > 0
  queue_max_wait_s       1.0    element 7's hard aging bound, > 0 (half the 2 s TTFT SLO)
  pressure_order, growth_reserve, least_progress_victim, memory_time_order, memory_time_victim,
  queue_order                                                                                    True
  lifetime_reserve                                                                               False

Why (4 H100 x Llama-3-8B, simulator; docs/results/long_output.md has the tables and commands):
- 5 and 6 on: on the shipped long-output trace at its reference load (x1.05) sal+larry preempts 0.006-0.036
  times per request instead of 0.088 (pow2+fcfs: 0.247) at the same TTFT (mean 0.37-0.38 s, p99 11-13 s vs
  11.2 s), and they change nothing on Azure conv x15 or Mooncake x4.5 (identical runs). The victim's
  recompute-cost denominator: pure M_r raised single-replica mean TTFT 10-20 % over fcfs (tests/test_larry.py
  workload), the ratio keeps it within -1 %..+1 % on two of three seeds.
- 4 off: it all but ends preemptions (0.001 per request) but requests then wait for memory instead of being
  preempted later: sal+larry mean TTFT 0.37 -> 0.74 s, p99 11.2 -> 28.4 s at x1.05; growth_scale 0.5 and
  plan_horizon_tokens 512 / 2048 did not change that (pow2, x1.0: p99 4.2 / 5.9 / 5.9 s vs fcfs 0.08 s).
- 7 on: Azure code at its reference load (x2.7, 4,000 requests) sal+larry mean TTFT 0.211 -> 0.191 s
  (pow2+fcfs 0.235 s: 0.90x -> 0.81x), p99 unchanged (0.95x); Mooncake x4.5 mean 0.274 -> 0.261 s, p99
  0.670 -> 0.651 s; Azure conv x15 mean 0.094 s both, p99 0.261 -> 0.267 s; long-output trace unchanged
  (memory pressure rules there). queue_max_wait_s 2 gave mean 0.67x but p99 over the SLO (x2.6).
- u_low, tau and max_wait_s are kept from the short-output traces (docs/results/report.md).

The policy reads only RequestLike / EngineView (replicas/engine/policy_base.py), so the same object runs in the
engine core and inside vLLM's scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from halffull.replicas.engine.policy_base import Admission, EnginePolicy, EngineView, RequestLike
from halffull.router.estimate import SurvivalLengthEstimator


@dataclass(frozen=True)
class LarryParams:
    u_low: float = 0.75
    tau: float = 0.05
    max_wait_s: float = 5.0
    horizon_tokens: int | None = None
    growth_scale: float = 1.0
    plan_horizon_tokens: int | None = None
    prior_output_tokens: float = 256.0
    pressure_order: bool = True
    growth_reserve: bool = True
    least_progress_victim: bool = True
    lifetime_reserve: bool = False
    memory_time_order: bool = True
    memory_time_victim: bool = True
    queue_order: bool = True
    queue_tokens_low: int = 8192
    queue_tau: float = 0.05
    queue_max_wait_s: float = 1.0

    def __post_init__(self):
        # Written as "not (valid)" so that NaN, which fails every comparison, is rejected too.
        if not 0.0 <= self.u_low < 1.0:
            raise ValueError(f"u_low must be in [0, 1), got {self.u_low}")
        if not (self.tau > 0 and self.max_wait_s > 0):
            raise ValueError(f"tau and max_wait_s must be > 0, got {self.tau}, {self.max_wait_s}")
        if self.horizon_tokens is not None and self.horizon_tokens < 0:
            raise ValueError("horizon_tokens must be >= 0")
        if not (self.queue_tau > 0 and self.queue_max_wait_s > 0 and self.queue_tokens_low >= 0):
            raise ValueError("queue_tau and queue_max_wait_s must be > 0, queue_tokens_low >= 0")
        if not (self.growth_scale > 0 and self.prior_output_tokens > 0):
            raise ValueError(f"growth_scale and prior_output_tokens must be > 0, got {self.growth_scale}, "
                             f"{self.prior_output_tokens}")


def pressure(view: EngineView) -> float:
    return 1.0 - view.num_free_blocks / view.num_total_blocks


def pressure_weight(u: float, u_low: float) -> float:
    """f(u): 0 at u_low, rising linearly to 1 at full memory."""
    return min(1.0, max(0.0, (u - u_low) / (1.0 - u_low)))


def queued_prompt_tokens(waiting: Sequence[RequestLike]) -> int:
    """Tokens the waiting requests still have to compute (prompt, plus generated ones after a preemption)."""
    return sum(r.num_tokens - r.num_computed_tokens for r in waiting)


def _aged_order(waiting, size, f: float, now: float, tau: float, max_wait: float) -> list:
    """Smallest ``size(r) * f - wait / tau`` first (ties by arrival); a request that waited ``max_wait``
    seconds goes to the front, oldest first, whatever its size."""

    def key(r: RequestLike) -> tuple:
        wait = now - r.arrival_time
        if wait >= max_wait:
            return (0, r.arrival_time, 0.0)  # starving: front, oldest first
        return (1, size(r) * f - wait / tau, r.arrival_time)

    return sorted(waiting, key=key)


class LarryPolicy(EnginePolicy):
    name = "larry"
    Params = LarryParams

    def __init__(self, params: LarryParams | None = None):
        self.params = p = params or LarryParams()
        self.estimator = SurvivalLengthEstimator(prior_mean=p.prior_output_tokens)
        # Order depends on memory use when pressure ordering is on, and the lifetime reserve's verdict on the
        # blocks the running requests hold; the simulator then stops decode runs at the first block allocation.
        self.stable_order = not (p.pressure_order or p.lifetime_reserve or p.queue_order)

    # ---- what it learns, and the expectations built on it ---------------------------------------------
    def on_finished(self, request: RequestLike) -> None:
        self.estimator.observe(request.num_tokens - request.num_prompt_tokens)

    def expected_remaining(self, r: RequestLike, view: EngineView) -> int:
        """d_r: expected decode tokens still to come, capped by max_tokens (module docstring)."""
        generated = r.num_tokens - r.num_prompt_tokens
        if generated >= r.max_tokens:
            return 0
        held = view.num_blocks_of(r)
        # g': generated rounded up to the blocks held, so d_r moves only when a block is taken.
        g = max(generated, held * view.block_size - r.num_prompt_tokens) if held else generated
        growth = self.params.growth_scale * (self.estimator.expected_total(g) - g)
        return max(min(r.max_tokens - generated, math.ceil(g + growth - generated)), 1)

    def memory_time(self, r: RequestLike, view: EngineView) -> float:
        """M_r: expected remaining block-steps."""
        d = self.expected_remaining(r, view)
        return d * (r.num_tokens + d / 2) / view.block_size

    # ---- 1. ordering ---------------------------------------------------------------------------------
    def order_waiting(self, waiting: Sequence[RequestLike], view: EngineView) -> Sequence[RequestLike]:
        p = self.params
        u = pressure(view) if p.pressure_order else 0.0
        if p.pressure_order and u >= p.u_low:
            if p.memory_time_order:
                typical = self.estimator.expected_total(0)
                size = lambda r: self.memory_time(r, view) / typical  # noqa: E731
            else:
                size = view.prompt_blocks
            return _aged_order(waiting, size, pressure_weight(u, p.u_low), view.now, p.tau, p.max_wait_s)
        if p.queue_order and queued_prompt_tokens(waiting) >= p.queue_tokens_low:
            # System load without memory pressure: shortest remaining prompt work first, aged.
            return _aged_order(waiting, view.prompt_blocks, 1.0, view.now, p.queue_tau, p.queue_max_wait_s)
        return waiting

    def order_stable_until(self, waiting: Sequence[RequestLike], view: EngineView) -> float:
        """Next time a waiting request crosses a hard aging bound (the only way time alone changes an order).

        Between such crossings every waiting request ages at the same rate, so ``wait / tau`` shifts all
        scores equally and the order holds.
        """
        p = self.params
        bounds = [b for on, b in ((p.pressure_order, p.max_wait_s), (p.queue_order, p.queue_max_wait_s)) if on]
        now = view.now
        pending = [r.arrival_time + b for b in bounds for r in waiting if now - r.arrival_time < b]
        return min(pending, default=math.inf)

    # ---- 2. admission --------------------------------------------------------------------------------
    def can_admit(self, admission: Admission, view: EngineView) -> bool:
        if self.params.lifetime_reserve:
            # Nothing running: memory can only free up by waiting, so waiting protects nobody (liveness).
            return not view.running or self.lifetime_need(admission, view) <= view.num_free_blocks
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

    def lifetime_need(self, admission: Admission | None, view: EngineView) -> int:
        """max over t of need(t) (module docstring, element 4), with the admitted request if given."""
        if admission is None:
            peak, held = self._peak(view, None, 0)
        else:
            w = admission.request
            # its blocks found in the cache need no free block now
            peak, held = self._peak(view, w, max(-(-w.num_tokens // view.block_size) - admission.blocks_prompt, 0))
        return peak // view.block_size - held

    def _peak(self, view: EngineView, w: RequestLike | None, held_w: int) -> tuple[int, int]:
        """(max over k of X_k, blocks held), X_k = sum over alive n + alive * (d_k - 1 + bs - 1): the peak
        in tokens, so that need = X // bs - held (>= the sum of the cdivs; equal for one request)."""
        bs = view.block_size
        items = []  # (d_r, n_r)
        held_total = held_w
        for r in view.running:
            items.append((self.expected_remaining(r, view), r.num_tokens))
            held_total += view.num_blocks_of(r)
        if w is not None:
            items.append((self.expected_remaining(w, view), w.num_tokens))
        items.sort(reverse=True)
        peak = sum_n = alive = 0
        horizon = self.params.plan_horizon_tokens
        # Sweep finish times from the latest down: at t = d_k - 1 the alive set is every r with d_r >= d_k.
        for d, n in items:
            if d <= 0:
                break  # finishing this step: holds nothing later
            if horizon is not None and d > horizon + 1:
                d = horizon + 1  # alive past the horizon: counted at its end
            sum_n += n
            alive += 1
            x = sum_n + alive * (d - 1 + bs - 1)
            if x > peak:
                peak = x
        return peak, held_total

    def decode_steps_stable(self, waiting: Sequence[RequestLike], view: EngineView) -> float:
        """Decode steps (no block taken, nothing finished) over which the lifetime verdict cannot turn to
        "admit", for the simulator's runs (Scheduler.decode_run_limit).

        While the sweep's order holds, each X_k changes by at most one token per step (the running requests'
        n_r + d_r are constant between block allocations; the waiting head w does not progress, so terms
        holding w lose one token a step). So need stays above free for X* - (free + held + 1) * bs steps. The
        order changes when a running request's d_r falls below d_w.
        """
        if not self.params.lifetime_reserve or not waiting or not view.running:
            return math.inf
        w = self.order_waiting(waiting, view)[0]
        bs = view.block_size
        d_w = self.expected_remaining(w, view)
        gaps = [d - d_w for d in (self.expected_remaining(r, view) for r in view.running) if d > d_w]
        held_w = max(-(-w.num_tokens // bs) - view.prompt_blocks(w), 0)
        peak, held = self._peak(view, w, held_w)
        steps = peak - (view.num_free_blocks + held + 1) * bs + 1
        return max(min(steps, min(gaps, default=math.inf)), 1)

    # ---- 3. victim -----------------------------------------------------------------------------------
    def pick_victim(self, running: Sequence[RequestLike], view: EngineView) -> RequestLike | None:
        if self.params.memory_time_victim:
            # Relief per token of recompute lost; scanned from the back so that among equals the most recently
            # admitted wins.
            bs = view.block_size
            return max(reversed(running), key=lambda r: self.memory_time(r, view) / (r.num_computed_tokens + bs))
        if not self.params.least_progress_victim:
            return running[-1]
        # Scan from the back so that among equals the most recently admitted wins.
        best = running[-1]
        for r in reversed(running):
            if r.num_computed_tokens < best.num_computed_tokens:
                best = r
        return best
