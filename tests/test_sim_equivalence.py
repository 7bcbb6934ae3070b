"""The simulated replica's decode-run jump (``SimReplica(jump=True)``) against stepping one token at a time.

Same request stream (seeded Poisson arrivals, mixed lengths, shared prompt families, some simulated EOS),
same engine (a small KV pool so that the heavy load preempts): per-request first-token and finish times must
agree to 1e-9 relative, preemption counts and prefix hits exactly, and the jump must need fewer
``schedule()`` calls. Plus: identical runs are identical (no hidden nondeterminism), and the scheduler-level
``decode_run_limit`` / ``commit_decode_run`` leave the block pool exactly as stepping does.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.replicas.engine.policies import make_engine_policy
from halffull.replicas.engine.request import Request, RequestStatus
from halffull.replicas.engine.scheduler import Scheduler, SchedulerConfig
from halffull.replicas.sim.profile_model import latency_model
from halffull.replicas.sim.virtual import SimReplica
from tests.helpers import make_sched, req

LATENCY = latency_model("h100", "llama3-8b")
POLICIES = ["fcfs", "priority", "no_preempt"]

# name: (num_blocks of 16 tokens, arrival rate per second, number of requests)
LOADS = {
    "light": (2000, 0.5, 200),  # 32k KV tokens, a few requests at a time: no preemption
    "heavy": (150, 4.0, 300),  # 2,400 KV tokens for ~8 concurrent requests of up to 1,400: preemptions
}


@dataclass(frozen=True)
class Spec:
    rid: str
    prompt: int
    max_tokens: int
    arrival: float
    priority: int
    family: int  # -1: prompt by length; else token ids shared with the family's other prompts
    stop_after: int | None


def request_stream(seed: int, n: int, rate: float) -> list[Spec]:
    rng = random.Random(seed)
    t, specs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        max_tokens = rng.randint(8, 400)
        stop_after = rng.randint(1, max_tokens) if rng.random() < 0.3 else None
        specs.append(Spec(f"q{i}", rng.randint(16, 1024), max_tokens, t, rng.randint(0, 2), rng.randint(-1, 3),
                          stop_after))
    return specs


def to_request(s: Spec) -> Request:
    ids = None if s.family < 0 else [s.family * 100_000 + j for j in range(s.prompt)]
    return Request(s.rid, s.prompt, s.max_tokens, s.arrival, priority=s.priority, prompt_token_ids=ids,
                   stop_after_tokens=s.stop_after)


@dataclass
class Run:
    per_request: dict[str, tuple]  # id -> (first_token_time, finish_time, num_preemptions, num_cached_tokens)
    num_preemptions: int
    num_steps: int
    schedule_calls: int
    busy_time: float


def simulate(policy: str, jump: bool, specs: list[Spec], num_blocks: int) -> Run:
    sched = Scheduler(
        SchedulerConfig(num_blocks=num_blocks, block_size=16, max_num_batched_tokens=2048, max_num_seqs=64),
        make_engine_policy(policy),
    )
    calls = 0
    schedule = sched.schedule

    def counting_schedule(now=None):
        nonlocal calls
        calls += 1
        return schedule(now)

    sched.schedule = counting_schedule
    replica = SimReplica("r0", sched, LATENCY, jump=jump)
    reqs = []
    for s in specs:
        replica.advance_to(s.arrival)
        r = to_request(s)
        replica.add_request(r, s.arrival)
        reqs.append(r)
    replica.run_until_idle()
    assert not sched.has_work()
    assert all(r.finish_time is not None for r in reqs)
    assert sched.num_free_blocks == num_blocks
    return Run(
        {r.request_id: (r.first_token_time, r.finish_time, r.num_preemptions, r.num_cached_tokens) for r in reqs},
        sched.num_preemptions, sched.num_steps, calls, replica.busy_time,
    )


_CACHE: dict[tuple, Run] = {}


def cached_run(policy: str, load: str, jump: bool) -> Run:
    key = (policy, load, jump)
    if key not in _CACHE:
        num_blocks, rate, n = LOADS[load]
        _CACHE[key] = simulate(policy, jump, request_stream(7, n, rate), num_blocks)
    return _CACHE[key]


@pytest.mark.parametrize("load", LOADS, ids=LOADS)
@pytest.mark.parametrize("policy", POLICIES, ids=POLICIES)
def test_jump_equals_stepping(policy, load):
    jumped, stepped = cached_run(policy, load, True), cached_run(policy, load, False)
    assert jumped.per_request.keys() == stepped.per_request.keys()
    for rid, (first_j, finish_j, pre_j, hit_j) in jumped.per_request.items():
        first_s, finish_s, pre_s, hit_s = stepped.per_request[rid]
        assert math.isclose(first_j, first_s, rel_tol=1e-9), (rid, first_j, first_s)
        assert math.isclose(finish_j, finish_s, rel_tol=1e-9), (rid, finish_j, finish_s)
        assert (pre_j, hit_j) == (pre_s, hit_s), rid
    assert jumped.num_preemptions == stepped.num_preemptions
    assert jumped.num_steps == stepped.num_steps
    assert math.isclose(jumped.busy_time, stepped.busy_time, rel_tol=1e-9)
    assert jumped.schedule_calls < stepped.schedule_calls
    assert stepped.schedule_calls == stepped.num_steps
    # the workloads do what they are for
    if policy == "no_preempt" or load == "light":
        assert jumped.num_preemptions == 0
    else:
        assert jumped.num_preemptions > 0
    assert any(hit > 0 for _, _, _, hit in jumped.per_request.values())  # prefix families hit


@pytest.mark.parametrize("jump", [True, False], ids=["jump", "step"])
@pytest.mark.parametrize("policy", POLICIES, ids=POLICIES)
def test_identical_runs_are_identical(policy, jump):
    num_blocks, rate, n = LOADS["heavy"]
    specs = request_stream(11, n // 2, rate)
    first, second = simulate(policy, jump, specs, num_blocks), simulate(policy, jump, specs, num_blocks)
    assert first == second  # exact equality, floats included


# ---- the scheduler-level run API, on tiny pools -------------------------------------------------------


def _fused_plan(sched: Scheduler, now: float):
    """``schedule_decode_run``, checked against ``schedule`` + ``decode_run_limit`` on a copy of the engine."""
    twin = copy.deepcopy(sched)
    planned = sched.schedule_decode_run(now)
    if planned is None:
        return None
    out = twin.schedule(now)
    assert planned == (twin.decode_run_limit(out), sum(out.computed_before.values()))
    assert list(out.num_scheduled_tokens) == [twin.requests[r.request_id] for r in sched.running]
    assert (sched.pool.free_queue, sched.pool.req_blocks, sched.num_steps, sched.now) == (
        twin.pool.free_queue, twin.pool.req_blocks, twin.num_steps, twin.now)
    _FUSED_PLANS.append(planned)
    return planned


_FUSED_PLANS: list = []


def _drive_runs(config, specs, jump: bool | str):
    """Step (or jump over decode runs) with integer step times; returns per-step snapshots and results.
    ``jump="fused"`` plans decode runs with ``schedule_decode_run`` where it applies (``_fused_plan``).

    A run never crosses an arrival, as the replica's deadline guarantees. Snapshots are taken after every
    schedule/commit, keyed by the step count, so a jump's snapshot can be compared with stepping's.
    """
    sched = make_sched(**config)
    pending = sorted(specs, key=lambda s: s[3])
    reqs = {}
    snapshots = {}
    while pending or sched.has_work():
        while pending and pending[0][3] <= sched.num_steps:
            rid, prompt, max_tokens, arrival, priority = pending.pop(0)
            reqs[rid] = req(rid, prompt, max_tokens, float(arrival), priority=priority)
            sched.add_request(reqs[rid])
        now = float(sched.num_steps)
        planned = _fused_plan(sched, now) if jump == "fused" else None
        if planned is not None:
            out, k = None, planned[0]
        else:
            out = sched.schedule(now)
            k = sched.decode_run_limit(out) if jump else 1
        if pending:
            k = max(1, min(k, pending[0][3] - sched.num_steps + 1))
        sched.commit_decode_run(out, k, float(sched.num_steps + k - 1))
        sched.pool.check_invariants()
        p = sched.pool
        snapshots[sched.num_steps] = (
            list(p.free_queue), list(p.ref_cnt), list(p.block_hash), dict(p.cached), p.num_evictions,
            {rid: (r.num_computed_tokens, r.num_output_tokens, r.status) for rid, r in reqs.items()},
        )
        assert sched.num_steps < 20_000, "livelock"
    results = {rid: (r.first_token_time, r.finish_time, r.num_preemptions, r.num_cached_tokens)
               for rid, r in reqs.items()}
    return snapshots, results


@st.composite
def small_workloads(draw):
    bs = draw(st.sampled_from([2, 4]))
    num_blocks = draw(st.integers(4, 16))
    capacity = num_blocks * bs
    config = dict(num_blocks=num_blocks, block_size=bs, budget=draw(st.sampled_from([4, 8, 64])),
                  max_seqs=draw(st.integers(1, 6)), max_len=capacity, policy=draw(st.sampled_from(POLICIES)),
                  watermark=draw(st.sampled_from([0.0, 0.2])))
    specs = []
    for i in range(draw(st.integers(1, 8))):
        total = draw(st.integers(2, capacity))
        prompt = draw(st.integers(1, total - 1))
        family = draw(st.integers(-1, 2))
        ids = prompt if family < 0 else [family * 1000 + j for j in range(prompt)]
        specs.append((f"r{i}", ids, total - prompt, draw(st.integers(0, 30)), draw(st.integers(0, 2))))
    return config, specs


@settings(max_examples=60, deadline=None)
@given(small_workloads())
def test_decode_run_leaves_the_pool_as_stepping_does(workload):
    config, specs = workload
    jump_snaps, jump_results = _drive_runs(config, specs, jump=True)
    step_snaps, step_results = _drive_runs(config, specs, jump=False)
    assert jump_results == step_results
    for k, snap in jump_snaps.items():
        assert step_snaps[k] == snap, f"after step {k}"


@settings(max_examples=60, deadline=None)
@given(small_workloads())
def test_schedule_decode_run_is_schedule_then_decode_run_limit(workload):
    config, specs = workload
    fused_snaps, fused_results = _drive_runs(config, specs, jump="fused")
    step_snaps, step_results = _drive_runs(config, specs, jump=False)
    assert fused_results == step_results
    for k, snap in fused_snaps.items():
        assert step_snaps[k] == snap, f"after step {k}"


def test_schedule_decode_run_plans_runs_and_declines_the_rest():
    _FUSED_PLANS.clear()
    config = dict(num_blocks=16, block_size=4, budget=64, max_seqs=6, max_len=64, policy="fcfs", watermark=0.0)
    specs = [("a", 5, 20, 0, 0), ("b", [7] * 6, 30, 2, 0), ("c", [7] * 9, 25, 9, 0), ("d", 3, 2, 40, 0)]
    (fused_snaps, fused_results), (step_snaps, step_results) = (
        _drive_runs(config, specs, jump="fused"), _drive_runs(config, specs, jump=False))
    assert fused_results == step_results and all(step_snaps[k] == v for k, v in fused_snaps.items())
    assert len(_FUSED_PLANS) >= 3 and any(steps > 1 for steps, _ in _FUSED_PLANS)
    sched = make_sched(num_blocks=16, budget=64)
    sched.add_request(req("w", 4, 8))
    assert sched.schedule_decode_run(0.0) is None and sched.num_steps == 0  # waiting: schedule() admits
    sched.update_from_output(sched.schedule(0.0), 0.0)
    assert sched.schedule_decode_run(1.0) == (7, 4)  # a decode of 7 tokens left, 4 computed


def test_decode_run_limit_stops_before_a_failing_allocation():
    # 4 blocks of 4. A and B decode (2 blocks each after step 2, 0 free); both need a 3rd block at total 9.
    sched = make_sched(num_blocks=4, budget=32)
    sched.add_request(req("a", 4, 12))
    sched.add_request(req("b", 4, 12))
    for now in (1.0, 2.0):
        sched.update_from_output(sched.schedule(now), now)
    out = sched.schedule(3.0)  # total 6: A and B each at computed 5
    # steps: total 6, 7, 8 fit; the 4th step (total 9) needs blocks that are not there
    assert sched.decode_run_limit(out) == 3
    sched.commit_decode_run(out, 3, 5.0)
    out = sched.schedule(6.0)
    assert [r.request_id for r in out.preempted] == ["b"]
    assert sched.decode_run_limit(out) == 1


# ---- SimReplica bugs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("jump", [True, False], ids=["jump", "step"])
def test_sim_continues_after_a_preempt_only_step(jump):
    # 4 blocks of 4, priority. A (priority 2) runs alone one step, B (priority 1) joins; at A's total 9 the
    # pool is full and A is its own victim in a step that schedules nothing (see test_engine_scheduler.py).
    sched = make_sched(num_blocks=4, budget=32, policy="priority")
    replica = SimReplica("r0", sched, LATENCY, jump=jump)
    a, b = req("a", 4, 8, 0.0, priority=2), req("b", 4, 8, 0.001, priority=1)
    replica.add_request(a, 0.0)
    replica.advance_to(0.001)
    replica.add_request(b, 0.001)
    replica.run_until_idle()
    assert a.finish_time is not None and b.finish_time is not None
    assert math.isfinite(replica.clock)


# ---- stats refreshes count a pending run's steps instead of applying them ---------------------------------


def _replicas_with_refreshes(policy: str, load: str, mode: str):
    """Replay a stream with a stats refresh every 20 ms. ``mode``: "stats" is the replica's own ``stats``
    (a pending run's started steps are counted, not applied), "applied" the reference (``materialize`` then
    ``engine_stats`` on the scheduler), "none" no refresh at all (only ``advance_to`` at the ticks)."""
    from halffull.replicas.engine.stats import engine_stats
    from halffull.router.estimate import OutputLengthEstimator

    num_blocks, rate, n = LOADS[load]
    specs = request_stream(5, n // 3, rate)
    sched = Scheduler(
        SchedulerConfig(num_blocks=num_blocks, block_size=16, max_num_batched_tokens=2048, max_num_seqs=64),
        make_engine_policy(policy),
    )
    replica, estimator = SimReplica("r0", sched, LATENCY), OutputLengthEstimator(prior_mean=120.0)
    published, reqs, tick = [], [], 0.02
    for s in specs:
        while tick <= s.arrival:
            replica.advance_to(tick)
            if mode == "stats":
                published.append(replica.stats(tick, estimator))
            elif mode == "applied":
                replica.materialize(tick)
                published.append(engine_stats(sched, estimator, now=tick, latency=LATENCY))
            tick += 0.02
        replica.advance_to(s.arrival)
        reqs.append(to_request(s))
        replica.add_request(reqs[-1], s.arrival)
    replica.run_until_idle()
    results = {r.request_id: (r.first_token_time, r.finish_time, r.num_preemptions, r.num_cached_tokens)
               for r in reqs}
    return published, results, (replica.clock, replica.busy_time, sched.num_steps, sched.pool.free_queue)


def _assert_same_results(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid, (first_a, finish_a, pre_a, hit_a) in a.items():
        first_b, finish_b, pre_b, hit_b = b[rid]
        assert math.isclose(first_a, first_b, rel_tol=1e-12) and math.isclose(finish_a, finish_b, rel_tol=1e-12), rid
        assert (pre_a, hit_a) == (pre_b, hit_b), rid


@pytest.mark.parametrize("load", LOADS, ids=LOADS)
@pytest.mark.parametrize("policy", POLICIES + ["larry"], ids=POLICIES + ["larry"])
def test_stats_of_a_pending_run_equal_applying_it(policy, load):
    counted, counted_results, (_, _, counted_steps, counted_free) = _replicas_with_refreshes(policy, load, "stats")
    applied, applied_results, (_, _, applied_steps, applied_free) = _replicas_with_refreshes(policy, load, "applied")
    assert counted == applied  # every published number, exactly
    assert len(counted) > 100 and any(p["num_running"] > 1 for p in counted)
    # Applying a run in pieces sums its step times in another order: the same decisions, times to rounding.
    _assert_same_results(counted_results, applied_results)
    assert (counted_steps, counted_free) == (applied_steps, applied_free)


@pytest.mark.parametrize("policy", POLICIES + ["larry"], ids=POLICIES + ["larry"])
def test_stats_leave_a_run_alone(policy):
    # Nothing waits under the light load, so a refresh never applies a run: the replica runs exactly as
    # without refreshes, floats included.
    _, with_stats, end_with = _replicas_with_refreshes(policy, "light", "stats")
    _, without, end_without = _replicas_with_refreshes(policy, "light", "none")
    assert with_stats == without and end_with == end_without


# ---- a finished request's blocks: a run of unhashed blocks, placed as registering them would ------------


class _RegisteringScheduler(Scheduler):
    """The finish before ``BlockPool.free_finished``: private blocks hashed, registered, then freed."""

    def _finish(self, request, now):
        request.status = RequestStatus.FINISHED
        request.finish_time = now
        self.running.remove(request)
        self._release(request)
        del self.requests[request.request_id]


def _step_all(cls: type, config: dict, specs) -> list:
    sched = cls(
        SchedulerConfig(num_blocks=config["num_blocks"], block_size=config["block_size"],
                        max_num_batched_tokens=config["budget"], max_num_seqs=config["max_seqs"],
                        max_model_len=config["max_len"], watermark=config["watermark"]),
        make_engine_policy(config["policy"]),
    )
    pending = sorted(specs, key=lambda s: s[3])
    reqs, trail = {}, []
    while pending or sched.has_work():
        while pending and pending[0][3] <= sched.num_steps:
            rid, prompt, max_tokens, arrival, priority = pending.pop(0)
            reqs[rid] = req(rid, prompt, max_tokens, float(arrival), priority=priority)
            sched.add_request(reqs[rid])
        sched.update_from_output(sched.schedule(float(sched.num_steps)), float(sched.num_steps))
        sched.pool.check_invariants()
        p = sched.pool
        trail.append((p.free_queue, p.ref_cnt, p.num_evictions, {rid: list(b) for rid, b in p.req_blocks.items()},
                      {rid: (r.num_computed_tokens, r.num_cached_tokens, r.num_preemptions, r.finish_time)
                       for rid, r in reqs.items()}))
        assert sched.num_steps < 20_000, "livelock"
    return trail


@settings(max_examples=60, deadline=None)
@given(small_workloads())
def test_finished_blocks_are_freed_as_registering_them_would(workload):
    config, specs = workload
    assert _step_all(Scheduler, config, specs) == _step_all(_RegisteringScheduler, config, specs)
