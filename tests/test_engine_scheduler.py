"""The step scheduler, driven one step at a time with exact token and block counts (vLLM V1 semantics).

Unless a test says otherwise the engine has 8 blocks of 4 tokens (32 KV slots), a 16-token budget, 8 seqs.
Notation in comments: ``total`` = slots a request needs this step (computed + scheduled tokens),
``blocks = cdiv(total, 4)``; "out k" = output tokens after the step; "free" = free blocks after the step.
A request samples a token in the step its computed tokens reach its token count.
"""

from __future__ import annotations

import pytest

from halffull.replicas.engine.request import RequestStatus, hash_trace_blocks
from tests.helpers import make_sched, req, run_to_idle, step, step_out


def drive(sched, table):
    """Run one step per row; each row is (scheduled, preempted, finished, free blocks after the step)."""
    for k, (scheduled, preempted, finished, free) in enumerate(table, start=1):
        got = step(sched)
        assert got == (scheduled, preempted, finished), f"step {k}"
        assert sched.num_free_blocks == free, f"step {k}: free blocks"


# ---- one request: chunked prefill, decode, finish -----------------------------------------------------

SINGLE = {
    # prompt 10 fits the budget: 10 tokens (3 blocks), then one token a step; finish at out 3 frees all.
    "prefill-in-one-step": (10, 3, {}, [(10, 5, 1), (1, 5, 2), (1, 8, 3)]),
    # budget 6: 6 tokens (2 blocks, nothing sampled), then 4 (total 10 -> 3 blocks, sample), then decode.
    "chunked-by-budget": (10, 3, {"budget": 6}, [(6, 6, 0), (4, 5, 1), (1, 5, 2), (1, 8, 3)]),
    # long_prefill_token_threshold 4 caps each chunk at 4 tokens although the budget is 16.
    "chunked-by-threshold": (10, 2, {"long_prefill_token_threshold": 4}, [(4, 7, 0), (4, 6, 0), (2, 5, 1), (1, 8, 2)]),
    # budget 1: a one-token budget still makes progress, one token a step.
    "budget-one": (3, 2, {"budget": 1}, [(1, 7, 0), (1, 7, 0), (1, 7, 1), (1, 8, 2)]),
    # prompt 4 fills block 0; the first decode (total 5) takes block 1, total 9 takes block 2.
    "decode-crosses-blocks": (4, 6, {}, [(4, 7, 1), (1, 6, 2), (1, 6, 3), (1, 6, 4), (1, 6, 5), (1, 8, 6)]),
    # max_tokens 1: the prefill step samples the only token and finishes.
    "max-tokens-one": (5, 1, {}, [(5, 8, 1)]),
    # the request fills the whole pool: 28 + 4 = 32 slots = 8 blocks.
    "fills-the-pool": (28, 4, {}, [(16, 4, 0), (12, 1, 1), (1, 0, 2), (1, 0, 3), (1, 8, 4)]),
}


@pytest.mark.parametrize("prompt,max_tokens,kw,rows", SINGLE.values(), ids=SINGLE.keys())
def test_single_request_trajectory(prompt, max_tokens, kw, rows):
    sched = make_sched(**kw)
    r = req("a", prompt, max_tokens)
    sched.add_request(r)
    for k, (num_scheduled, free, out_tokens) in enumerate(rows, start=1):
        scheduled, preempted, finished = step(sched)
        assert scheduled == {"a": num_scheduled}, f"step {k}"
        assert preempted == []
        assert sched.num_free_blocks == free, f"step {k}: free blocks"
        assert r.num_output_tokens == out_tokens, f"step {k}: output tokens"
        assert finished == (["a"] if k == len(rows) else [])
    first = next(k for k, row in enumerate(rows, start=1) if row[2] == 1)
    assert r.first_token_time == float(first)
    assert r.finish_time == float(len(rows))
    assert r.status == RequestStatus.FINISHED
    assert r.num_preemptions == 0 and r.num_cached_tokens == 0
    assert not sched.has_work() and sched.requests == {}
    assert sched.num_steps == len(rows)


def test_running_requests_take_the_budget_first():
    # budget 8. A (4 tokens, out 5) and B (prompt 20, out 2), both waiting at step 1.
    sched = make_sched(budget=8)
    sched.add_request(req("a", 4, 5))
    sched.add_request(req("b", 20, 2))
    drive(sched, [
        ({"a": 4, "b": 4}, [], [], 6),  # A 4 (1 block), B's first chunk 4 (1 block)
        ({"a": 1, "b": 7}, [], [], 3),  # A total 5 -> 2 blocks; B gets the 7 left: total 11 -> 3 blocks
        ({"a": 1, "b": 7}, [], [], 1),  # B total 18 -> 5 blocks
        ({"a": 1, "b": 2}, [], [], 1),  # B's last 2 prompt tokens (total 20), samples
        ({"a": 1, "b": 1}, [], ["a", "b"], 8),  # A out 5, B out 2: both finish, every block back
    ])


