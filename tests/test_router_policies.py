"""Routing policies over hand-built snapshots: ranking rules, ties, stale stats, KV fit, prefix hits.

Every test builds snapshots by hand with the one-line helpers below and reads the ranking as a flat list
(``order``), after checking it is a permutation of the candidates in singleton tiers.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.router.accounting import RouterAccounting
from halffull.router.estimate import OutputLengthEstimator
from halffull.router.registry import POLICY_NAMES, make_policy
from halffull.router.types import Completion, ReplicaSnapshot, RequestView

BLOCK = 16  # prefix block size (tokens) used by the tests


def snap(rid: str, **fields) -> ReplicaSnapshot:
    """A replica snapshot; unset fields are the dataclass defaults (idle, no KV reported)."""
    return ReplicaSnapshot(rid, **fields)


def req(prompt: int = 100, max_tokens: int = 100, hashes: tuple[int, ...] = ()) -> RequestView:
    return RequestView("req", prompt, max_tokens, prefix_hashes=hashes, prefix_block_size=BLOCK)


def order(policy, replicas, request=None, seed: int = 0) -> list[str]:
    """Flat ranking, after checking singleton tiers that cover every candidate exactly once."""
    tiers = policy.choose(request or req(), replicas, now=0.0, rng=random.Random(seed))
    assert all(len(tier) == 1 for tier in tiers), tiers
    flat = [tier[0] for tier in tiers]
    assert sorted(flat) == sorted(r.replica_id for r in replicas), (flat, replicas)
    return flat


def first(policy, replicas, request=None, seed: int = 0) -> str:
    return order(policy, replicas, request, seed)[0]


def firsts(policy, replicas, request=None, seeds: int = 200) -> Counter:
    return Counter(first(policy, replicas, request, seed) for seed in range(seeds))


def routed(policy, request: RequestView, replica_id: str) -> None:
    policy.on_routed(request, replica_id, now=0.0)


# --- contract: every policy ---------------------------------------------------------------------------------

MIXED = [
    snap("a", num_running=3, num_waiting_prompt_tokens=500, num_free_blocks=10, num_total_blocks=100),
    snap("b", stats_known=False, local_outstanding=2),
    snap("c", num_running=1, num_free_blocks=0, num_total_blocks=100, delta_requests=2),
    snap("d", block_size=0, num_total_blocks=5, num_free_blocks=0),  # degenerate KV report
    snap("e", stats_known=False),
    snap("f", num_decode_tokens_remaining=1e6, decode_cost_ratio=0.0),
]
SCENARIOS = {
    "empty": [],
    "one": [snap("solo")],
    "two-idle": [snap("a"), snap("b")],
    "mixed": MIXED,
    "all-unknown": [snap(f"u{i}", stats_known=False, local_outstanding=i % 2) for i in range(5)],
    "many": [snap(f"r{i:02d}", num_running=i % 5, num_waiting_prompt_tokens=37 * i) for i in range(40)],
}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=list(SCENARIOS))
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_candidate_once_in_singleton_tiers(name, scenario):
    replicas = SCENARIOS[scenario]
    policy = make_policy(name)
    routed(policy, req(hashes=(1, 2, 3)), "a")  # some state for the stateful policies
    for request in (req(), req(prompt=1, hashes=(1, 2, 3)), req(prompt=0, max_tokens=0, hashes=(1,))):
        ranking = order(policy, replicas, request)  # asserts the permutation
        assert (ranking == []) == (replicas == [])


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_deterministic_per_seed(name):
    replicas = SCENARIOS["many"]
    runs = []
    for _ in range(2):
        policy = make_policy(name)
        runs.append([order(policy, replicas, req(hashes=(9,)), seed) for seed in range(20)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_choose_does_not_mutate_state(name):
    policy = make_policy(name)
    routed(policy, req(hashes=(1, 2)), "a")
    index = getattr(policy, "index", None)
    before = index.pairs() if index is not None else None
    replicas = [snap("a"), snap("b"), snap("c")]
    rankings = {tuple(order(policy, replicas, req(hashes=(1, 2)), seed=7)) for _ in range(5)}
    assert len(rankings) == 1
    if index is not None:
        assert index.pairs() == before


@pytest.mark.parametrize("name", ["random", "pow2", "least_requests", "prefix_aware", "sal"])
def test_ties_are_broken_by_rng_uniformly(name):
    replicas = [snap(r) for r in "abcd"]  # identical: every policy ties
    counts = firsts(make_policy(name), replicas, seeds=800)
    assert set(counts) == set("abcd")
    assert min(counts.values()) > 120  # 200 expected each


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(POLICY_NAMES),
    rows=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, 50),
            st.integers(0, 5000),
            st.floats(0, 1e5),
            st.integers(0, 200),
            st.integers(0, 200),
            st.integers(0, 64),
            st.floats(0, 10),
        ),
        max_size=12,
    ),
    prompt=st.integers(0, 4000),
    hashes=st.lists(st.integers(0, 5), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_never_raises_and_is_a_permutation(name, rows, prompt, hashes, seed):
    replicas = [
        snap(
            f"r{i}",
            stats_known=known,
            num_running=running,
            num_waiting_prompt_tokens=waiting,
            num_decode_tokens_remaining=decode,
            num_free_blocks=free,
            num_total_blocks=total,
            block_size=bs,
            decode_cost_ratio=ratio,
            local_outstanding=running % 7,
        )
        for i, (known, running, waiting, decode, free, total, bs, ratio) in enumerate(rows)
    ]
    policy = make_policy(name)
    routed(policy, req(hashes=(0, 1, 2)), "r0")
    order(policy, replicas, req(prompt=prompt, hashes=tuple(hashes)), seed)


# --- round_robin --------------------------------------------------------------------------------------------


def drive_round_robin(policy, replicas, calls: int, seed: int = 0) -> list[str]:
    """Route ``calls`` requests, each to the first tier, feeding on_routed."""
    picks = []
    for k in range(calls):
        pick = first(policy, replicas, seed=seed + k)
        routed(policy, req(), pick)
        picks.append(pick)
    return picks


def test_round_robin_cycles_evenly():
    replicas = [snap(r) for r in "fbdaec"]
    picks = drive_round_robin(make_policy("round_robin"), replicas, 600)
    assert Counter(picks) == {r: 100 for r in "abcdef"}
    ids = sorted("abcdef")
    k = ids.index(picks[0])
    assert picks[:12] == (ids[k:] + ids[:k]) * 2  # strict cyclic order from a random start


def test_round_robin_ranks_the_rest_in_cycle_order():
    policy = make_policy("round_robin")
    routed(policy, req(), "b")
    assert order(policy, [snap(r) for r in "dcba"]) == ["c", "d", "a", "b"]


@pytest.mark.parametrize(
    ("last", "candidates", "expected_first"),
    [
        pytest.param("b", ("a", "b", "c", "d"), "c", id="next-id"),
        pytest.param("d", ("a", "b", "c", "d"), "a", id="wraps"),
        pytest.param("b", ("a", "c", "d"), "c", id="last-removed"),
        pytest.param("z", ("a", "b", "c"), "a", id="last-past-end"),
        pytest.param("b", ("c", "bb", "a", "b"), "bb", id="new-id-gets-its-turn"),
        pytest.param("bb", ("a", "b", "c", "d"), "c", id="last-between-ids"),
    ],
)
def test_round_robin_cursor_survives_replica_set_changes(last, candidates, expected_first):
    policy = make_policy("round_robin")
    routed(policy, req(), last)
    assert first(policy, [snap(r) for r in candidates]) == expected_first


def test_round_robin_even_after_set_changes():
    policy = make_policy("round_robin")
    drive_round_robin(policy, [snap(r) for r in "abcd"], 7)
    policy.on_replica_removed("b")
    picks = drive_round_robin(policy, [snap(r) for r in "acde"], 400)
    assert Counter(picks) == {r: 100 for r in "acde"}


def test_round_robin_follows_fallback_to_second_tier():
    policy = make_policy("round_robin")
    routed(policy, req(), "a")
    replicas = [snap(r) for r in "abcd"]
    assert order(policy, replicas)[:2] == ["b", "c"]
    routed(policy, req(), "c")  # "b" rejected, the caller fell back to "c"
    assert first(policy, replicas) == "d"


# --- random -------------------------------------------------------------------------------------------------


def test_random_is_uniform_over_positions():
    replicas = [snap(r) for r in "abcd"]
    policy = make_policy("random")
    positions = Counter()
    for seed in range(2000):
        for pos, rid in enumerate(order(policy, replicas, seed=seed)):
            positions[rid, pos] += 1
    assert all(400 < positions[r, p] < 600 for r in "abcd" for p in range(4))  # 500 expected


# --- load by outstanding requests: pow2, least_requests ----------------------------------------------------

# (replicas, expected first for least_requests); outstanding = running + waiting + delta, >= local
OUTSTANDING_CASES = {
    "published": ([snap("a", num_running=5), snap("b", num_running=2), snap("c", num_running=9)], "b"),
    "waiting-counts": ([snap("a", num_running=1, num_waiting=4), snap("b", num_running=3)], "b"),
    "stale-delta": ([snap("a", num_running=1, delta_requests=5), snap("b", num_running=3)], "b"),
    "local-floor": ([snap("a", num_running=0, local_outstanding=6), snap("b", num_running=3)], "b"),
    "unknown-uses-local": (
        [snap("a", stats_known=False, local_outstanding=1, num_running=50), snap("b", num_running=3)],
        "a",
    ),
}


@pytest.mark.parametrize("case", OUTSTANDING_CASES, ids=list(OUTSTANDING_CASES))
def test_least_requests_picks_fewest_outstanding(case):
    replicas, expected = OUTSTANDING_CASES[case]
    assert firsts(make_policy("least_requests"), replicas, seeds=50) == {expected: 50}


def test_least_requests_full_ranking_ascending():
    replicas = [snap(r, num_running=n) for r, n in zip("abcde", (4, 0, 3, 1, 2))]
    assert order(make_policy("least_requests"), replicas) == list("bdeca")


def test_least_requests_ties_only_reorder_equals():
    replicas = [snap("a", num_running=1), snap("b", num_running=1), snap("c", num_running=0)]
    seen = {tuple(order(make_policy("least_requests"), replicas, seed=s)) for s in range(50)}
    assert seen == {("c", "a", "b"), ("c", "b", "a")}


@pytest.mark.parametrize("case", OUTSTANDING_CASES, ids=list(OUTSTANDING_CASES))
def test_pow2_with_two_replicas_picks_fewest_outstanding(case):
    replicas, expected = OUTSTANDING_CASES[case]
    if len(replicas) == 2:
        assert firsts(make_policy("pow2"), replicas, seeds=50) == {expected: 50}
    else:  # the most loaded of three is never first: it loses to whichever other one is sampled
        busiest = max(replicas, key=lambda r: r.outstanding_requests).replica_id
        assert busiest not in firsts(make_policy("pow2"), replicas, seeds=200)


def test_pow2_first_two_are_a_sampled_pair_in_load_order():
    replicas = [snap(f"r{i}", num_running=i) for i in range(8)]
    load = {r.replica_id: r.outstanding_requests for r in replicas}
    pairs = Counter()
    for seed in range(600):
        ranking = order(make_policy("pow2"), replicas, seed=seed)
        assert load[ranking[0]] < load[ranking[1]]
        pairs[frozenset(ranking[:2])] += 1
    assert len(pairs) == 28  # every pair of 8 gets sampled
    # the least loaded wins whenever sampled: first with probability 2/8
    assert 110 < firsts(make_policy("pow2"), replicas, seeds=600)["r0"] < 190


# --- prefix_aware -------------------------------------------------------------------------------------------


def prefix_policy(**params):
    return make_policy("prefix_aware", params)


def test_prefix_aware_prefers_the_replica_holding_the_prefix():
    policy = prefix_policy()
    routed(policy, req(hashes=(1, 2, 3, 4)), "b")
    routed(policy, req(hashes=(1, 2)), "c")
    replicas = [snap("a"), snap("b", num_running=5), snap("c", num_running=1), snap("d", num_running=2)]
    # b: 4 blocks, c: 2 blocks, then the rest by load (a: 0, d: 2)
    assert order(policy, replicas, req(hashes=(1, 2, 3, 4, 5))) == ["b", "c", "a", "d"]


def test_prefix_aware_equal_match_goes_to_lower_load():
    policy = prefix_policy()
    routed(policy, req(hashes=(1, 2)), "a")
    routed(policy, req(hashes=(1, 2)), "b")
    replicas = [snap("a", num_running=4), snap("b", num_running=2), snap("c")]
    assert order(policy, replicas, req(hashes=(1, 2))) == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("loads", "params", "expected_first"),
    [
        pytest.param((10, 0), {}, "holder", id="small-gap-keeps-affinity"),
        pytest.param((33, 0), {}, "other", id="abs-and-rel-exceeded"),
        pytest.param((32, 0), {}, "holder", id="abs-at-threshold-not-exceeded"),
        pytest.param((140, 100), {}, "holder", id="abs-exceeded-rel-not"),
        pytest.param((160, 100), {}, "other", id="both-exceeded-large"),
        pytest.param((20, 0), {"abs_threshold": 8}, "other", id="custom-abs"),
        pytest.param((160, 100), {"rel_threshold": 2.0}, "holder", id="custom-rel"),
        pytest.param((0, 40), {}, "holder", id="imbalance-favours-holder"),
    ],
)
def test_prefix_aware_imbalance_overrides_affinity(loads, params, expected_first):
    policy = prefix_policy(**params)
    routed(policy, req(hashes=(1, 2, 3)), "holder")
    replicas = [snap("holder", num_running=loads[0]), snap("other", num_running=loads[1])]
    assert first(policy, replicas, req(hashes=(1, 2, 3))) == expected_first


def test_prefix_aware_imbalance_ranks_all_by_load():
    policy = prefix_policy()
    routed(policy, req(hashes=(1,)), "c")
    replicas = [snap("a", num_running=10), snap("b", num_running=0), snap("c", num_running=50)]
    assert order(policy, replicas, req(hashes=(1,))) == ["b", "a", "c"]


def test_prefix_aware_stale_stats_delta_triggers_imbalance():
    policy = prefix_policy()
    routed(policy, req(hashes=(1,)), "holder")
    fresh = [snap("holder", num_running=5), snap("other", num_running=0)]
    stale = [snap("holder", num_running=5, delta_requests=40), snap("other", num_running=0)]
    assert first(policy, fresh, req(hashes=(1,))) == "holder"
    assert first(policy, stale, req(hashes=(1,))) == "other"


def test_prefix_aware_min_match_blocks():
    replicas = [snap("holder", num_running=3), snap("other", num_running=1)]
    request = req(hashes=(1, 2, 3))
    for min_blocks, expected in ((2, "holder"), (3, "other")):
        policy = prefix_policy(min_match_blocks=min_blocks)
        routed(policy, req(hashes=(1, 2)), "holder")
        assert first(policy, replicas, request) == expected


def test_prefix_aware_forgets_removed_replica():
    policy = prefix_policy()
    routed(policy, req(hashes=(1, 2)), "holder")
    policy.on_replica_removed("holder")
    replicas = [snap("holder", num_running=3), snap("other", num_running=1)]
    assert first(policy, replicas, req(hashes=(1, 2))) == "other"


# --- sal ----------------------------------------------------------------------------------------------------


def sal(**params):
    return make_policy("sal", params)


def kv(free: int, total: int = 1000, **fields) -> dict:
    """Snapshot fields for a replica that reports its KV cache (block_size 16)."""
    return dict(num_free_blocks=free, num_total_blocks=total, block_size=16, **fields)


def work(rid: str, prompt: int = 0, decode: float = 0.0, **fields) -> ReplicaSnapshot:
    """A replica with ``prompt`` waiting prompt tokens and ``decode`` remaining decode tokens published."""
    return snap(rid, num_waiting_prompt_tokens=prompt, num_decode_tokens_remaining=decode, **fields)


# (replicas, params, expected ranking) for a 100-token request; default w_d = decode_cost_ratio = 1
SAL_CASES = {
    "prompt-work": ([work("a", 900), work("b", 300)], {}, "ba"),
    "decode-work": ([work("a", decode=500), work("b", decode=100)], {}, "ba"),
    "tokens-not-requests": ([work("a", 8000, num_running=1), work("b", 600, num_running=6)], {}, "ba"),
    "decode-cost-ratio": (
        [work("a", 300, 100, decode_cost_ratio=4.0), work("b", 500, decode_cost_ratio=4.0)],
        {"decode_weight": None},
        "ba",  # the replica's ratio: 300 + 4 * 100 > 500
    ),
    "default-decode-weight": (
        [work("a", 300, 100, decode_cost_ratio=4.0), work("b", 500, decode_cost_ratio=4.0)],
        {},
        "ab",  # the default weight 0.5: 300 + 0.5 * 100 < 500
    ),
    "decode-weight-overrides-ratio": (
        [work("a", 300, 100, decode_cost_ratio=4.0), work("b", 500, decode_cost_ratio=4.0)],
        {"decode_weight": 1.0},
        "ab",  # 300 + 1 * 100 < 500
    ),
    "no-decode-work-ablation": ([work("a", 100, 9000), work("b", 200)], {"use_decode_work": False}, "ab"),
    "stale-prompt-delta": ([work("a", 100, delta_prompt_tokens=700), work("b", 500)], {}, "ba"),
    "stale-decode-delta": ([work("a", 0, 100, delta_decode_tokens=700.0), work("b", 0, 500)], {}, "ba"),
    "ignores-request-counts": ([work("a", num_running=40, delta_requests=9), work("b", 1)], {}, "ab"),
    "no-free-blocks": ([work("a", **kv(0)), work("b", **kv(500))], {}, "ba"),
    "full-kv-penalty-off": ([work("a", **kv(0)), work("b", 1, **kv(500))], {"kv_penalty": False}, "ab"),
    # a: 7 free blocks, 1 taken by its 10 waiting tokens, 6 left < 7 needed: 10 + 10 + 100 > 20 + 100
    "just-misses": ([work("a", 10, **kv(7)), work("b", 20, **kv(500))], {}, "ba"),
    # a: 8 free blocks, 1 taken by its 10 waiting tokens, 7 left = ceil(100 / 16): fits, 10 + 100 < 20 + 100
    "just-fits": ([work("a", 10, **kv(8)), work("b", 20, **kv(500))], {}, "ab"),
    "full-kv-loses-to-more-loaded": ([work("a", 400, **kv(0)), work("b", 700, **kv(500))], {}, "ba"),
    "full-kv-still-wins-when-much-lighter": ([work("a", 200, **kv(0)), work("b", 700, **kv(500))], {}, "ab"),
    # a: 10 free blocks, all taken by 160 delta prompt tokens; the request needs 7 blocks
    "delta-prompts-use-the-free-blocks": (
        [work("a", delta_prompt_tokens=160, **kv(10)), work("b", 200, **kv(500))],
        {},
        "ba",
    ),
    "kv-unreported-no-penalty": ([work("a"), work("b", 1)], {}, "ab"),
    "unknown-after-known": ([work("u", stats_known=False), work("k", 10**6)], {}, "ku"),
    "unknown-by-local-outstanding": (
        [
            work("u2", stats_known=False, local_outstanding=2),
            work("u0", 10**6, stats_known=False, local_outstanding=0),
            work("k", 5),
        ],
        {},
        ["k", "u0", "u2"],
    ),
}


@pytest.mark.parametrize("case", SAL_CASES, ids=list(SAL_CASES))
def test_sal_ranking(case):
    replicas, params, expected = SAL_CASES[case]
    for seed in range(10):
        assert order(sal(**params), replicas, req(prompt=100), seed) == list(expected)


def test_sal_equal_score_prefers_the_replica_that_fits():
    # a: 0 load, memory full (penalty 0 + misfit flag); b: 0 load, fits -> b always first
    replicas = [snap("a", **kv(0)), snap("b", **kv(500))]
    assert firsts(sal(), replicas, req(prompt=100), seeds=50) == {"b": 50}


def test_sal_prefers_the_replica_holding_the_prefix():
    policy = sal(prefix_credit_weight=1.0)  # the plain finish-time estimate
    shared = req(prompt=100, hashes=(1, 2, 3, 4, 5))  # 5 blocks of 16 tokens cached on "holder"
    routed(policy, shared, "holder")
    replicas = [snap("holder", num_waiting_prompt_tokens=60), snap("other", num_waiting_prompt_tokens=0)]
    # holder: 60 + (100 - 80) = 80 < other: 0 + 100
    assert order(policy, replicas, shared) == ["holder", "other"]
    heavier = [snap("holder", num_waiting_prompt_tokens=90), snap("other", num_waiting_prompt_tokens=0)]
    assert order(policy, heavier, shared) == ["other", "holder"]  # 90 + 20 > 100: load beats the credit


@pytest.mark.parametrize(
    ("params", "expected_first"),
    [
        pytest.param({}, "holder", id="credit-on"),
        pytest.param({"use_prefix_credit": False}, "other", id="credit-off"),
        pytest.param({"min_match_blocks": 6}, "other", id="match-too-short"),
    ],
)
def test_sal_prefix_credit_switches(params, expected_first):
    policy = sal(**params)
    shared = req(prompt=100, hashes=(1, 2, 3, 4, 5))
    routed(policy, shared, "holder")
    replicas = [snap("holder", num_waiting_prompt_tokens=60), snap("other", num_waiting_prompt_tokens=10)]
    assert first(policy, replicas, shared) == expected_first


def test_sal_credit_caps_at_prompt_minus_one():
    # a fully cached prompt still costs one token: holder with load 0 + 1 vs other with 0 + 100
    policy = sal()
    request = req(prompt=32, hashes=(1, 2))
    routed(policy, request, "holder")
    replicas = [snap("holder", **kv(0, total=100)), snap("other", **kv(0, total=100))]
    # both have no free blocks; the holder needs 1 block for its 1 uncached token and also misfits, but its
    # score is lower (1 vs 32), so it still ranks first
    assert order(policy, replicas, request) == ["holder", "other"]


def test_sal_prefix_credit_reduces_kv_need():
    policy = sal(prefix_credit_weight=1.0)
    request = req(prompt=160, hashes=tuple(range(10)))  # 10 blocks of 16: needs 10 KV blocks uncached
    routed(policy, request, "holder")
    replicas = [snap("holder", **kv(2, num_waiting_prompt_tokens=150)), snap("other", **kv(2))]
    # holder: load 150 + cost 1, needs 1 block... but 150 waiting tokens take ceil(150/16) = 10 > 2 free:
    # misfit, score 150 + 150 + 1 = 301; other: cost 160 needs 10 blocks > 2: misfit, score 0 + 0 + 160
    assert order(policy, replicas, request) == ["other", "holder"]
    roomy = [snap("holder", **kv(20, num_waiting_prompt_tokens=150)), snap("other", **kv(2))]
    # holder now fits: 150 + 1 = 151 < 160
    assert order(policy, roomy, request) == ["holder", "other"]


@pytest.mark.parametrize("weight,expected", [(1.0, ["other", "holder"]), (2.0, ["other", "holder"]),
                                             (4.0, ["holder", "other"]), (8.0, ["holder", "other"])],
                         ids=["w1", "w2", "w4", "w8"])
def test_sal_prefix_credit_weight_strengthens_affinity(weight, expected):
    policy = sal(prefix_credit_weight=weight)
    shared = req(prompt=100, hashes=(1, 2, 3, 4, 5))  # credit 80 tokens on "holder"
    routed(policy, shared, "holder")
    # holder: 200 + 20 - (w - 1) * 80; other: 0 + 100  ->  holder wins once (w - 1) * 80 > 120, i.e. w > 2.5
    replicas = [snap("holder", num_waiting_prompt_tokens=200), snap("other", num_waiting_prompt_tokens=0)]
    assert order(policy, replicas, shared) == expected


def test_sal_uncached_prompt_tokens_is_the_cost_on_that_replica():
    policy = sal()
    shared = req(prompt=100, hashes=(1, 2, 3, 4, 5))
    routed(policy, shared, "holder")
    assert policy.uncached_prompt_tokens(shared, "holder") == 20
    assert policy.uncached_prompt_tokens(shared, "other") == 100
    assert sal(use_prefix_credit=False).uncached_prompt_tokens(shared, "holder") == 100


def test_sal_expected_decode_tokens_follows_the_estimator():
    policy = sal(prior_output_tokens=100.0, prior_weight=1.0)
    assert policy.expected_decode_tokens(req(max_tokens=1000)) == 100.0
    assert policy.expected_decode_tokens(req(max_tokens=40)) == 40.0  # capped by max_tokens
    policy.on_finished(Completion("r", "a", num_prompt_tokens=10, num_output_tokens=300))
    assert policy.expected_decode_tokens(req(max_tokens=1000)) == 200.0  # (100 * 1 + 300) / 2
    assert policy.expected_decode_tokens(req(max_tokens=0)) == 0.0


def test_sal_forgets_removed_replica():
    policy = sal()
    request = req(prompt=100, hashes=(1, 2, 3, 4, 5))
    routed(policy, request, "holder")
    policy.on_replica_removed("holder")
    replicas = [snap("holder", num_waiting_prompt_tokens=60), snap("other", num_waiting_prompt_tokens=10)]
    assert first(policy, replicas, request) == "other"


# --- output-length estimator --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "max_tokens", "generated", "expected"),
    [
        pytest.param([], 1000, 0, 256.0, id="prior"),
        pytest.param([], 100, 0, 100.0, id="capped-by-max-tokens"),
        pytest.param([], 1000, 56, 200.0, id="minus-generated"),
        pytest.param([], 1000, 256, 1.0, id="at-mean-still-running"),
        pytest.param([], 1000, 900, 1.0, id="past-mean-at-least-one"),
        pytest.param([], 100, 100, 0.0, id="at-max-tokens"),
        pytest.param([], 100, 150, 0.0, id="past-max-tokens"),
        pytest.param([56] * 8, 1000, 0, 156.0, id="mean-with-prior"),  # (256 * 8 + 56 * 8) / 16
        pytest.param([-5], 1000, 0, 256 * 8 / 9, id="negative-clamped"),
    ],
)
def test_output_length_estimator(observed, max_tokens, generated, expected):
    estimator = OutputLengthEstimator(prior_mean=256.0, prior_weight=8.0)
    for n in observed:
        estimator.observe(n)
    assert estimator.expected_remaining(max_tokens, generated) == pytest.approx(expected)


def test_output_length_estimator_without_prior_weight():
    estimator = OutputLengthEstimator(prior_mean=50.0, prior_weight=0.0)
    assert estimator.mean == 50.0  # nothing yet: the prior
    estimator.observe(10)
    assert estimator.mean == 10.0 and estimator.count == 1


@pytest.mark.parametrize(("mean", "weight"), [(0.0, 1.0), (-1.0, 1.0), (10.0, -1.0)])
def test_output_length_estimator_rejects_bad_prior(mean, weight):
    with pytest.raises(ValueError):
        OutputLengthEstimator(mean, weight)


def test_snapshot_and_view_build_by_keyword_or_position_and_stay_frozen():
    by_keyword = ReplicaSnapshot(replica_id="a", num_free_blocks=3, delta_decode_tokens=2.5)
    by_position = ReplicaSnapshot("a", 0, 0, 0, 0.0, 3, 0, 16, 1.0, 0, 0.0, True, 0, 0, 0, 2.5)
    assert by_keyword == by_position and hash(by_keyword) == hash(by_position)
    assert by_keyword._replace(num_running=2).num_running == 2
    with pytest.raises(AttributeError):
        by_keyword.num_running = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        ReplicaSnapshot()  # type: ignore[call-arg]
    # what RouterAccounting builds (tuple.__new__) is the same snapshot
    accounting = RouterAccounting()
    stats = {"num_running": 0, "num_waiting": 0, "num_waiting_prompt_tokens": 0, "num_decode_tokens_remaining": 0.0,
             "num_free_blocks": 3, "num_total_blocks": 0, "block_size": 16, "decode_cost_ratio": 1.0,
             "num_preemptions": 0, "stats_time": 0.0}
    built = accounting.snapshot("a", stats)
    assert type(built) is ReplicaSnapshot and built == by_keyword._replace(delta_decode_tokens=0.0)
    assert built.outstanding_requests == 0
    view = RequestView("r", 10, 5)
    assert (view.arrival_time, view.prefix_hashes, view.prefix_block_size) == (0.0, (), 512)
