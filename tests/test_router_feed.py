"""Many routers: the replica's received-requests feed, the traffic-share estimate, and what sal and
prefix_aware do with them (share-scaled deltas, power of d with prefix holders, water-filling, published
prefixes). Hand-built inputs, injected clocks and seeded RNGs; bounded-memory checks for every new state."""

from __future__ import annotations

import random

import pytest

from halffull.router.accounting import RouterAccounting
from halffull.router.feed import (FeedParams, ReceivedFeed, merge_published, published_prefixes,
                                  published_received)
from halffull.router.prefix_index import PrefixIndex
from halffull.router.registry import make_policy
from halffull.router.share import ShareParams, TrafficShare
from halffull.router.types import ReplicaSnapshot, RequestView

BLOCK = 16


def stats(t: float, received: int | None = None, **extra) -> dict:
    """A valid published stats dict at ``t`` (idle replica) with the feed keys given."""
    out = {"num_running": 0, "num_waiting": 0, "num_waiting_prompt_tokens": 0, "num_decode_tokens_remaining": 0.0,
           "num_free_blocks": 0, "num_total_blocks": 0, "block_size": 16, "decode_cost_ratio": 1.0,
           "num_preemptions": 0, "stats_time": t}
    if received is not None:
        out["num_received"] = received
    return out | extra


def req(prompt: int = 100, hashes: tuple[int, ...] = ()) -> RequestView:
    return RequestView("req", prompt, 100, prefix_hashes=hashes, prefix_block_size=BLOCK)


def work(rid: str, prompt: int = 0, share: float = 1.0, **fields) -> ReplicaSnapshot:
    return ReplicaSnapshot(rid, num_waiting_prompt_tokens=prompt, traffic_share=share, **fields)


def first(policy, replicas, request=None, seed=0) -> str:
    return policy.choose(request or req(), replicas, now=0.0, rng=random.Random(seed))[0][0]


# --- ReceivedFeed (replica side) ----------------------------------------------------------------------------

FEED_CASES = {
    # name: (received at [(time, hashes)], publish time, params, expected num_received, expected hashes)
    "distinct-most-recent-last": ([(0.0, (1, 2)), (0.5, (1, 3))], 1.0, {}, 2, [2, 1, 3]),
    "window-drops-old": ([(0.0, (1,)), (2.0, (2,))], 2.5, {"window_s": 1.0}, 2, [2]),
    "bounded": ([(0.0, (1, 2, 3, 4))], 0.0, {"max_hashes": 2}, 1, [3, 4]),
    "no-hashes-still-counted": ([(0.0, ()), (0.1, ())], 0.2, {}, 2, []),
}


@pytest.mark.parametrize("case", FEED_CASES.values(), ids=list(FEED_CASES))
def test_received_feed_publishes(case):
    received, at, params, count, hashes = case
    feed = ReceivedFeed(FeedParams(**params))
    for t, h in received:
        feed.on_received(h, t)
    assert feed.publish(at) == {"num_received": count, "recent_prefix_hashes": hashes}


def test_received_feed_memory_is_bounded():
    feed = ReceivedFeed(FeedParams(window_s=1.0, max_hashes=64))
    for i in range(10_000):
        feed.on_received((i, i + 1, i + 2), i * 0.01)
        assert len(feed) <= 64
    assert len(feed.publish(1000.0)["recent_prefix_hashes"]) == 0 and len(feed) == 0


@pytest.mark.parametrize("params", [{"window_s": 0.0}, {"max_hashes": 0}], ids=["window", "max-hashes"])
def test_feed_params_reject_bad_values(params):
    with pytest.raises(ValueError):
        FeedParams(**params)


PARSE_CASES = {
    "absent": ({}, None, ()),
    "valid": ({"num_received": 3, "recent_prefix_hashes": [1, 2]}, 3, [1, 2]),
    "negative-count": ({"num_received": -1}, None, ()),
    "bool-count": ({"num_received": True}, None, ()),
    "float-count": ({"num_received": 2.0}, None, ()),
    "not-a-list": ({"recent_prefix_hashes": "12"}, None, ()),
    "non-int-hash": ({"recent_prefix_hashes": [1, "x"]}, None, ()),
}