# ---- admission: head-of-line blocking, max_num_seqs ---------------------------------------------------


def test_head_of_line_blocking():
    # budget 64. A prompt 20 (+8 out: 7 blocks), B prompt 16 (4 blocks now), C prompt 4 (1 block now).
    sched = make_sched(budget=64)
    for r in (req("a", 20, 8), req("b", 16, 4), req("c", 4, 2)):
        sched.add_request(r)
    out, _ = step_out(sched)
    # A takes 5 blocks, 3 free. B needs 4: refused; C would fit in 1 block but waits behind B.
    assert {r.request_id: n for r, n in out.num_scheduled_tokens.items()} == {"a": 20}
    assert out.waiting_blocked
    assert sched.num_free_blocks == 3
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    # A decodes: total 21 -> 6 blocks (2 free), total 25 -> 7 blocks (1 free) at step 6; finishes at step 8.
    free_after = {2: 2, 3: 2, 4: 2, 5: 2, 6: 1, 7: 1, 8: 8}
    for k in range(2, 9):
        scheduled, _, finished = step(sched)
        assert scheduled == {"a": 1}, f"step {k}"
        assert sched.num_free_blocks == free_after[k], f"step {k}"
        assert finished == (["a"] if k == 8 else [])
    # step 9: B (4 blocks) then C (1 block)
    assert step(sched) == ({"b": 16, "c": 4}, [], [])
    assert sched.num_free_blocks == 3


@pytest.mark.parametrize("max_seqs", [1, 2, 3], ids=["seqs-1", "seqs-2", "seqs-3"])
def test_max_num_seqs_caps_running(max_seqs):
    # A (out 1), B (out 3), C (out 1), each 4 tokens; all fit in memory and budget at once.
    sched = make_sched(max_seqs=max_seqs)
    for r in (req("a", 4, 1), req("b", 4, 3), req("c", 4, 1)):
        sched.add_request(r)
    expected = {
        1: [({"a": 4}, [], ["a"]), ({"b": 4}, [], []), ({"b": 1}, [], []), ({"b": 1}, [], ["b"]),
            ({"c": 4}, [], ["c"])],
        # A finishes in step 1, freeing a seat for C in step 2.
        2: [({"a": 4, "b": 4}, [], ["a"]), ({"b": 1, "c": 4}, [], ["c"]), ({"b": 1}, [], ["b"])],
        3: [({"a": 4, "b": 4, "c": 4}, [], ["a", "c"]), ({"b": 1}, [], []), ({"b": 1}, [], ["b"])],
    }[max_seqs]
    for k, row in enumerate(expected, start=1):
        out, finished = step_out(sched)
        assert len(sched.running) + len(finished) <= max_seqs
        got = ({r.request_id: n for r, n in out.num_scheduled_tokens.items()}, [], [r.request_id for r in finished])
        assert got == row, f"step {k}"
    assert not sched.has_work()


# ---- preemption (fcfs) --------------------------------------------------------------------------------


