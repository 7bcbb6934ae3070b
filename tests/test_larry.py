"""LARRY (replicas/engine/larry.py), one element at a time, driven step by step with exact counts.

Unless a test says otherwise the engine has block_size 4, a 64-token budget, 8 seqs and max_model_len 128; the
number of blocks is given per test. Steps are driven by hand (``schedule(now)`` + ``update_from_output``) and
each step is checked as a row ``(scheduled, admitted, preempted, finished, free blocks after the step)``.
Notation in comments: "slot k" = the k-th KV slot a request needs (computing token index k-1); a request
holding n blocks has 4n slots; "n" = a request's token count (prompt + sampled).

``larry(...)`` builds LARRY with every element off except the ones named, so each element is tested alone;
``LarryPolicy()`` is the full policy. Policy hooks are also checked directly against small fakes (``View``,
``Req``) where the arithmetic of a formula is the point.

The simulated-replica tests (no starvation, jump == stepping, preemptions vs fcfs) run on the virtual clock of
replicas/sim/virtual.py with the H100 / Llama-3-8B latency profile and 16-token blocks.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import statistics
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import halffull.replicas.engine.larry as larry_module
from halffull.replicas.engine.block_pool import cdiv
from halffull.replicas.engine.larry import LarryParams, LarryPolicy, pressure_weight
from halffull.replicas.engine.policies import Admission, FcfsPolicy, engine_policy_names, make_engine_policy
from halffull.replicas.engine.request import Request
from halffull.replicas.engine.scheduler import Scheduler, SchedulerConfig
from halffull.replicas.sim.profile_model import latency_model
from halffull.replicas.sim.virtual import SimReplica

ALL_OFF = dict(pressure_order=False, growth_reserve=False, least_progress_victim=False, lifetime_reserve=False,
               memory_time_order=False, memory_time_victim=False, queue_order=False)


# ---- builders -------------------------------------------------------------------------------------------

def larry(**kw) -> LarryPolicy:
    """LARRY with every element off except those set in ``kw`` (other params pass through)."""
    return LarryPolicy(LarryParams(**{**ALL_OFF, **kw}))


def make(policy=None, num_blocks: int = 10, budget: int = 64, max_seqs: int = 8, max_len: int = 128) -> Scheduler:
    config = SchedulerConfig(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget,
                             max_num_seqs=max_seqs, max_model_len=max_len)
    return Scheduler(config, policy or FcfsPolicy())


def step(sched: Scheduler, now: float) -> tuple:
    """One step; returns (scheduled {id: tokens}, admitted ids, preempted ids, finished ids, free blocks)."""
    out = sched.schedule(now)
    finished = sched.update_from_output(out, now)
    sched.pool.check_invariants()
    return ({r.request_id: n for r, n in out.num_scheduled_tokens.items()}, [r.request_id for r in out.admitted],
            [r.request_id for r in out.preempted], [r.request_id for r in finished], sched.num_free_blocks)


def trace(sched: Scheduler, arrivals: dict[int, list[tuple]], num_steps: int) -> list[tuple]:
    """Step k (1-based) runs at now = k after adding ``arrivals[k]`` (Request args); returns the rows."""
    rows = []
    for k in range(1, num_steps + 1):
        for args in arrivals.get(k, ()):
            sched.add_request(Request(*args))
        rows.append(step(sched, float(k)))
    return rows


@dataclass
class Req:
    """A RequestLike for direct hook tests."""

    request_id: str
    num_prompt_tokens: int
    arrival_time: float = 0.0
    max_tokens: int = 8
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    priority: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


@dataclass
class View:
    """An EngineView with 10 blocks of 4 tokens; ``held`` = blocks per running request, ``hit_blocks`` = prefix
    hits per waiting request."""

    now: float = 0.0
    num_free_blocks: int = 10
    num_total_blocks: int = 10
    block_size: int = 4
    max_model_len: int = 128
    running: list = field(default_factory=list)
    held: dict = field(default_factory=dict)
    hit_blocks: dict = field(default_factory=dict)

    def num_blocks_of(self, r) -> int:
        return self.held.get(r.request_id, 0)

    def prompt_blocks(self, r) -> int:
        return cdiv(r.num_tokens, self.block_size) - self.hit_blocks.get(r.request_id, 0)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


# ---- 1. pressure-aware ordering with aging -------------------------------------------------------------

# Fake view: 10 blocks; L = 20-token prompt (5 blocks), S = 4 tokens (1 block); queue order as listed.
# Params unless overridden: u_low 0.5, tau 1 s, max_wait_s 10 s. f(u) = (u - 0.5) / 0.5.
# score = blocks * f - wait / tau, smallest first; starving (wait >= max_wait) first, oldest first.
ORDER = {
    # u = 0.4 < u_low: queue order, although S is smaller.
    "below-u_low-fcfs": (6, 2.0, [("L", 20, 0.0), ("S", 4, 1.0)], {}, ["L", "S"]),
    # u = 0.5 = u_low: pressure order with f = 0, so only waiting counts: L (-2) before S (-1).
    "at-u_low-f-zero": (5, 2.0, [("L", 20, 0.0), ("S", 4, 1.0)], {}, ["L", "S"]),
    # u = 0.8, f = 0.6: L 3 - 2 = 1, S 0.6 - 1 = -0.4.
    "pressure-small-first": (2, 2.0, [("L", 20, 0.0), ("S", 4, 1.0)], {}, ["S", "L"]),
    # u = 1, f = 1: L 5 - 2 = 3, S 1 - 1 = 0.
    "full-small-first": (0, 2.0, [("L", 20, 0.0), ("S", 4, 1.0)], {}, ["S", "L"]),
    # f = 1: L waited 4.5 s longer than S, more than its 4 extra blocks * tau: L 5 - 5 = 0, S 1 - 0.5 = 0.5.
    "aging-large-ahead": (0, 5.0, [("L", 20, 0.0), ("S", 4, 4.5)], {}, ["L", "S"]),
    # Only 3.5 s longer (< 4 blocks * tau): L 5 - 5 = 0, S 1 - 1.5 = -0.5.
    "aging-not-enough": (0, 5.0, [("L", 20, 0.0), ("S", 4, 3.5)], {}, ["S", "L"]),
    # tau 2 halves what waiting is worth: L 5 - 2.5 = 2.5, S 1 - 0.25 = 0.75.
    "aging-tau-2": (0, 5.0, [("L", 20, 0.0), ("S", 4, 4.5)], {"tau": 2.0}, ["S", "L"]),
    # Equal scores (L 5 - 4 = 1, M 3 - 2 = 1) break ties by arrival, not queue order.
    "tie-by-arrival": (0, 4.0, [("M", 12, 2.0), ("L", 20, 0.0)], {}, ["L", "M"]),
    # Score counts blocks after prefix hits: P has a 24-token prompt of which 5 blocks hit (1 left to compute).
    "blocks-after-hits": (0, 2.0, [("S", 8, 1.0), ("P", 24, 1.0)], {"hits": {"P": 5}}, ["P", "S"]),
    # Aging off (tau 1000): L waited exactly max_wait_s = 10 s, so it goes to the front whatever its size.
    "max-wait-front": (0, 10.5, [("S", 4, 10.25), ("L", 20, 0.5)], {"tau": 1000.0}, ["L", "S"]),
    # 9.75 s is not enough: L 5 - 0.00975, S 1 - 0.00025.
    "max-wait-not-yet": (0, 10.25, [("S", 4, 10.0), ("L", 20, 0.5)], {"tau": 1000.0}, ["S", "L"]),
    # Several starving requests: oldest first, whatever their size; the non-starving one after them.
    "starving-oldest-first": (
        0, 20.0, [("S", 4, 19.0), ("M", 12, 5.0), ("L", 20, 1.0), ("T", 8, 3.0)], {"tau": 1000.0},
        ["L", "T", "M", "S"]),
    # Element off: queue order under full pressure.
    "element-off": (0, 2.0, [("L", 20, 0.0), ("S", 4, 1.0)], {"pressure_order": False}, ["L", "S"]),
}


@pytest.mark.parametrize("free,now,queue,kw,expected", ORDER.values(), ids=ORDER.keys())
def test_order_waiting(free, now, queue, kw, expected):
    kw = dict(kw)
    hits = kw.pop("hits", {})
    params = {"u_low": 0.5, "tau": 1.0, "max_wait_s": 10.0, "pressure_order": True, **kw}
    policy = larry(**params)
    waiting = [Req(rid, prompt, arrival) for rid, prompt, arrival in queue]
    view = View(now=now, num_free_blocks=free, hit_blocks=hits)
    assert ids(policy.order_waiting(waiting, view)) == expected


@pytest.mark.parametrize("u,expected", [(0.3, 0.0), (0.5, 0.0), (0.75, 0.5), (1.0, 1.0)], ids=str)
def test_pressure_weight(u, expected):
    assert pressure_weight(u, 0.5) == pytest.approx(expected)


# Step-driven: 20 blocks. Holder H (prompt 63: 16 blocks) is admitted at step 1 (now 0); at step 2 (now T) it
# computes slot 64, still within 16 blocks, so u = 0.8 and 4 blocks are free. L (prompt 20: 5 blocks) cannot
# fit; S (prompt 4: 1 block) can. fcfs order means L blocks the queue (head-of-line): nobody is admitted.
# Params unless overridden: u_low 0.5 (f = 0.6), tau 1, max_wait_s 10. Scores: L 3 - wait_L, S 0.6 - wait_S.
STEP_ORDER = {
    "fcfs-head-of-line": (FcfsPolicy(), 3.0, 3.5, 4.0, []),
    "element-off-head-of-line": (larry(), 3.0, 3.5, 4.0, []),
    # u = 0.8 < u_low 0.85: FCFS.
    "below-u_low": (larry(pressure_order=True, u_low=0.85, tau=1.0), 3.0, 3.5, 4.0, []),
    # u = 0.8 = u_low: pressure order with f = 0, so the longest wait (L) goes first.
    "at-u_low-oldest-first": (larry(pressure_order=True, u_low=0.8, tau=1.0), 3.0, 3.5, 4.0, []),
    # L 3 - 1 = 2, S 0.6 - 0.5 = 0.1: S goes first and fits; L then does not.
    "above-u_low-small-first": (larry(pressure_order=True, u_low=0.5, tau=1.0), 3.0, 3.5, 4.0, ["S"]),
    # L waited 3 s longer than S (> 4 blocks * f * tau = 2.4 s): L 3 - 3.5 = -0.5, S 0.1; L blocks the queue.
    "aging-large-first": (larry(pressure_order=True, u_low=0.5, tau=1.0), 0.5, 3.5, 4.0, []),
    # Aging off (tau 1000), max_wait_s 3: L has waited exactly 3 s at now 4.
    "max-wait-front": (larry(pressure_order=True, u_low=0.5, tau=1000.0, max_wait_s=3.0), 1.0, 3.5, 4.0, []),
    "max-wait-not-yet": (larry(pressure_order=True, u_low=0.5, tau=1000.0, max_wait_s=3.0), 1.0, 3.5, 3.75, ["S"]),
    # Prompt blocks with the growth reserve (the full policy before memory-time order): H's reserve
    # (cdiv(64 + 4, 4) - 16 = 1 block) leaves room for S.
    "prompt-order-reserve-small-first": (
        larry(pressure_order=True, growth_reserve=True, u_low=0.5, tau=1.0), 3.0, 3.5, 4.0, ["S"]),
    # The full policy sizes by memory-time / E(0): L 4 * (20 + 2) / 4 / 256 = 0.086, S 4 * (4 + 2) / 4 / 256
    # = 0.023, tiny against a typical lifetime, so aging decides: L (-0.95) before S (-0.49); L blocks.
    "full-larry-memory-time": (LarryPolicy(LarryParams(u_low=0.5, tau=1.0)), 3.0, 3.5, 4.0, []),
}


@pytest.mark.parametrize("policy,arrival_l,arrival_s,now,admitted", STEP_ORDER.values(), ids=STEP_ORDER.keys())
def test_order_under_pressure_steps(policy, arrival_l, arrival_s, now, admitted):
    sched = make(policy, num_blocks=20)
    sched.add_request(Request("H", 63, 8, 0.0))
    assert step(sched, 0.0) == ({"H": 63}, ["H"], [], [], 4)
    sched.add_request(Request("L", 20, 4, arrival_l))
    sched.add_request(Request("S", 4, 4, arrival_s))
    scheduled = {"H": 1, **{rid: 4 for rid in admitted}}
    assert step(sched, now) == (scheduled, admitted, [], [], 4 - len(admitted))


ORDER_STABLE = {
    # Arrivals 0, 3, 12 with max_wait 10 at now 11: the first already starves; 3 crosses at 13.
    "next-crossing": (11.0, [0.0, 3.0, 12.0], {}, 13.0),
    # Exactly at the bound counts as crossed (wait >= max_wait): nothing left to cross.
    "at-bound-counts-crossed": (11.0, [1.0], {}, math.inf),
    "all-starving": (20.0, [0.0, 1.0], {}, math.inf),
    "empty": (5.0, [], {}, math.inf),
    "element-off": (11.0, [0.0, 3.0, 12.0], {"pressure_order": False}, math.inf),
    "max-wait-2": (11.0, [0.0, 10.5, 10.0], {"max_wait_s": 2.0}, 12.0),
}


@pytest.mark.parametrize("now,arrivals,kw,expected", ORDER_STABLE.values(), ids=ORDER_STABLE.keys())
def test_order_stable_until(now, arrivals, kw, expected):
    policy = larry(**{"pressure_order": True, "max_wait_s": 10.0, **kw})
    waiting = [Req(f"r{i}", 4, a) for i, a in enumerate(arrivals)]
    assert policy.order_stable_until(waiting, View(now=now)) == expected


def test_scheduler_asks_policy_for_order_stability():
    sched = make(larry(pressure_order=True, max_wait_s=10.0), num_blocks=10)
    assert sched.policy_order_stable_until() == math.inf  # nothing waiting
    sched.add_request(Request("a", 4, 4, 2.5))
    sched.add_request(Request("b", 4, 4, 1.0))
    sched.now = 5.0
    assert sched.policy_order_stable_until() == 11.0
    assert LarryPolicy().stable_order is False  # order depends on memory use
    assert larry(growth_reserve=True, least_progress_victim=True).stable_order is True


# ---- 2. growth reserve ---------------------------------------------------------------------------------

# reserve = sum over running of cdiv(min(n + H, prompt + max_tokens), 4) - blocks held (at least 0).
# Running requests: (id, prompt, max_tokens, tokens sampled, blocks held).
RESERVE = {
    # n = 9 holding 3 blocks (slots up to 12): H = 4 -> 13 tokens = 4 blocks.
    "one-block-horizon": ([("a", 8, 10, 1, 3)], None, 1),
    "horizon-0": ([("a", 8, 10, 1, 3)], 0, 0),
    "horizon-3-no-crossing": ([("a", 8, 10, 1, 3)], 3, 0),
    "horizon-8": ([("a", 8, 10, 1, 3)], 8, 2),
    # Capped at prompt + max_tokens = 18 tokens = 5 blocks.
    "horizon-100-capped": ([("a", 8, 10, 1, 3)], 100, 2),
    # Cap 8 + 2 = 10 tokens = 3 blocks, all held: nothing to reserve however long the horizon.
    "cap-already-held": ([("a", 8, 2, 1, 3)], 100, 0),
    # Sum over running: a as above (1) + b: n = 5 holding 2 blocks, 9 tokens = 3 blocks (1).
    "sum-over-running": ([("a", 8, 10, 1, 3), ("b", 4, 20, 1, 2)], None, 2),
    # Mid prefill: prompt 20 with 2 blocks held; 24 tokens = 6 blocks.
    "mid-prefill": ([("p", 20, 10, 0, 2)], None, 4),
}


@pytest.mark.parametrize("running,horizon,expected", RESERVE.values(), ids=RESERVE.keys())
def test_growth_reserve_formula(running, horizon, expected):
    policy = larry(growth_reserve=True, horizon_tokens=horizon)
    reqs = [Req(rid, prompt, max_tokens=mt, num_output_tokens=out) for rid, prompt, mt, out, _ in running]
    view = View(running=reqs, held={r[0]: r[4] for r in running})
    assert policy.growth_reserve(view) == expected


# can_admit: free - reserve >= m_r (blocks for the whole prompt after hits, not this step's chunk).
# Running a (n 9, 3 blocks held, reserve 1 at H = 4) with `free` free blocks; the chunk needs 1 block.
@pytest.mark.parametrize("free,blocks_prompt,kw,admit", [
    (4, 3, {}, True),  # 4 - 1 = 3 >= 3 (equality admits)
    (4, 4, {}, False),  # fits the free blocks, not the free blocks minus the reserve
    (3, 3, {}, False),
    (4, 4, {"horizon_tokens": 0}, True),  # no reserve with a zero horizon
    (4, 4, {"growth_reserve": False}, True),  # element off: always (the allocation checks the fit)
    (0, 9, {"growth_reserve": False}, True),
    (4, 6, {}, False),  # a 1-block first chunk does not hide a 6-block prompt
], ids=["equality-admits", "reserve-refuses", "fewer-free", "horizon-0", "off", "off-even-if-no-room",
        "whole-prompt-not-chunk"])
def test_can_admit(free, blocks_prompt, kw, admit):
    policy = larry(**{"growth_reserve": True, **kw})
    a = Req("a", 8, max_tokens=10, num_output_tokens=1)
    view = View(num_free_blocks=free, running=[a], held={"a": 3})
    admission = Admission(Req("w", 12), num_hit_tokens=0, num_new_tokens=4, blocks_now=1, blocks_full=9,
                          blocks_prompt=blocks_prompt)
    assert policy.can_admit(admission, view) is admit


# 6 blocks. a (prompt 8, max 10: 18 tokens, 5 blocks at most) runs from step 1; b (prompt 12: 3 blocks, max 6)
# arrives at step 2. At step 2 a computes slot 9 (3rd block) leaving 3 free, exactly b's prompt.
GROWTH_WORKLOAD = {1: [("a", 8, 10, 0.0)], 2: [("b", 12, 6, 1.5)]}

# fcfs admits b into the last 3 blocks; at step 3 b needs slot 13 and nothing is free: b (last admitted) is
# preempted, and waits until a finishes (its cached first block is found again: 4 hit tokens, 9 computed).
GROWTH_FCFS = [
    ({"a": 8}, ["a"], [], [], 4),
    ({"a": 1, "b": 12}, ["b"], [], [], 0),
    ({"a": 1}, [], ["b"], [], 3),  # b's 3 blocks back
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], [], 2),  # a: slot 13, 4th block
    ({"a": 1}, [], [], [], 2),
    ({"a": 1}, [], [], [], 2),
    ({"a": 1}, [], [], [], 2),
    ({"a": 1}, [], [], ["a"], 6),  # a: slot 17 (5th block), out 10, finished
    ({"b": 9}, ["b"], [], [], 2),  # b recomputes: 1 block hit, n 13 -> 4 blocks
    ({"b": 1}, [], [], [], 2),
    ({"b": 1}, [], [], [], 2),
    ({"b": 1}, [], [], [], 2),
    ({"b": 1}, [], [], ["b"], 6),
]
# LARRY (reserve only): at step 2 a holds 3 blocks at n 9; reserve = cdiv(13, 4) - 3 = 1, so 3 - 1 < 3 and
# b is refused. free - reserve only grows when a finishes: b is admitted at step 11 and never preempted.
GROWTH_LARRY = [
    ({"a": 8}, ["a"], [], [], 4),
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], [], 2),
    ({"a": 1}, [], [], [], 2),
    ({"a": 1}, [], [], [], 2),
    ({"a": 1}, [], [], [], 2),
    ({"a": 1}, [], [], ["a"], 6),
    ({"b": 12}, ["b"], [], [], 3),
    ({"b": 1}, [], [], [], 2),
    ({"b": 1}, [], [], [], 2),
    ({"b": 1}, [], [], [], 2),
    ({"b": 1}, [], [], [], 2),
    ({"b": 1}, [], [], ["b"], 6),
]


@pytest.mark.parametrize("policy,expected", [
    (FcfsPolicy(), GROWTH_FCFS),
    (larry(), GROWTH_FCFS),
    (larry(growth_reserve=True), GROWTH_LARRY),
    (LarryPolicy(), GROWTH_LARRY),  # ordering (one waiting request) and victim (nothing preempted) idle here
    # Lifetime reserve alone, nothing observed yet (E = prior 256, so d is capped by max_tokens). Step 2: a has
    # n 9, 3 blocks held (g' = 12 - 8 = 4), d_a = min(10 - 1, 256 - 1) = 9; b: n 12, d_b 6, nothing cached.
    # Sweep: t = 8 -> (9 + 11) // 4 = 5; t = 5 -> (21 + 2 * 8) // 4 = 9; minus 3 held = 6 > 3 free: refused.
    # Step 11 (a gone, nothing running): admitted, and never preempted.
    (larry(lifetime_reserve=True), GROWTH_LARRY),
], ids=["fcfs", "larry-off", "larry-reserve", "larry-full", "larry-lifetime"])
def test_growth_reserve_trajectory(policy, expected):
    sched = make(policy, num_blocks=6)
    assert trace(sched, GROWTH_WORKLOAD, len(expected)) == expected
    assert not sched.has_work()


# Same start with a's max_tokens and the horizon varied: is b admitted at step 2 (3 free, b needs 3)?
# a holds 3 blocks at n = 9; reserve = cdiv(min(9 + H, 8 + max_a), 4) - 3 must be 0.
@pytest.mark.parametrize("max_a,horizon,admitted", [
    (10, None, False),  # 13 tokens: 4 blocks
    (10, 0, True),  # 9 tokens: 3 blocks
    (10, 3, True),  # 12 tokens: 3 blocks
    (10, 4, False),
    (10, 100, False),  # capped at 18 tokens: 5 blocks
    (4, 100, True),  # capped at 12 tokens: 3 blocks, all held
    (5, 100, False),  # capped at 13 tokens: 4 blocks
], ids=["default", "h0", "h3", "h4", "h100", "h100-capped-max4", "h100-capped-max5"])
def test_growth_reserve_horizon(max_a, horizon, admitted):
    sched = make(larry(growth_reserve=True, horizon_tokens=horizon), num_blocks=6)
    rows = trace(sched, {1: [("a", 8, max_a, 0.0)], 2: [("b", 12, 6, 1.5)]}, 2)
    assert rows[0] == ({"a": 8}, ["a"], [], [], 4)
    if admitted:
        assert rows[1][:3] == ({"a": 1, "b": 12}, ["b"], []) and rows[1][4] == 0
    else:
        assert rows[1][:3] == ({"a": 1}, [], []) and rows[1][4] == 3


# lifetime_need (element 4) on the fake view, nothing observed (E = prior 256: d = max_tokens - generated).
# Running: (id, prompt, max_tokens, sampled, blocks held); need = max over k of (sum n + alive * (d_k - 1 + 3))
# // 4 over r with d_r >= d_k, minus all blocks held; the admitted request (if any) has no blocks cached.
LIFETIME = {
    # a: n 9, d 9 -> (9 + 11) // 4 = 5, minus 3 held.
    "one-running": ([("a", 8, 10, 1, 3)], None, {}, 2),
    # b: n 12, d 6 joins: t = 5 -> (21 + 2 * 8) // 4 = 9; minus 3.
    "with-admission": ([("a", 8, 10, 1, 3)], ("b", 12, 6), {}, 6),
    # Finishing credit: a (d 9) peaks at t = 8 at 5 blocks, when c (n 5, d 1) is long gone; at t = 0 both:
    # (14 + 2 * 3) // 4 = 5. Minus 5 held: 0, where summing final sizes would say 5 + 2 - 5 = 2.
    "finisher-credit": ([("a", 8, 10, 1, 3), ("c", 4, 2, 1, 2)], None, {}, 0),
    # Horizon 2 tokens: a counted as alive at t = 2 only: (9 + 1 * (2 + 3)) // 4 = 3, minus 3.
    "horizon": ([("a", 8, 10, 1, 3)], None, {"plan_horizon_tokens": 2}, 0),
    # growth_scale 0.5 with 16 observations of 8 tokens: E(4) = 8 (bucket of 4 holds none, tail mean 8):
    # d_a = min(9, ceil(4 + 0.5 * 4 - 1)) = 5 -> (9 + 7) // 4 = 4, minus 3.
    "scale-half-learned": ([("a", 8, 10, 1, 3)], None, {"growth_scale": 0.5, "observed": [8] * 16}, 1),
    "nothing-running": ([], None, {}, 0),
}


@pytest.mark.parametrize("running,admit,kw,expected", LIFETIME.values(), ids=LIFETIME.keys())
def test_lifetime_need(running, admit, kw, expected):
    kw = dict(kw)
    observed = kw.pop("observed", [])
    policy = larry(lifetime_reserve=True, **kw)
    for n in observed:
        policy.estimator.observe(n)
    reqs = [Req(rid, prompt, max_tokens=mt, num_output_tokens=out, num_computed_tokens=prompt + out - 1)
            for rid, prompt, mt, out, _ in running]
    view = View(running=reqs, held={r[0]: r[4] for r in running})
    admission = None
    if admit:
        rid, prompt, mt = admit
        admission = Admission(Req(rid, prompt, max_tokens=mt), 0, prompt, cdiv(prompt, 4), 0, cdiv(prompt, 4))
    assert policy.lifetime_need(admission, view) == expected


def test_policy_learns_only_from_finished_requests():
    policy = larry(lifetime_reserve=True)
    sched = make(policy, num_blocks=10)
    sched.add_request(Request("a", 4, 3, 0.0))
    sched.add_request(Request("b", 4, 6, 0.0))
    for k in range(3):
        step(sched, float(k))
    assert policy.estimator.count == 1  # a finished (3 tokens); b still running
    sched.abort("b")
    assert policy.estimator.count == 1  # an abort teaches nothing
    assert policy.estimator.expected_total(0) == 256.0  # fewer than min_samples: the prior


# Memory-time order (element 5), fake view at full pressure (f = 1), nothing observed (E(0) = 256).
# S: prompt 4 (1 block), max 100 -> M = 100 * (4 + 50) / 4 = 1350 -> 5.27; L: prompt 20 (5 blocks), max 2
# -> M = 2 * 21 / 4 = 10.5 -> 0.04. Prompt blocks say S first; memory-time says L first.
@pytest.mark.parametrize("on,expected", [(False, ["S", "L"]), (True, ["L", "S"])], ids=["prompt-blocks", "memory-time"])
def test_memory_time_order(on, expected):
    policy = larry(pressure_order=True, memory_time_order=on, u_low=0.5, tau=1.0, max_wait_s=10.0)
    waiting = [Req("S", 4, 1.0, max_tokens=100), Req("L", 20, 1.0, max_tokens=2)]
    assert ids(policy.order_waiting(waiting, View(now=2.0, num_free_blocks=0))) == expected


# Memory-time victim (element 6): running (prompt = computed, max_tokens), nothing generated, nothing observed:
# M = max_tokens * (prompt + max_tokens / 2) / 4, key = M / (computed + 4). r0 32/8 -> 72 / 36 = 2,
# r1 40/40 -> 600 / 44 = 13.6, r2 16/20 -> 130 / 20 = 6.5, r3 = r1; r4 400/40 -> 4200 / 404 = 10.4 (the most
# memory-time, but the dearest to recompute).
VICTIM_MT = {
    "largest-memory-time-per-recompute": ([(32, 8), (40, 40), (16, 20)], True, "r1"),
    "tie-most-recent": ([(32, 8), (40, 40), (16, 20), (40, 40)], True, "r3"),
    "recompute-cost-counts": ([(32, 8), (40, 40), (400, 40)], True, "r1"),
    "off-least-progress": ([(32, 8), (40, 40), (16, 20)], False, "r2"),
}


@pytest.mark.parametrize("running,on,victim", VICTIM_MT.values(), ids=VICTIM_MT.keys())
def test_memory_time_victim(running, on, victim):
    reqs = [Req(f"r{i}", p, max_tokens=m, num_computed_tokens=p) for i, (p, m) in enumerate(running)]
    policy = larry(memory_time_victim=on, least_progress_victim=True)
    assert policy.pick_victim(reqs, View(running=reqs)).request_id == victim


# Queue order (system load, element 7), fake view without memory pressure (10 of 10 blocks free). Queue:
# L = 20-token prompt (5 blocks), S = 4 tokens (1 block): 24 queued tokens. Params unless overridden:
# queue_tokens_low 16, queue_tau 1 s, queue_max_wait_s 10 s; score = blocks - wait / tau, smallest first.
QUEUE = {
    # 24 < 30 queued tokens: no queue pressure, FCFS.
    "below-threshold-fcfs": (2.0, 0.0, 1.0, {"queue_tokens_low": 30}, ["L", "S"]),
    # L 5 - 2 = 3, S 1 - 1 = 0.
    "shortest-prompt-first": (2.0, 0.0, 1.0, {}, ["S", "L"]),
    # L waited 4.5 s longer than S (more than its 4 extra blocks * tau): L 5 - 5 = 0, S 1 - 0.5 = 0.5.
    "aging": (5.0, 0.0, 4.5, {}, ["L", "S"]),
    # Aging off (tau 1000); L has waited queue_max_wait_s = 3 s: front.
    "max-wait-front": (4.0, 1.0, 3.5, {"queue_tau": 1000.0, "queue_max_wait_s": 3.0}, ["L", "S"]),
    "max-wait-not-yet": (3.75, 1.0, 3.5, {"queue_tau": 1000.0, "queue_max_wait_s": 3.0}, ["S", "L"]),
    "element-off": (2.0, 0.0, 1.0, {"queue_order": False}, ["L", "S"]),
}


@pytest.mark.parametrize("now,arrival_l,arrival_s,kw,expected", QUEUE.values(), ids=QUEUE.keys())
def test_queue_order(now, arrival_l, arrival_s, kw, expected):
    params = {"queue_order": True, "queue_tokens_low": 16, "queue_tau": 1.0, "queue_max_wait_s": 10.0, **kw}
    policy = larry(**params)
    waiting = [Req("L", 20, arrival_l), Req("S", 4, arrival_s)]
    assert ids(policy.order_waiting(waiting, View(now=now))) == expected
    assert policy.stable_order is not params["queue_order"]


def test_queue_order_stable_until_counts_its_bound():
    policy = larry(queue_order=True, queue_max_wait_s=2.0)
    waiting = [Req("a", 4, 1.0), Req("b", 4, 2.5)]
    assert policy.order_stable_until(waiting, View(now=2.75)) == 3.0  # a crosses at 1 + 2
    both = larry(queue_order=True, queue_max_wait_s=2.0, pressure_order=True, max_wait_s=1.5)
    assert both.order_stable_until(waiting, View(now=2.75)) == 3.0  # b's 2.5 + 1.5 = 4 comes later


# ---- 3. least-progress victim --------------------------------------------------------------------------

# Direct: running in admission order with these computed tokens -> victim.
VICTIM = {
    "least-progress-in-middle": ([16, 5, 10], True, "r1"),
    "least-progress-first": ([3, 8, 8], True, "r0"),
    "ties-most-recent": ([16, 7, 7, 11], True, "r2"),
    "all-tied-last": ([4, 4, 4], True, "r2"),
    "single": ([9], True, "r0"),
    "off-last-admitted": ([16, 5, 10], False, "r2"),
}


@pytest.mark.parametrize("computed,on,victim", VICTIM.values(), ids=VICTIM.keys())
def test_pick_victim(computed, on, victim):
    running = [Req(f"r{i}", 32, num_computed_tokens=c) for i, c in enumerate(computed)]
    assert larry(least_progress_victim=on).pick_victim(running, View(running=running)).request_id == victim


# Step-driven. All admitted at step 1 (prompt tokens computed, memory full); at step 2 a (prompt 16) computes
# slot 17 and needs a 5th block.
# Workload 1, 9 blocks: a 16 (4 blocks), b 5 (2), c 10 (3). b has the least computed tokens; c was last
# admitted. Victim on: b goes (2 blocks back), a takes one -> 1 free. Off/fcfs: c goes, a takes one -> 2 free.
VICTIM_W1 = {1: [("a", 16, 8), ("b", 5, 8), ("c", 10, 8)]}
# Workload 2, 11 blocks: a 16 (4), b 7 (2), c 7 (2), d 11 (3). b and c tie at 7: the most recent of them, c.
VICTIM_W2 = {1: [("a", 16, 8), ("b", 7, 8), ("c", 7, 8), ("d", 11, 8)]}
VICTIM_STEPS = {
    "least-progress": (larry(least_progress_victim=True), VICTIM_W1, 9, ({"a": 1, "c": 1}, [], ["b"], [], 1)),
    "fcfs-last-admitted": (FcfsPolicy(), VICTIM_W1, 9, ({"a": 1, "b": 1}, [], ["c"], [], 2)),
    "off-last-admitted": (larry(), VICTIM_W1, 9, ({"a": 1, "b": 1}, [], ["c"], [], 2)),
    "tie-most-recent": (larry(least_progress_victim=True), VICTIM_W2, 11, ({"a": 1, "b": 1, "d": 1}, [], ["c"], [], 1)),
    "tie-fcfs-last": (FcfsPolicy(), VICTIM_W2, 11, ({"a": 1, "b": 1, "c": 1}, [], ["d"], [], 2)),
}


@pytest.mark.parametrize("policy,workload,num_blocks,row2", VICTIM_STEPS.values(), ids=VICTIM_STEPS.keys())
def test_victim_steps(policy, workload, num_blocks, row2):
    sched = make(policy, num_blocks=num_blocks)
    rows = trace(sched, workload, 2)
    first = {rid: prompt for rid, prompt, _ in workload[1]}
    assert rows[0] == (first, list(first), [], [], 0)
    assert rows[1] == row2


# Self-preemption. 6 blocks: a (prompt 4, max 8) and b (prompt 12, max 8) fill memory at step 2. At step 6 a
# (running[0]) needs slot 9 with nothing free. Victim on: a has the least computed tokens (8 < 16), so a
# preempts itself and, as in vLLM, the running loop stops: the step schedules nothing, admits nothing (a
# preemption happened). fcfs: b (last admitted) goes and a proceeds.
SELF_W = {1: [("a", 4, 8, 0.0), ("b", 12, 8, 0.0)]}
SELF_FCFS = [
    ({"a": 4, "b": 12}, ["a", "b"], [], [], 2),
    *[({"a": 1, "b": 1}, [], [], [], 0)] * 4,
    ({"a": 1}, [], ["b"], [], 3),
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], ["a"], 6),
    ({"b": 5}, ["b"], [], [], 1),  # b: n 17, 3 blocks hit (12 tokens)
    ({"b": 1}, [], [], [], 1),
    ({"b": 1}, [], [], ["b"], 6),
]
SELF_LARRY = [
    ({"a": 4, "b": 12}, ["a", "b"], [], [], 2),
    *[({"a": 1, "b": 1}, [], [], [], 0)] * 4,
    ({}, [], ["a"], [], 2),  # an empty step that only preempted
    ({"b": 1}, [], [], [], 1),  # b: slot 18, 5th block
    ({"b": 1}, [], [], [], 1),
    ({"b": 1}, [], [], ["b"], 6),
    ({"a": 5}, ["a"], [], [], 3),  # a: n 9, its first block hit (its second was taken by b)
    ({"a": 1}, [], [], [], 3),
    ({"a": 1}, [], [], ["a"], 6),
]


@pytest.mark.parametrize("policy,expected", [
    (FcfsPolicy(), SELF_FCFS), (larry(least_progress_victim=True), SELF_LARRY),
], ids=["fcfs", "larry-victim"])
def test_victim_self_preemption(policy, expected):
    sched = make(policy, num_blocks=6)
    assert trace(sched, SELF_W, len(expected)) == expected
    assert not sched.has_work()


LATENCY = latency_model("h100", "llama3-8b")


def test_sim_replica_survives_self_preemption():
    """The SELF_W workload on a virtual clock: the step that only preempts costs nothing and the run goes on
    (an empty output used to be read as "nothing can run", stalling the replica until the next arrival)."""
    rep = SimReplica("r", make(larry(least_progress_victim=True), num_blocks=6), LATENCY)
    a, b = Request("a", 4, 8, 0.0), Request("b", 12, 8, 0.0)
    rep.add_request(a, 0.0)
    rep.add_request(b, 0.0)
    rep.run_until_idle()
    assert not rep.scheduler.has_work()
    assert a.num_preemptions == 1 and b.num_preemptions == 0
    assert b.finish_time < a.finish_time < 1.0


def test_realtime_engine_survives_self_preemption():
    from halffull.replicas.backend import GenerateRequest
    from halffull.replicas.sim.realtime import AsyncSimEngine

    async def run() -> list[int]:
        engine = AsyncSimEngine.from_config({
            "block_size": 4, "num_blocks": 6, "max_model_len": 128, "max_num_batched_tokens": 64,
            "engine_policy": "larry", "engine_params": {"pressure_order": False, "growth_reserve": False},
            "speedup": "inf"})

        async def consume(rid: str, prompt: list[int]) -> int:
            return len([t async for t in engine.generate(GenerateRequest(rid, prompt, 8, ignore_eos=True))])

        try:
            return await asyncio.wait_for(
                asyncio.gather(consume("a", list(range(4))), consume("b", list(range(100, 112)))), 1.0)
        finally:
            await engine.close()

    assert asyncio.run(run()) == [8, 8]


# ---- all elements off == fcfs, decision for decision ---------------------------------------------------

# 10 blocks, arrivals over several steps, pressure high enough to preempt and block admission.
PRESSURE_WORKLOAD = {
    1: [("a", 10, 12, 0.5), ("b", 6, 9, 0.75)],
    2: [("c", 14, 6, 1.5)],
    3: [("d", 3, 14, 2.5), ("e", 9, 4, 2.75)],
    5: [("f", 20, 5, 4.5)],
    8: [("g", 2, 10, 7.25), ("h", 7, 7, 7.5)],
}


def test_all_off_equals_fcfs_on_a_workload():
    fcfs = trace(make(FcfsPolicy()), PRESSURE_WORKLOAD, 60)
    off = trace(make(larry()), PRESSURE_WORKLOAD, 60)
    assert off == fcfs
    assert sum(len(row[2]) for row in fcfs) >= 2, "the workload must preempt"
    assert fcfs[-1][4] == 10 and fcfs[-1][0] == {}, "everything finished"
    full = trace(make(LarryPolicy(LarryParams(u_low=0.5))), PRESSURE_WORKLOAD, 60)
    assert full != fcfs, "the workload must tell the policies apart"


@st.composite
def small_workloads(draw):
    num_blocks = draw(st.integers(3, 12))
    capacity = num_blocks * 4
    arrivals: dict[int, list[tuple]] = {}
    for i in range(draw(st.integers(1, 8))):
        total = draw(st.integers(2, min(capacity, 128)))
        prompt = draw(st.integers(1, total - 1))
        k = draw(st.integers(1, 12))
        arrivals.setdefault(k, []).append((f"r{i}", prompt, total - prompt, k - 0.5))
    return num_blocks, draw(st.integers(1, 24)), draw(st.integers(1, 6)), arrivals


@settings(max_examples=60, deadline=None)
@given(small_workloads())
def test_all_off_equals_fcfs_property(workload):
    num_blocks, budget, max_seqs, arrivals = workload
    rows = [trace(make(p, num_blocks, budget, max_seqs), arrivals, 120) for p in (FcfsPolicy(), larry())]
    assert rows[0] == rows[1]


ELEMENTS = {
    "order": dict(pressure_order=True),
    "reserve": dict(growth_reserve=True),
    "victim": dict(least_progress_victim=True),
    "all": dict(pressure_order=True, growth_reserve=True, least_progress_victim=True),
    "lifetime": dict(lifetime_reserve=True, memory_time_order=True, memory_time_victim=True, pressure_order=True),
    "lifetime-horizon-scale": dict(lifetime_reserve=True, memory_time_victim=True, plan_horizon_tokens=4,
                                   growth_scale=0.5),
    "all-low-u_low-short-wait": dict(pressure_order=True, growth_reserve=True, least_progress_victim=True,
                                     u_low=0.0, tau=0.1, max_wait_s=3.0, horizon_tokens=8),
}


@settings(max_examples=40, deadline=None)
@given(small_workloads(), st.sampled_from(sorted(ELEMENTS)))
def test_each_element_is_live(workload, element):
    """Block conservation every step (``step`` checks) and liveness: every request finishes."""
    num_blocks, budget, max_seqs, arrivals = workload
    sched = make(larry(**ELEMENTS[element]), num_blocks, budget, max_seqs)
    trace(sched, arrivals, 12)
    for k in range(13, 3000):
        if not sched.has_work():
            break
        step(sched, float(k))
    assert not sched.has_work(), list(sched.requests)
    assert sched.num_free_blocks == num_blocks


# ---- simulated replica: no starvation, preemptions -----------------------------------------------------

def sim_config(num_blocks: int) -> SchedulerConfig:
    return SchedulerConfig(num_blocks=num_blocks, block_size=16, max_num_batched_tokens=2048, max_num_seqs=256,
                           max_model_len=4096)


def replay(policy, params, arrivals, num_blocks, jump: bool = True) -> tuple[dict[str, Request], Scheduler]:
    sched = Scheduler(sim_config(num_blocks), make_engine_policy(policy, params))
    rep = SimReplica("r", sched, LATENCY, jump=jump)
    requests = {}
    for rid, prompt, max_tokens, t in sorted(arrivals, key=lambda a: a[3]):
        rep.advance_to(t)
        requests[rid] = r = Request(rid, prompt, max_tokens, t)
        rep.add_request(r, t)
    rep.run_until_idle()
    assert not sched.has_work()
    return requests, sched


# 64 blocks of 16 tokens (1,024 KV tokens). Small requests (64 + 64 tokens, 4 blocks growing to 8) arrive
# every 50 ms for 20 s: about 9 run at once, keeping memory above u_low. One large request (640-token prompt,
# 40 blocks) arrives at 0.5 s. Under pressure ordering the large one goes after the small ones until aging or
# max_wait_s puts it at the front; it then blocks the queue until enough small ones finish (each lives about
# 0.5 s), so its first token comes at most 1 s after max_wait_s (measured: 0.28 s after).
STREAM = [(f"s{i}", 64, 64, i / 20) for i in range(400)] + [("big", 640, 16, 0.5)]
STARVATION = {
    "fcfs": ("fcfs", {}, 0.0, 1.0),
    "larry-default": ("larry", {}, 0.0, LarryParams().max_wait_s + 1.0),
    # Aging alone (no hard bound): the wait grows with tau (measured 1.0, 5.0 and 9.5 s).
    # (Sized by prompt blocks, memory_time_order off: "big" has a 640-token prompt but only 16 output tokens,
    # so by expected memory-time it is barely larger than the small ones and is hardly delayed at all.)
    "larry-aging-tau-0.05": ("larry", {"tau": 0.05, "max_wait_s": 1e6, "memory_time_order": False}, 0.5, 2.0),
    "larry-aging-tau-0.5": ("larry", {"tau": 0.5, "max_wait_s": 1e6, "memory_time_order": False}, 3.0, 7.0),
    "larry-aging-tau-1": ("larry", {"tau": 1.0, "max_wait_s": 1e6, "memory_time_order": False}, 7.0, 12.0),
    # Aging off: the hard bound admits it right after max_wait_s.
    "larry-max-wait-3": ("larry", {"tau": 1e6, "max_wait_s": 3.0}, 3.0, 4.0),
    "larry-max-wait-3-order-only": (
        "larry", {"tau": 1e6, "max_wait_s": 3.0, "growth_reserve": False, "least_progress_victim": False,
                  "memory_time_order": False, "memory_time_victim": False}, 3.0, 4.0),
    # Lifetime planning on (reserve, memory-time order and victim): the bound still holds.
    "larry-lifetime": ("larry", {"lifetime_reserve": True, "memory_time_order": True, "memory_time_victim": True},
                       0.0, LarryParams().max_wait_s + 1.0),
    # Control: with neither aging nor the bound it waits until the stream ends (20 s).
    "larry-no-aging-starves": ("larry", {"tau": 1e6, "max_wait_s": 1e6}, 15.0, 25.0),
}


@pytest.mark.parametrize("policy,params,lo,hi", STARVATION.values(), ids=STARVATION.keys())
def test_large_request_not_starved(policy, params, lo, hi):
    requests, _ = replay(policy, params, STREAM, 64)
    big = requests["big"]
    ttft = big.first_token_time - big.arrival_time
    assert lo <= ttft <= hi, ttft


# Jumping over runs of decode steps must give what stepping one token at a time gives. LARRY's order is not
# stable (it depends on memory use) and changes when a waiting request crosses max_wait_s, so runs stop there.
JUMP = {
    "default": {},
    "short-max-wait": {"tau": 1e6, "max_wait_s": 0.3},
    "order-only": {"pressure_order": True, "growth_reserve": False, "least_progress_victim": False},
    "reserve-only": {"pressure_order": False, "growth_reserve": True, "least_progress_victim": False},
    # The lifetime verdict moves while a request waits (its lifetime starts later): runs stop where it could
    # turn (LarryPolicy.decode_steps_stable). Without that bound: 7,203 jumped vs 7,085 stepped steps.
    "lifetime": {"lifetime_reserve": True, "memory_time_order": True, "memory_time_victim": True},
    "lifetime-only": {"lifetime_reserve": True, "pressure_order": False, "growth_reserve": False,
                      "least_progress_victim": False},
    "queue-order": {"queue_order": True, "queue_tokens_low": 512, "queue_max_wait_s": 0.3},
}


@pytest.mark.parametrize("params", JUMP.values(), ids=JUMP.keys())
def test_jump_equals_stepping(params):
    workload = poisson_workload(3, n=120, rate=8.0)
    runs = [replay("larry", params, workload, 64, jump=jump) for jump in (True, False)]
    (jumped, sched_j), (stepped, sched_s) = runs
    assert sched_j.num_steps == sched_s.num_steps and sched_j.num_preemptions == sched_s.num_preemptions > 0
    for rid, r in jumped.items():
        s = stepped[rid]
        assert math.isclose(r.first_token_time, s.first_token_time, rel_tol=1e-9), rid
        assert math.isclose(r.finish_time, s.finish_time, rel_tol=1e-9), rid
        assert r.num_preemptions == s.num_preemptions, rid


def poisson_workload(seed: int, n: int = 300, rate: float = 5.0) -> list[tuple]:
    """n requests, Poisson arrivals at ``rate``/s, prompt U[16, 512], output U[8, 256] tokens."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append((f"r{i}", rng.randint(16, 512), rng.randint(8, 256), t))
    return out