@pytest.mark.parametrize("case", PARSE_CASES.values(), ids=list(PARSE_CASES))
def test_published_feed_fields_are_validated(case):
    published, count, hashes = case
    assert published_received(published) == count
    assert list(published_prefixes(published)) == list(hashes)


def test_merge_published_makes_the_most_recent_hash_the_newest_entry():
    index = PrefixIndex(max_entries=2)
    merge_published(index, "a", {"recent_prefix_hashes": [10, 11, 12]})
    assert index.pairs() == [(11, "a"), (12, "a")]  # 10, the oldest, was evicted
    assert index.match((10, 11, 12)) == {"a": 3}


# --- TrafficShare (router side) -----------------------------------------------------------------------------

def drive(share: TrafficShare, rounds: int, mine: int, total: int, replicas=("a", "b"), period=0.5) -> None:
    """``rounds`` publications per replica; per round this router sends ``mine`` and the replica receives
    ``total`` (all routers together)."""
    for k in range(1, rounds + 1):
        for rid in replicas:
            for i in range(mine):
                share.on_sent(rid, (k - 1) * period + (i + 1) * period / (mine + 1))
            share.on_published(rid, k * period, k * total)


SHARE_CASES = {
    # name: (rounds, mine, total, expected share)
    "alone": (20, 5, 5, 1.0),
    "one-of-eight": (40, 1, 8, 0.125),
    "one-of-two": (40, 4, 8, 0.5),
    "warm-up-until-min-total": (1, 1, 2, 1.0),  # first publication is a baseline; then 4 received < 8
    "floored": (40, 0, 10, 1.0 / 32),
}


@pytest.mark.parametrize("case", SHARE_CASES.values(), ids=list(SHARE_CASES))
def test_traffic_share_estimate(case):
    rounds, mine, total, expected = case
    share = TrafficShare()
    drive(share, rounds, mine, total)
    assert share.share == pytest.approx(expected, rel=0.02)


def test_traffic_share_follows_a_change_in_the_number_of_routers():
    share = TrafficShare()
    drive(share, 40, 1, 8)
    assert share.share == pytest.approx(0.125, rel=0.02)
    for k in range(41, 200):  # the ingress scaled in: now alone
        share.on_sent("a", k * 0.5 - 0.1)
        share.on_published("a", k * 0.5, 40 * 8 + (k - 40))
    assert share.share > 0.95


@pytest.mark.parametrize("event", ["restart", "older-publication"])
def test_traffic_share_ignores_restarts_and_reordered_stats(event):
    share = TrafficShare()
    drive(share, 40, 2, 4, replicas=("a",))  # share 0.5
    before = share.share
    if event == "restart":
        share.on_published("a", 100.0, 3)  # the count went down: new baseline, no sample
    else:
        share.on_published("a", 1.0, 10_000)  # older than the last one
    assert share.share == before


def test_traffic_share_memory_is_bounded():
    share = TrafficShare(ShareParams(max_pending=100))
    for i in range(10_000):  # a replica that never publishes
        share.on_sent("silent", float(i))
    assert share.num_pending() == 100
    share.forget("silent")
    assert share.num_pending() == 0


def test_accounting_learns_the_share_from_new_publications_and_hands_them_on():
    accounting, seen = RouterAccounting(), []
    for k in range(1, 41):
        accounting.on_routed(f"r{k}", "a", now=k - 0.5, prompt_tokens=1, decode_tokens=1.0)
        published = stats(float(k), received=4 * k)
        for _ in range(2):  # the second call reuses the publication: no new sample, no second callback
            accounting.snapshots([("a", published)], lambda rid, s: seen.append((rid, s["stats_time"])))
        accounting.on_finished(f"r{k}")
    assert seen == [("a", float(k)) for k in range(1, 41)]
    assert accounting.snapshot("a", stats(41.0, received=164)).traffic_share == pytest.approx(0.25, rel=0.02)


# --- sal and prefix_aware with many routers -----------------------------------------------------------------

def sal(**params):
    return make_policy("sal", params)


SCALE_CASES = {
    # name: (share, delta_scale param, expected first): a holds 300 waiting, b 100 waiting + 100 own delta
    "alone-deltas-as-is": (1.0, None, "b"),
    "one-of-four-scales-by-4": (0.25, None, "a"),
    "fixed-scale-1-ablation": (0.25, 1.0, "b"),
    "fixed-scale-4": (1.0, 4.0, "a"),
}