def test_fcfs_preempts_last_admitted_puts_it_in_front_and_recomputes():
    # budget 32. A and B: prompt 12, out 12 (6 blocks each at the end; only 8 exist). C arrives after step 1.
    sched = make_sched(budget=32)
    a, b, c = req("a", 12, 12), req("b", 12, 12), req("c", 4, 1)
    sched.add_request(a)
    sched.add_request(b)
    # step 1: A blocks [0 1 2], B [3 4 5]; free [6 7]
    assert step(sched) == ({"a": 12, "b": 12}, [], [])
    sched.add_request(c)
    # step 2: total 13 each -> A takes 6, B takes 7; free 0. C (1 block) does not fit.
    assert step(sched) == ({"a": 1, "b": 1}, [], [])
    assert sched.num_free_blocks == 0
    for _ in range(3):  # steps 3..5: totals 14..16 fit in 4 blocks
        assert step(sched) == ({"a": 1, "b": 1}, [], [])
    assert b.num_output_tokens == 5 and b.num_tokens == 17
    # step 6: A's total 17 needs a 5th block. Victim = running[-1] = B (last admitted): its blocks go back
    # last first, free queue [7 5 4 3]; A takes 7 (B's 4th block, evicted). No admission this step.
    out, _ = step_out(sched)
    assert out.preempted == [b] and {r.request_id: n for r, n in out.num_scheduled_tokens.items()} == {"a": 1}
    assert not out.admitted and not out.waiting_blocked
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.num_output_tokens == 5  # generated tokens are kept, to be recomputed
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # front of the queue, ahead of C
    assert sched.num_free_blocks == 3 and sched.num_preemptions == 1
    # steps 7..11: B (17 tokens) needs 5 blocks: its cached blocks 3 4 5 hit but are evictable, so
    # 2 new + 3 hits = 5 > 3 free; it blocks C behind it. A takes block 5 at total 21 (step 10, evicting
    # B's third block): 3 new + 2 hits = 5 > 2.
    for k in range(7, 12):
        assert step(sched) == ({"a": 1}, [], []), f"step {k}"
        assert sched.num_free_blocks == (3 if k < 10 else 2), f"step {k}"
    # step 12: A out 12 finishes; its blocks return: free queue [4 3 5 7 6 2 1 0]
    assert step(sched) == ({"a": 1}, [], ["a"])
    assert sched.num_free_blocks == 8
    # step 13: B hits its own blocks 3 and 4 (8 tokens; block 5 was evicted) and recomputes the other 9
    # tokens of prompt + generated (17 - 8), total 17 -> 5 blocks; then C (1 block).
    assert step(sched) == ({"b": 9, "c": 4}, [], ["c"])
    assert b.num_computed_tokens == 17 and b.num_output_tokens == 6
    assert b.num_cached_tokens == 0  # set at the first admission only
    assert sched.pool.req_blocks["b"][:2] == [3, 4]
    assert sched.num_free_blocks == 3
    run_to_idle(sched)
    assert b.num_output_tokens == 12 and sched.num_free_blocks == 8


NO_CACHE_PREEMPT = [
    # A: prompt 16, out 12 (7 blocks at the end); B: prompt 4, out 12. Chunks of at most 4, no prefix cache.
    # (scheduled, preempted, finished, free)
    ({"a": 4, "b": 4}, [], [], 6),  # 1: B's whole prompt, B out 1
    ({"a": 4, "b": 1}, [], [], 4),  # 2: A total 8 (2 blocks), B total 5 (2 blocks)
    ({"a": 4, "b": 1}, [], [], 3),  # 3: A total 12 (3 blocks)
    ({"a": 4, "b": 1}, [], [], 2),  # 4: A total 16 (4 blocks), A out 1
    ({"a": 1, "b": 1}, [], [], 1),  # 5: A total 17 (5 blocks)
    ({"a": 1, "b": 1}, [], [], 0),  # 6: B total 9 (3 blocks)
    ({"a": 1, "b": 1}, [], [], 0),  # 7
    ({"a": 1, "b": 1}, [], [], 0),  # 8: B out 8, 12 tokens
    # 9: A total 21 needs block 6: B preempted (3 blocks back), A takes one. B would fit (a 4-token chunk
    #    needs 1 block, 2 are free) but nothing is admitted in a step that preempted.
    ({"a": 1}, ["b"], [], 2),
    ({"a": 1, "b": 4}, [], [], 1),  # 10: B resumes: chunk 4 of its 12 tokens (prompt + 8 generated)
    ({"a": 1, "b": 4}, [], [], 0),  # 11: B total 8 (2 blocks)
    # 12: B's total 12 needs a 3rd block, none free: B is running[-1], so it is its own victim.
    ({"a": 1}, ["b"], [], 2),
    ({"a": 1, "b": 4}, [], [], 0),  # 13: A total 25 (7 blocks), B 1 block
    ({"a": 1}, ["b"], [], 1),  # 14: B total 8 needs a block: own victim again
    ({"a": 1, "b": 4}, [], ["a"], 7),  # 15: B back in; A out 12 finishes, 7 blocks back
    ({"b": 4}, [], [], 6),  # 16: B total 8
    ({"b": 4}, [], [], 5),  # 17: B total 12: recomputed prompt + generated, samples out 9
    ({"b": 1}, [], [], 4),  # 18: total 13 (4 blocks)
    ({"b": 1}, [], [], 4),  # 19
    ({"b": 1}, [], ["b"], 8),  # 20: out 12
]