LIFETIME_PARAMS = {"lifetime_reserve": True, "memory_time_order": True, "memory_time_victim": True}


def preemptions_and_ttft(policy: str, seed: int, params: dict | None = None) -> tuple[int, float]:
    # 128 blocks of 16 tokens (2,048 KV tokens) against requests of up to 768 tokens: memory pressure.
    requests, sched = replay(policy, params or {}, poisson_workload(seed), 128)
    return sched.num_preemptions, statistics.mean(r.first_token_time - r.arrival_time for r in requests.values())


# Measured (300 requests, 5/s, 128 blocks, H100 / Llama-3-8B profile as of 2026-12-07; the last column
# re-measured at 4a02c01 with LIFETIME_PARAMS):
#   seed  fcfs preempt / TTFT   larry 1-3 only    larry (default: 1-3, 5, 6)   + lifetime reserve (4)
#   0     128 / 1.040 s         80 / 0.918 s      66 / 1.035 s                  8 / 2.348 s
#   1     139 / 0.823 s         68 / 0.829 s      76 / 0.807 s                  14 / 1.625 s
#   2     125 / 3.905 s         96 / 3.588 s      76 / 3.969 s                  15 / 5.157 s
# Default LARRY preempts 0.5-0.6x as often as fcfs, with a lower mean TTFT on seeds 0 and 1 and a 1.6 % higher
# one on seed 2 (xfail there: reported, not hidden). The lifetime reserve preempts 0.06-0.12x as often, at
# 1.3-2.3x the mean TTFT: requests wait for memory instead of being preempted later.
@pytest.mark.parametrize("seed", [0, 1, pytest.param(2, marks=pytest.mark.xfail(
    strict=True, reason="mean TTFT 3.97 s vs fcfs 3.91 s on this seed"))])
