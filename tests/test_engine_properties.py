"""Property tests of the step scheduler over random small workloads (hypothesis).

Every workload is driven one step at a time; after every step: blocks are conserved and reference counts
match the block tables (``check_invariants``), the token budget and ``max_num_seqs`` hold, every running
request holds slots for what it has computed, waiting requests hold nothing, and ``no_preempt`` never
preempts. Every request fits the pool alone, so every request must finish (liveness) within a bounded
number of steps, and the pool ends with every block free — with aborts mixed in too.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.replicas.engine.block_pool import cdiv
from halffull.replicas.engine.request import RequestStatus
from tests.helpers import make_sched, req

MAX_STEPS = 20_000
POLICIES = ["fcfs", "priority", "no_preempt"]


@dataclass(frozen=True)
class Spec:
    rid: str
    family: int  # -1: prompt by length only; else token ids family*1000 + j (families share prefixes)
    prompt: int
    max_tokens: int
    arrival_step: int
    priority: int


@st.composite
def workloads(draw, with_aborts: bool = False):
    bs = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(2, 12))
    capacity = num_blocks * bs
    config = dict(
        num_blocks=num_blocks,
        block_size=bs,
        budget=draw(st.integers(1, 24)),
        max_seqs=draw(st.integers(1, 6)),
        max_len=capacity,
        policy=draw(st.sampled_from(POLICIES)),
        watermark=draw(st.sampled_from([0.0, 0.0, 0.2])),
        enable_prefix_caching=draw(st.booleans()),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 3])),
    )
    specs = []
    for i in range(draw(st.integers(1, 10))):
        total = draw(st.integers(2, capacity))  # capacity >= 2: every request fits the pool alone
        prompt = draw(st.integers(1, total - 1))
        specs.append(Spec(
            rid=f"r{i}",
            family=draw(st.integers(-1, 2)),
            prompt=prompt,
            max_tokens=total - prompt,
            arrival_step=draw(st.integers(0, 20)),
            priority=draw(st.integers(0, 2)),
        ))
    aborts = []
    if with_aborts:
        aborts = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, len(specs) - 1)), max_size=4))
    return config, specs, aborts


def build(spec: Spec):
    prompt = spec.prompt if spec.family < 0 else [spec.family * 1000 + j for j in range(spec.prompt)]
    return req(spec.rid, prompt, spec.max_tokens, float(spec.arrival_step), priority=spec.priority)


def check_step(sched, out, config):
    bs = config["block_size"]
    assert out.total_tokens <= config["budget"]
    assert all(n >= 1 for n in out.num_scheduled_tokens.values())
    assert len(sched.running) <= config["max_seqs"]
    for r, n in out.num_scheduled_tokens.items():
        # slots for everything computed so far plus this step's tokens
        assert sched.pool.num_blocks_of(r) * bs >= out.computed_before[r] + n
        assert out.computed_before[r] + n <= r.num_tokens
    for r in sched.waiting:
        assert sched.pool.num_blocks_of(r) == 0
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
    if config["policy"] == "no_preempt":
        assert not out.preempted
    if out.preempted:
        assert not out.admitted  # no admission in a step that preempted


def drive(config, specs, aborts):
    """Run the workload to completion; returns (scheduler, requests, aborted ids)."""
    sched = make_sched(**config)
    reqs = {s.rid: build(s) for s in specs}
    arrivals = sorted(specs, key=lambda s: s.arrival_step)
    abort_at: dict[int, list[str]] = {}
    for k, i in aborts:
        abort_at.setdefault(k, []).append(specs[i].rid)
    aborted = set()
    k = 0
    while arrivals or sched.has_work():
        assert k < MAX_STEPS, f"livelock: {sched.requests}"
        while arrivals and arrivals[0].arrival_step <= k:
            sched.add_request(reqs[arrivals.pop(0).rid])
        for rid in abort_at.get(k, ()):
            if sched.abort(rid) is not None:
                aborted.add(rid)
                sched.pool.check_invariants()
        out = sched.schedule(float(k))
        check_step(sched, out, config)
        finished = sched.update_from_output(out, float(k) + 0.5)
        sched.pool.check_invariants()
        for r in finished:
            assert r.num_output_tokens == r.max_tokens and r.status == RequestStatus.FINISHED
        k += 1
    return sched, reqs, aborted


@settings(max_examples=60, deadline=None)
@given(workloads())
def test_conservation_budget_and_liveness(workload):
    config, specs, _ = workload
    sched, reqs, _ = drive(config, specs, [])
    for r in reqs.values():
        assert r.status == RequestStatus.FINISHED
        assert r.num_output_tokens == r.max_tokens
        assert r.first_token_time is not None and r.finish_time >= r.first_token_time
        assert 0 <= r.num_cached_tokens < r.num_prompt_tokens
    assert sched.num_free_blocks == config["num_blocks"]
    assert sched.requests == {} and not sched.waiting and not sched.running
    assert sched.pool.req_blocks == {}


@settings(max_examples=60, deadline=None)
@given(workloads(with_aborts=True))
def test_aborts_leave_every_block_free(workload):
    config, specs, aborts = workload
    sched, reqs, aborted = drive(config, specs, aborts)
    for rid, r in reqs.items():
        if rid in aborted:
            assert r.status == RequestStatus.ABORTED
        else:
            assert r.status == RequestStatus.FINISHED and r.num_output_tokens == r.max_tokens
    assert sched.num_free_blocks == config["num_blocks"]
    assert sched.pool.req_blocks == {} and sched.requests == {}


@settings(max_examples=60, deadline=None)
@given(workloads())
def test_no_preempt_never_preempts(workload):
    # Same workload under no_preempt: nothing is ever preempted, everything still finishes.
    config, specs, _ = workload
    config = dict(config, policy="no_preempt")
    sched, reqs, _ = drive(config, specs, [])
    assert sched.num_preemptions == 0
    assert all(r.num_preemptions == 0 for r in reqs.values())
    assert sched.num_free_blocks == config["num_blocks"]


@settings(max_examples=40, deadline=None)
@given(workloads())
def test_deterministic(workload):
    config, specs, _ = workload
    runs = []
    for _ in range(2):
        sched, reqs, _ = drive(config, specs, [])
        runs.append(([(r.first_token_time, r.finish_time, r.num_preemptions, r.num_cached_tokens)
                      for r in reqs.values()], sched.num_steps, list(sched.pool.free_queue)))
    assert runs[0] == runs[1]


def test_every_request_fits_alone_in_generated_workloads():
    # guard on the generator: the liveness property relies on it
    @settings(max_examples=30, deadline=None)
    @given(workloads())
    def check(workload):
        config, specs, _ = workload
        for s in specs:
            assert cdiv(s.prompt + s.max_tokens, config["block_size"]) <= config["num_blocks"]

    check()