def test_fcfs_no_admission_in_a_preemption_step_and_own_victim():
    # Chunk-level admission (vLLM with scheduler_reserve_full_isl off) so B re-enters in 4-token chunks.
    sched = make_sched(enable_prefix_caching=False, long_prefill_token_threshold=4, reserve_full_isl=False)
    a, b = req("a", 16, 12), req("b", 4, 12)
    sched.add_request(a)
    sched.add_request(b)
    drive(sched, NO_CACHE_PREEMPT)
    assert b.num_preemptions == 3 and a.num_preemptions == 0 and sched.num_preemptions == 3
    assert b.first_token_time == 1.0 and b.finish_time == 20.0


@pytest.mark.parametrize("reserve_full_isl,admitted", [(True, False), (False, True)], ids=["gate-on", "gate-off"])
def test_full_sequence_admission_gate(reserve_full_isl, admitted):
    # vLLM 0.32's scheduler_reserve_full_isl: 8 blocks of 4. A (prompt 20) holds 5 blocks; B (prompt 16 = 4
    # blocks) arrives with 3 free. Its first 3-token chunk would fit in one block, but its prompt cannot.
    sched = make_sched(budget=8, reserve_full_isl=reserve_full_isl)
    sched.add_request(req("a", 20, 4))
    step(sched)
    step(sched)
    step(sched)  # A: 8 + 8 + 4 prompt tokens -> 5 blocks, first token sampled
    assert sched.num_free_blocks == 3
    sched.add_request(req("b", 16, 2))
    scheduled = step(sched)[0]
    assert ("b" in scheduled) is admitted


# ---- priority -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy,order",
    [("fcfs", ["x", "y", "z", "w"]), ("priority", ["z", "y", "x", "w"]), ("no_preempt", ["x", "y", "z", "w"])],
    ids=["fcfs-queue-order", "priority-then-arrival", "no_preempt-queue-order"],
)
def test_waiting_order(policy, order):
    # one seat: requests run one at a time in the policy's waiting order
    sched = make_sched(max_seqs=1, policy=policy)
    for rid, prio, arrival in (("x", 1, 0.0), ("y", 0, 2.0), ("z", 0, 1.0), ("w", 2, -1.0)):
        sched.add_request(req(rid, 4, 1, arrival, priority=prio))
    got = [next(iter(step(sched)[0])) for _ in range(4)]
    assert got == order


@pytest.mark.parametrize(
    "policy,step7",
    [
        # max (priority, arrival) = A (1, 0), already scheduled this step: its token goes back to the budget
        # and C's chunk is 7 (13 left, budget 8 - B's 1) instead of 6.
        ("priority", ({"b": 1, "c": 7}, ["a"], [], 0)),
        # fcfs on the same workload: the victim is the last admitted (C, 7 blocks), not yet scheduled.
        ("fcfs", ({"a": 1, "b": 1}, ["c"], [], 6)),
    ],
    ids=["priority-victim-scheduled-earlier", "fcfs-victim-last-admitted"],
)
def test_victim_choice(policy, step7):
    # 12 blocks, budget 8. A (priority 1, prompt 4) runs alone for a step; then B (priority 0, prompt 4) and
    # C (priority 0, prompt 40, out 1) arrive. Running order: A, B, C.
    # Chunk-level admission (scheduler_reserve_full_isl off): C's 40-token prompt enters 3 tokens at a time.
    sched = make_sched(num_blocks=12, budget=8, policy=policy, reserve_full_isl=False)
    a = req("a", 4, 30, 0.0, priority=1)
    sched.add_request(a)
    assert step(sched) == ({"a": 4}, [], [])
    sched.add_request(req("b", 4, 30, 1.0, priority=0))
    sched.add_request(req("c", 40, 1, 2.0, priority=0))
    drive(sched, [
        ({"a": 1, "b": 4, "c": 3}, [], [], 8),  # 2: A total 5 (2 blocks), B 1 block, C 3 tokens (1 block)
        ({"a": 1, "b": 1, "c": 6}, [], [], 5),  # 3: B total 5 (2 blocks), C total 9 (3 blocks)
        ({"a": 1, "b": 1, "c": 6}, [], [], 4),  # 4: C total 15 (4 blocks)
        ({"a": 1, "b": 1, "c": 6}, [], [], 2),  # 5: C total 21 (6 blocks)
        ({"a": 1, "b": 1, "c": 6}, [], [], 0),  # 6: A total 9 (3 blocks), C total 27 (7 blocks)
        # 7: A total 10 fits; B's total 9 needs a 3rd block and none is free.
        step7,
    ])
    run_to_idle(sched)
    assert sched.num_free_blocks == 12