def test_larry_preempts_less_than_fcfs(seed):
    fcfs_pre, fcfs_ttft = preemptions_and_ttft("fcfs", seed)
    larry_pre, larry_ttft = preemptions_and_ttft("larry", seed)
    assert fcfs_pre >= 50, "the workload must put memory under pressure"
    assert larry_pre < fcfs_pre
    assert larry_ttft <= fcfs_ttft


def test_lifetime_planning_preempts_a_third_of_fcfs():
    """The issue's target (at most 1/3 of fcfs's preemptions), met with lifetime planning on."""
    for seed in (0, 1, 2):
        assert 3 * preemptions_and_ttft("larry", seed, LIFETIME_PARAMS)[0] <= preemptions_and_ttft("fcfs", seed)[0]


@pytest.mark.xfail(strict=True, reason="TARGET (issue), not met by default LARRY: 0.52-0.61x of fcfs's preemptions")
def test_larry_preempts_a_third_of_fcfs():
    for seed in (0, 1, 2):
        assert 3 * preemptions_and_ttft("larry", seed)[0] <= preemptions_and_ttft("fcfs", seed)[0]


@pytest.mark.xfail(strict=True, reason="TARGET (issue), not met: lifetime planning reaches 0.06-0.12x of fcfs's "
                                       "preemptions but 1.3-2.3x its mean TTFT")