@pytest.mark.parametrize("case", SCALE_CASES.values(), ids=list(SCALE_CASES))
def test_sal_scales_its_deltas_by_the_inverse_share(case):
    share, scale, expected = case
    replicas = [work("a", 300, share), work("b", 100, share, delta_prompt_tokens=100)]
    policy = sal(delta_scale=scale, sample_size=0, spread=0.0)
    assert first(policy, replicas) == expected


def test_sal_samples_only_when_not_alone():
    replicas = [work(r, load, 0.125) for r, load in zip("abcd", (0, 100, 200, 300))]
    alone = {first(sal(spread=0.0, sample_size=2), [r._replace(traffic_share=1.0) for r in replicas], seed=s) for s in range(50)}
    shared = {first(sal(spread=0.0, sample_size=2), replicas, seed=s) for s in range(200)}
    assert alone == {"a"}
    assert shared == {"a", "b", "c"}  # never d: with d = 2 distinct draws, d is first only in a sample of d alone


def test_sal_sample_always_holds_the_prefix_holders():
    policy = sal(spread=0.0, sample_size=2)
    hashes = (1, 2, 3)
    policy.on_routed(req(200, hashes), "d", now=0.0)
    replicas = [work(r, load, 0.125) for r, load in zip("abcd", (0, 10, 20, 300))]
    assert {first(policy, replicas, req(200, hashes), seed=s) for s in range(100)} == {"d"}


def test_sal_waterfill_spreads_only_among_the_near_best():
    replicas = [work("a", 0, 0.125), work("b", 50, 0.125), work("c", 100_000, 0.125)]
    policy = sal(sample_size=0, spread=1.0)
    picks = {first(policy, replicas, seed=s) for s in range(200)}
    assert picks == {"a", "b"}
    alone = {first(policy, [r._replace(traffic_share=1.0) for r in replicas], seed=s) for s in range(50)}
    assert alone == {"a"}  # K = 1: no budget, the exact argmin


@pytest.mark.parametrize("pool, expected", [("deepest", {"b"}), ("holders", {"a", "b", "c"})])
def test_sal_spread_pool_keeps_the_conversation_on_its_deepest_holder(pool, expected):
    # every replica holds the shared head (hash 1); only b holds the conversation (hashes 1, 2, 3)
    policy = sal(sample_size=0, spread=2.0, spread_pool=pool)
    for rid in ("a", "b", "c"):
        policy.on_routed(req(200, (1,)), rid, now=0.0)
    policy.on_routed(req(200, (1, 2, 3)), "b", now=0.0)
    replicas = [work("a", 0, 0.125), work("b", 100, 0.125), work("c", 0, 0.125)]
    picks = {first(policy, replicas, req(4000, (1, 2, 3, 4)), seed=s) for s in range(200)}
    assert picks == expected


def test_sal_deepest_pool_never_overrides_a_better_non_holder():
    policy = sal(sample_size=0, spread=2.0)
    policy.on_routed(req(200, (1, 2)), "b", now=0.0)
    replicas = [work("a", 0, 0.125), work("b", 1_000_000, 0.125)]  # b holds it but is far behind
    assert {first(policy, replicas, req(100, (1, 2)), seed=s) for s in range(50)} == {"a"}


@pytest.mark.parametrize("name", ["sal", "prefix_aware"])
@pytest.mark.parametrize("use", [True, False], ids=["shared", "local-only"])
def test_published_prefixes_reach_the_index(name, use):
    policy = make_policy(name, {"use_published_prefixes": use})
    policy.on_stats("b", stats(1.0, received=5, recent_prefix_hashes=[7, 8]))
    replicas = [work("a"), work("b")]
    picks = {first(policy, replicas, req(200, (7, 8)), seed=s) for s in range(50)}
    assert picks == ({"b"} if use else {"a", "b"})


@pytest.mark.parametrize("params", [{"delta_scale": -1.0}, {"sample_size": -1}, {"alone_share": 1.5},
                                    {"spread": -0.5}, {"spread_pool": "all"}],
                         ids=["scale", "sample", "alone", "spread", "pool"])
def test_sal_rejects_bad_multi_router_params(params):
    with pytest.raises(ValueError):
        sal(**params)