def test_priority_own_victim_and_resume_by_priority():
    # 4 blocks. A (priority 2) runs a step alone, then B (priority 1) arrives: running order A, B.
    # Both: prompt 4, out 8 (3 blocks each at the end).
    sched = make_sched(num_blocks=4, budget=32, policy="priority")
    a, b = req("a", 4, 8, 0.0, priority=2), req("b", 4, 8, 1.0, priority=1)
    sched.add_request(a)
    assert step(sched) == ({"a": 4}, [], [])  # A: block 0
    sched.add_request(b)
    drive(sched, [
        ({"a": 1, "b": 4}, [], [], 1),  # 2: A total 5 takes block 1, B block 2
        ({"a": 1, "b": 1}, [], [], 0),  # 3: B total 5 takes block 3
        ({"a": 1, "b": 1}, [], [], 0),
        ({"a": 1, "b": 1}, [], [], 0),  # 5: A total 8
        # 6: A's total 9 needs a 3rd block; the victim max (priority, arrival) is A itself. The running
        # loop stops there (vLLM: "cannot schedule this request"), so B gets nothing this step either.
        ({}, ["a"], [], 2),
    ])
    # D (priority 0) arrives after A was preempted: it goes ahead of A, which fcfs would put in front.
    d = req("d", 3, 1, 2.0, priority=0)
    sched.add_request(d)
    # 7: free queue [1 0] (A's blocks, last first). B total 9 takes 1; D takes 0. A (9 tokens: 3 blocks)
    # waits.
    assert step(sched) == ({"b": 1, "d": 3}, [], ["d"])
    assert a.status == RequestStatus.PREEMPTED and a.num_output_tokens == 5 and a.num_computed_tokens == 0
    assert [r.request_id for r in sched.waiting] == ["a"]
    run_to_idle(sched)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8 and sched.num_free_blocks == 4


# ---- no_preempt ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy,c_prompt,c_max,admitted",
    [
        # After A (prompt 8, out 8: 4 blocks, holds 2) and B (prompt 4, out 8: 3 blocks, holds 1): 5 free,
        # 2 + 2 still reserved. C needs prompt+max blocks <= 5 - 4 = 1.
        ("no_preempt", 3, 1, True),  # 4 tokens: 1 block, fits exactly
        ("no_preempt", 4, 1, False),  # 5 tokens: 2 blocks, one over
        ("no_preempt", 3, 2, False),
        ("fcfs", 4, 1, True),  # fcfs only needs the prompt's block now
        ("fcfs", 4, 20, True),
    ],
    ids=["np-fits-exactly", "np-one-over", "np-output-over", "fcfs-admits", "fcfs-admits-long-output"],
)
def test_no_preempt_admission_reserves_prompt_plus_max_tokens(policy, c_prompt, c_max, admitted):
    sched = make_sched(policy=policy)
    for r in (req("a", 8, 8), req("b", 4, 8), req("c", c_prompt, c_max)):
        sched.add_request(r)
    scheduled, _, _ = step(sched)
    assert scheduled.keys() == ({"a", "b", "c"} if admitted else {"a", "b"})


def test_no_preempt_first_request_of_two_is_refused_when_reservation_exceeds_memory():
    # A reserves 6 of 8 blocks (prompt 4 + out 20); B (prompt 4 + out 8: 3 blocks) waits until A finishes.
    sched = make_sched(policy="no_preempt")
    sched.add_request(req("a", 4, 20))
    sched.add_request(req("b", 4, 8))
    assert step(sched) == ({"a": 4}, [], [])
    for k in range(2, 21):
        scheduled, preempted, finished = step(sched)
        assert scheduled == {"a": 1} and preempted == [], f"step {k}"
    assert finished == ["a"]
    assert step(sched) == ({"b": 4}, [], [])


def _burst(n: int, prompt: int, max_tokens: int):
    return [req(f"r{i}", prompt, max_tokens, float(i)) for i in range(n)]


@pytest.mark.parametrize(
    "n,prompt,max_tokens,num_blocks",
    [(6, 4, 20, 8), (10, 6, 10, 10), (5, 13, 15, 12)],
    ids=["six-long-outputs", "ten-mixed", "five-large"],
)
def test_no_preempt_never_preempts_where_fcfs_does(n, prompt, max_tokens, num_blocks):
    preemptions = {}
    for policy in ("fcfs", "no_preempt"):
        sched = make_sched(num_blocks=num_blocks, budget=32, policy=policy)
        reqs = _burst(n, prompt, max_tokens)
        for r in reqs:
            sched.add_request(r)
        while sched.has_work():
            running_before = list(sched.running)
            out, _ = step_out(sched)
            if policy == "no_preempt":
                # every running request gets its tokens: reserved memory never runs out
                assert all(r in out.num_scheduled_tokens for r in running_before)
        assert all(r.num_output_tokens == max_tokens for r in reqs)
        assert sched.num_free_blocks == num_blocks
        preemptions[policy] = sched.num_preemptions
    assert preemptions["fcfs"] > 0
    assert preemptions["no_preempt"] == 0