def test_lifetime_planning_a_tenth_of_preemptions_without_ttft_cost():
    for seed in (0, 1, 2):
        pre, ttft = preemptions_and_ttft("larry", seed, LIFETIME_PARAMS)
        fcfs_pre, fcfs_ttft = preemptions_and_ttft("fcfs", seed)
        assert 10 * pre <= fcfs_pre and ttft <= fcfs_ttft


# ---- 6. parameters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {"u_low": -0.1}, {"u_low": 1.0}, {"u_low": 1.5}, {"u_low": float("nan")},
    {"tau": 0.0}, {"tau": -1.0}, {"tau": float("nan")}, {"max_wait_s": 0.0}, {"max_wait_s": -5.0},
    {"max_wait_s": float("nan")}, {"horizon_tokens": -1},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_params_reject(kw):
    with pytest.raises(ValueError):
        LarryParams(**kw)
    with pytest.raises(ValueError):
        make_engine_policy("larry", kw)


@pytest.mark.parametrize("kw", [
    {}, {"u_low": 0.0}, {"horizon_tokens": 0}, {"tau": 1e-3, "max_wait_s": 1e-3}, {"max_wait_s": math.inf}, ALL_OFF,
], ids=["defaults", "u_low-0", "horizon-0", "tiny", "no-hard-bound", "all-off"])
def test_params_accept(kw):
    policy = make_engine_policy("larry", kw)
    assert isinstance(policy, LarryPolicy)
    described = policy.describe()
    assert described["name"] == "larry"
    assert all(described[k] == v for k, v in kw.items())


def test_defaults_match_docstring():
    """The module docstring's parameter table and LarryParams' defaults must not drift apart."""
    table = dict(re.findall(r"^  (u_low|tau|max_wait_s|horizon_tokens) +(\S+)", larry_module.__doc__, re.M))
    p = LarryParams()
    assert table == {k: str(getattr(p, k)) for k in ("u_low", "tau", "max_wait_s", "horizon_tokens")}
    assert p.pressure_order and p.growth_reserve and p.least_progress_victim
    assert "larry" in engine_policy_names()


@pytest.mark.parametrize("params", [{"bogus": 1}, {"u_low": 0.5, "horizon": 4}, {"max_wait": 3.0}],
                         ids=["bogus", "horizon-misspelt", "max_wait-misspelt"])
def test_unknown_param_fails_loudly(params):
    with pytest.raises(ValueError, match="unknown parameter"):
        make_engine_policy("larry", params)