# ---- prefix caching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,hit,b_scheduled,free",
    [
        # A (prompt = ids 0..L-1, out 4) runs a step; B with the same ids arrives. Hits are capped at
        # num_tokens - 1 = L - 1 tokens, rounded down to blocks.
        (10, 8, 2, 4),  # A: 3 blocks, 2 full. Step 2: A total 11; B hits 2, new 1 -> free 8-3-1
        (8, 4, 4, 4),  # A: 2 full; step 2 A total 9 -> 3 blocks. B: cap 7 -> 1 block hit, 1 new
        (12, 8, 4, 3),  # A: 3 full; A total 13 -> 4 blocks. B: cap 11 -> 2 hits, 1 new
        (16, 12, 4, 2),  # A: 4 full; A total 17 -> 5. B: cap 15 -> 3 hits, 1 new
        (3, 0, 3, 6),  # no full block: nothing to hit
        (4, 0, 4, 5),  # one full block but the cap (3 tokens) is below a block; A total 5 -> 2 blocks
    ],
    ids=["len10", "len8", "len12", "len16", "len3", "len4"],
)
def test_prefix_hit_on_same_prompt(length, hit, b_scheduled, free):
    sched = make_sched()
    tokens = list(range(length))
    a = req("a", tokens, 4)
    sched.add_request(a)
    step(sched)
    b = req("b", tokens, 4)
    sched.add_request(b)
    assert step(sched) == ({"a": 1, "b": b_scheduled}, [], [])
    assert b.num_cached_tokens == hit
    assert b.num_computed_tokens == length and b.num_output_tokens == 1
    assert sched.num_free_blocks == free
    shared = hit // 4
    assert sched.pool.req_blocks["b"][:shared] == sched.pool.req_blocks["a"][:shared]
    assert all(sched.pool.ref_cnt[blk] == 2 for blk in sched.pool.req_blocks["b"][:shared])


def test_prefix_hit_within_the_same_step():
    # B is admitted after A in the same step and hits the blocks A's allocation just registered (vLLM too).
    sched = make_sched()
    tokens = list(range(10))
    a, b = req("a", tokens, 2), req("b", tokens, 2)
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched) == ({"a": 10, "b": 2}, [], [])
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 8)
    assert sched.num_free_blocks == 4


def test_prefix_hit_disabled():
    sched = make_sched(budget=32, enable_prefix_caching=False)
    tokens = list(range(10))
    sched.add_request(req("a", tokens, 2))
    sched.add_request(req("b", tokens, 2))
    assert step(sched) == ({"a": 10, "b": 10}, [], [])
    assert sched.num_free_blocks == 2


@pytest.mark.parametrize(
    "filler,hit,evictions",
    [
        # A (ids 0..11, out 1) finishes in step 1: free queue [3 4 5 6 7 2 1 0], blocks 0 1 2 cached.
        # X (filler tokens, out 1) takes blocks from the head in step 2; B (ids 0..11 + 4 more) hits what is
        # left in step 3 (at most 3 blocks: cap 15 tokens).
        (4, 12, 0),  # X takes 3
        (20, 12, 0),  # X takes 3..7: no cached block touched
        (24, 8, 1),  # X also takes 2 = A's last block (tail blocks are evicted first)
        (28, 4, 2),  # ... and 1
    ],
    ids=["filler-1-block", "filler-5-blocks", "evict-1", "evict-2"],
)
def test_freed_blocks_stay_hittable_until_evicted_lru(filler, hit, evictions):
    sched = make_sched(budget=32)
    sched.add_request(req("a", list(range(12)), 1))
    assert step(sched) == ({"a": 12}, [], ["a"])
    assert list(sched.pool.free_queue) == [3, 4, 5, 6, 7, 2, 1, 0]
    sched.add_request(req("x", filler, 1))
    step(sched)
    assert sched.pool.num_evictions == evictions
    b = req("b", list(range(12)) + [100, 101, 102, 103], 1)
    sched.add_request(b)
    assert step(sched) == ({"b": 16 - hit}, [], ["b"])
    assert b.num_cached_tokens == hit


@pytest.mark.parametrize(
    "a_ids,b_ids,prompt,trace_block,hit",
    [
        # trace_block 8 = two engine blocks per trace id; 13 tokens: 3 full blocks, cap 12 tokens.
        ([7, 8], [7, 8], 13, 8, 12),
        ([7, 8], [7, 9], 13, 8, 8),  # share the first trace block only
        ([7, 8], [6, 8], 13, 8, 0),  # chained: a different first id shares nothing
        ([7, 8], [7], 13, 8, 8),  # B's ids cover 8 tokens; its third block is salted (private)
        ([5], [5], 20, 512, 16),  # the real 512-token trace block: 5 blocks, cap 19 tokens -> 4
        ([5], [6], 20, 512, 0),
    ],
    ids=["same-ids", "first-id-shared", "first-id-differs", "b-shorter-ids", "trace512-same", "trace512-differs"],
)
def test_trace_hash_ids_share_blocks(a_ids, b_ids, prompt, trace_block, hit):
    sched = make_sched(num_blocks=16, budget=32)
    a = req("a", prompt, 4, block_hashes=hash_trace_blocks(a_ids, prompt, 4, trace_block))
    sched.add_request(a)
    step(sched)
    b = req("b", prompt, 4, block_hashes=hash_trace_blocks(b_ids, prompt, 4, trace_block))
    sched.add_request(b)
    assert step(sched) == ({"a": 1, "b": prompt - hit}, [], [])
    assert b.num_cached_tokens == hit


def test_duplicate_block_from_the_hit_cap_stays_hittable():
    # A and B: the same 8-token prompt. B's hit is capped at 7 tokens -> 1 block, so B computes its own copy
    # of block 1 (a duplicate of A's). A finishes; X evicts A's copy; C (the prompt + 2 tokens) should still
    # hit B's copy, which B holds: 8 cached tokens in vLLM.
    sched = make_sched(budget=64)
    sched.add_request(req("a", list(range(8)), 1))
    sched.add_request(req("b", list(range(8)), 12))
    assert step(sched) == ({"a": 8, "b": 4}, [], ["a"])  # A: blocks 0 1; B: hit 0, new 2; free [3 4 5 6 7 1]
    sched.add_request(req("x", 17, 1))
    assert step(sched) == ({"b": 1, "x": 17}, [], ["x"])  # X takes 4 5 6 7 1: A's block 1 evicted
    assert sched.pool.num_evictions == 1
    c = req("c", list(range(8)) + [50, 51], 1)
    sched.add_request(c)
    step(sched)
    assert c.num_cached_tokens == 8


def test_length_only_prompts_never_share():
    sched = make_sched()
    sched.add_request(req("a", 12, 4))
    step(sched)
    b = req("b", 12, 4)
    sched.add_request(b)
    assert step(sched) == ({"a": 1, "b": 12}, [], [])
    assert b.num_cached_tokens == 0


# ---- abort --------------------------------------------------------------------------------------------


def test_abort_waiting_running_and_unknown():
    sched = make_sched(budget=64)
    a, b, c = req("a", 20, 8), req("b", 16, 4), req("c", 4, 2)
    for r in (a, b, c):
        sched.add_request(r)
    step(sched)  # A runs (5 blocks); B and C wait (head-of-line)
    assert sched.abort("b") is b and b.status == RequestStatus.ABORTED
    assert [r.request_id for r in sched.waiting] == ["c"]
    assert sched.num_free_blocks == 3  # waiting requests hold nothing
    assert sched.abort("a") is a and a.status == RequestStatus.ABORTED
    assert sched.running == [] and sched.num_free_blocks == 8
    assert sched.abort("a") is None  # twice
    assert sched.abort("nope") is None
    assert step(sched) == ({"c": 4}, [], [])
    assert sched.num_unfinished == 1
    step(sched)
    assert sched.abort("c") is None  # finished requests are gone
    assert not sched.has_work() and sched.num_free_blocks == 8


def test_abort_preempted_request():
    sched = make_sched(enable_prefix_caching=False, long_prefill_token_threshold=4)
    b = req("b", 4, 12)
    sched.add_request(req("a", 16, 12))
    sched.add_request(b)
    drive(sched, NO_CACHE_PREEMPT[:9])  # step 9 preempts B
    assert b.status == RequestStatus.PREEMPTED
    assert sched.abort("b") is b
    assert list(sched.waiting) == [] and sched.num_free_blocks == 2
    run_to_idle(sched)
    assert sched.num_free_blocks == 8


def test_abort_between_schedule_and_update():
    sched = make_sched()
    a = req("a", 8, 4)
    sched.add_request(a)
    out = sched.schedule(1.0)
    sched.abort("a")
    assert sched.update_from_output(out, 1.0) == []
    assert a.num_computed_tokens == 0 and a.num_output_tokens == 0 and a.first_token_time is None
    assert sched.num_free_blocks == 8
    sched.pool.check_invariants()


# ---- add_request validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,prompt,max_tokens,ok",
    [
        ({"max_len": 16}, 10, 6, True),  # exactly max_model_len
        ({"max_len": 16}, 10, 7, False),  # one over max_model_len
        ({"num_blocks": 2}, 6, 2, True),  # 8 tokens = 2 blocks: fits the pool exactly
        ({"num_blocks": 2}, 6, 3, False),  # 9 tokens = 3 blocks > 2: can never fit
        ({}, 32, 1, False),  # 33 tokens > 32 slots
    ],
    ids=["max-len-exact", "max-len-over", "pool-exact", "pool-over", "default-pool-over"],
)
def test_add_request_validation(kw, prompt, max_tokens, ok):
    sched = make_sched(**kw)
    r = req("a", prompt, max_tokens)
    if ok:
        sched.add_request(r)
        run_to_idle(sched)
        assert r.num_output_tokens == max_tokens
    else:
        with pytest.raises(ValueError):
            sched.add_request(r)
        assert not sched.has_work() and sched.requests == {}


def test_duplicate_request_id_rejected():
    sched = make_sched()
    sched.add_request(req("a", 4, 1))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(req("a", 4, 1))


@pytest.mark.parametrize("prompt,max_tokens", [(0, 1), (1, 0)], ids=["empty-prompt", "zero-max-tokens"])
def test_request_rejects_empty(prompt, max_tokens):
    with pytest.raises(ValueError):
        req("a", prompt, max_tokens)


@pytest.mark.parametrize(
    "kw", [{"watermark": 1.0}, {"watermark": -0.1}, {"budget": 0}, {"max_seqs": 0}],
    ids=["watermark-one", "watermark-negative", "zero-budget", "zero-seqs"],
)
def test_config_validation(kw):
    with pytest.raises(ValueError):
        make_sched(**kw)


# ---- watermark ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "watermark,prompts,admitted",
    [
        # 0.25 of 8 blocks = 2 reserved, but only when another request is already scheduled in the step.
        (0.25, [("a", 4), ("b", 24)], ["a"]),  # B: 6 + 2 > 7 free
        (0.0, [("a", 4), ("b", 24)], ["a", "b"]),
        (0.25, [("b", 24), ("a", 4)], ["b"]),  # B alone: no reserve (2 left); A: 1 + 2 > 2
        (0.0, [("b", 24), ("a", 4)], ["b", "a"]),
        (0.25, [("c", 28)], ["c"]),  # alone: 7 blocks leave 1 < 2 free, admitted anyway
        (0.25, [("a", 4), ("d", 20)], ["a", "d"]),  # D: 5 + 2 <= 7
    ],
    ids=["wm-blocks-second", "no-wm", "wm-first-alone-ok", "no-wm-reverse", "wm-alone", "wm-second-fits"],
)
def test_watermark_applies_only_when_others_are_scheduled(watermark, prompts, admitted):
    sched = make_sched(budget=64, watermark=watermark)
    for rid, prompt in prompts:
        sched.add_request(req(rid, prompt, 4))
    scheduled, _, _ = step(sched)
    assert list(scheduled) == admitted
    run_to_idle(sched)  # running requests' own allocations ignore the watermark: everyone finishes
    assert sched.num_free_blocks == 8


@pytest.mark.parametrize("watermark,admitted", [(0.25, False), (0.0, True)], ids=["wm", "no-wm"])
def test_watermark_with_a_running_request(watermark, admitted):
    # A runs (total 5 -> 2 blocks in step 2, 6 free). B (prompt 20: 5 blocks) arrives: 5 + 2 > 6 refused.
    sched = make_sched(budget=64, watermark=watermark)
    sched.add_request(req("a", 4, 10))
    step(sched)
    sched.add_request(req("b", 20, 1))
    scheduled, _, finished = step(sched)
    assert scheduled == ({"a": 1, "b": 20} if admitted else {"a": 1})
    assert finished == (["b"] if admitted else [])  # B (out 1) finishes in the step it is admitted
