"""Peer bookings (router/peers.py): the format, what a receiving router does with them, the in-transit estimate,
sal's use of it, and the process-level channel. Pure logic: no Ray, no sockets (tests/test_peer_link.py has the
UDP link, tests/test_serve_feed.py the live ingress replicas)."""

from __future__ import annotations

import asyncio
import random

import pytest

from halffull.router import accounting as accounting_module
from halffull.router import peers
from halffull.router.accounting import RouterAccounting
from halffull.router.peers import InTransit
from halffull.router.policies.sal import SalParams, SalPolicy
from halffull.router.registry import make_policy
from halffull.router.types import ReplicaSnapshot, RequestView


def stats(t: float, *, received: int | None = None, waiting: int = 0) -> dict:
    out = {"num_running": 0, "num_waiting": 0, "num_waiting_prompt_tokens": waiting, "num_free_blocks": 1000,
           "num_total_blocks": 1000, "block_size": 16, "num_preemptions": 0, "num_decode_tokens_remaining": 0.0,
           "decode_cost_ratio": 1.0, "stats_time": t}
    if received is not None:
        out["num_received"] = received
    return out


# ---- format and apply ------------------------------------------------------------------------------------------
def test_a_booking_keeps_at_most_max_hashes_of_the_chain():
    b = peers.booking("r0", 1.0, 100, 50.0, list(range(200)))
    assert b == ("r0", 1.0, 100, 50.0, tuple(range(peers.MAX_HASHES)))


MALFORMED = [
    ("r0", 1.0, 100, 50.0),                        # four fields
    ["r0", 1.0, 100, 50.0, ()],                    # a list, not a tuple
    (7, 1.0, 100, 50.0, ()),                       # replica id not a string
    ("r0", float("nan"), 100, 50.0, ()),           # time not finite
    ("r0", 1, 100, 50.0, ()),                      # time not a float
    ("r0", 1.0, -1, 50.0, ()),                     # negative prompt
    ("r0", 1.0, 100.5, 50.0, ()),                  # prompt not an int
    ("r0", 1.0, 100, float("inf"), ()),            # decode not finite
    ("r0", 1.0, 100, -2.0, ()),                    # negative decode
    ("r0", 1.0, 100, 50.0, ("h",)),                # a hash not an int
    ("r0", 1.0, 100, 50.0, tuple(range(peers.MAX_HASHES + 1))),  # too many hashes
    None,
]


@pytest.mark.parametrize("bad", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bookings_are_skipped_never_raised(bad):
    acc, policy = RouterAccounting(), SalPolicy()
    assert peers.apply([bad, ("r0", 1.0, 100, 50.0, (1, 2))], acc, policy, now=1.001) == 1
    assert acc.num_peer_bookings() == 1


def test_bookings_for_replicas_the_router_does_not_route_to_are_skipped():
    acc = RouterAccounting()
    known = {"r0"}.__contains__
    assert peers.apply([("r0", 1.0, 10, 1.0, ()), ("other", 1.0, 10, 1.0, ())], acc, SalPolicy(), 1.0, known) == 1
    assert acc.num_peer_bookings() == 1


def test_peer_prefixes_enter_the_policys_index():
    policy = SalPolicy()
    peers.apply([("r1", 1.0, 1000, 10.0, (11, 22, 33))], RouterAccounting(), policy, now=1.0)
    assert policy.index.match((11, 22, 33, 44)) == {"r1": 3}


def test_only_policies_with_the_switch_share_bookings():
    assert peers.shares_bookings(make_policy("sal"))
    assert peers.shares_bookings(make_policy("prefix_aware"))
    assert not peers.shares_bookings(make_policy("sal", {"peer_bookings": False}))
    for name in ("pow2", "round_robin", "random", "least_requests"):  # Ray's default shares nothing: the baseline
        assert not peers.shares_bookings(make_policy(name))


# ---- accounting ----------------------------------------------------------------------------------------------
def test_peer_bookings_count_in_the_deltas_until_the_stats_pass_them():
    acc = RouterAccounting()
    acc.on_routed("mine", "r0", now=10.2, prompt_tokens=100, decode_tokens=10.0)
    acc.on_peer_routed("r0", at=10.1, prompt_tokens=300, decode_tokens=20.0, now=10.101)
    acc.on_peer_routed("r0", at=10.3, prompt_tokens=500, decode_tokens=40.0, now=10.301)
    snap = acc.snapshot("r0", stats(10.0))
    assert (snap.delta_requests, snap.delta_prompt_tokens, snap.delta_decode_tokens) == (3, 900, 70.0)
    assert snap.local_outstanding == 1  # only this router's own requests
    snap = acc.snapshot("r0", stats(10.25))  # includes the booking of 10.1; mine (10.2) and 10.3 are newer
    assert (snap.delta_requests, snap.delta_prompt_tokens) == (1, 500)
    assert acc.num_peer_bookings() == 1  # the covered one was dropped
    snap = acc.snapshot("r0", stats(11.0))
    assert snap.delta_requests == 0 and acc.num_peer_bookings() == 0


def test_peer_bookings_are_bounded_per_replica_and_dropped_with_the_replica(monkeypatch):
    monkeypatch.setattr(accounting_module, "MAX_PEER_BOOKINGS", 50)
    acc = RouterAccounting()
    for i in range(500):
        acc.on_peer_routed("r0", at=float(i), prompt_tokens=1, decode_tokens=1.0, now=float(i))
    assert acc.num_peer_bookings() == 50
    assert acc.snapshot("r0", stats(0.0)).delta_requests == 50
    acc.on_replica_removed("r0")
    assert acc.num_peer_bookings() == 0


def test_a_router_that_hears_every_peer_knows_all_the_traffic():
    """8 routers, round-robin arrivals, 4 replicas: without bookings each knows 1/8 of the traffic; with every
    peer's booking it knows about all of it, so sal treats it as alone (the single-router rule)."""
    rng = random.Random(0)
    for share_bookings, expected in ((False, 1 / 8), (True, 1.0)):
        acc = RouterAccounting()
        received = {f"r{k}": 0 for k in range(4)}
        t = 0.0
        for period in range(40):
            for i in range(32):
                t += 0.5 / 32
                replica = f"r{rng.randrange(4)}"
                received[replica] += 1
                if i % 8 == 0:
                    acc.on_routed(f"q{period}-{i}", replica, now=t, prompt_tokens=1, decode_tokens=1.0)
                elif share_bookings:
                    acc.on_peer_routed(replica, at=t, prompt_tokens=1, decode_tokens=1.0, now=t + 0.001)
            acc.snapshots([(r, stats(t + 1e-6, received=n)) for r, n in received.items()])
        share = acc.snapshot("r0", stats(t + 1.0, received=received["r0"])).traffic_share
        assert share == pytest.approx(expected, rel=0.15), (share_bookings, share)


# ---- in transit -----------------------------------------------------------------------------------------------
def interleave(events: list[tuple[float, str]], transit: InTransit, lag: float) -> None:
    """Own sends ("own") and peers' decisions ("peer", arriving ``lag`` later), in time order."""
    timeline = []
    for t, kind in events:
        timeline.append((t, 0, t) if kind == "own" else (t + lag, 1, t))
    for at, kind, t in sorted(timeline):
        if kind == 0:
            transit.on_sent(at)
        else:
            transit.on_booking(t, at)


@pytest.mark.parametrize("own_rate, peer_rate, lag", [(12.5, 187.5, 0.0012), (10.0, 70.0, 0.005), (50.0, 50.0, 0.002)])
def test_arrivals_that_do_not_bunch_give_twice_the_peer_rate_times_the_lag(own_rate, peer_rate, lag):
    rng = random.Random(1)
    events = []
    for kind, rate in (("own", own_rate), ("peer", peer_rate)):
        t = 0.0
        while t < 30.0:
            t += rng.expovariate(rate)
            events.append((t, kind))
    transit = InTransit()
    interleave(events, transit, lag)
    assert transit.value == pytest.approx(2 * peer_rate * lag, rel=0.25)


@pytest.mark.parametrize("burst, routers", [(40, 8), (16, 4)])
def test_a_burst_spread_over_the_routers_counts_its_other_parts(burst, routers):
    """Every second ``burst`` requests arrive at once, ``burst / routers`` of them at this router."""
    events = []
    for second in range(30):
        mine = burst // routers
        events += [(float(second), "own")] * mine + [(float(second), "peer")] * (burst - mine)
    transit = InTransit()
    interleave(events, transit, 0.0012)
    assert transit.value == pytest.approx(burst - burst // routers, rel=0.1)


def test_the_estimate_fades_when_the_peers_fall_silent_and_the_lag_is_clamped():
    transit = InTransit()
    interleave([(i / 100, "own") for i in range(1000)] + [(i / 100 + 0.0005, "peer") for i in range(1000)], transit,
               0.001)
    busy = transit.value
    for i in range(1000):  # our own traffic goes on, nothing from the peers
        transit.on_sent(10.0 + i / 100)
    assert busy > 0.5 and transit.value < busy * 0.01
    late = InTransit()
    late.on_booking(0.0, 3600.0)  # a clock step, a booking stuck for an hour
    assert late.lag == late.max_lag_s


def test_one_router_alone_estimates_nothing():
    transit = InTransit()
    for i in range(100):
        transit.on_sent(i / 10)
    assert transit.value == 0.0


def test_snapshots_carry_the_in_transit_estimate():
    acc = RouterAccounting()
    for i in range(400):
        acc.on_routed(f"q{i}", "r0", now=i / 100, prompt_tokens=1, decode_tokens=1.0)
        acc.on_peer_routed("r1", at=i / 100, prompt_tokens=1, decode_tokens=1.0, now=i / 100 + 0.01)
    snap = acc.snapshot("r0", stats(4.0))
    # on a grid of 1/16 of its power of two, so that snapshots can be reused while it holds still
    assert snap.peers_in_transit == pytest.approx(acc.transit.value, rel=1 / 16) and snap.peers_in_transit > 0.5


@pytest.mark.parametrize("value", [0.0, 1e-6, 0.013, 0.45, 1.0, 3.3, 35.0, 1e6])
def test_the_estimate_in_snapshots_is_within_a_16th_of_the_true_one(value):
    coarse = accounting_module._coarse(value)
    assert coarse == pytest.approx(value, rel=1 / 16, abs=0.0)
    assert accounting_module._coarse(coarse) == coarse  # a grid point stays put


# ---- sal with peers --------------------------------------------------------------------------------------------
def replicas(transit: float) -> list[ReplicaSnapshot]:
    return [ReplicaSnapshot(f"r{i}", num_waiting_prompt_tokens=w, num_total_blocks=1000, num_free_blocks=1000,
                            traffic_share=1.0, peers_in_transit=transit) for i, w in enumerate((0, 100, 200, 5000))]


def firsts(policy: SalPolicy, snaps: list[ReplicaSnapshot]) -> set[str]:
    view = RequestView("q", num_prompt_tokens=500, max_tokens=100)
    return {policy.choose(view, snaps, now=0.0, rng=random.Random(s))[0][0] for s in range(200)}


def test_sal_alone_without_peers_is_the_argmin():
    assert firsts(SalPolicy(), replicas(0.0)) == {"r0"}


def test_sal_spreads_the_decisions_its_peers_cannot_see_yet_among_the_near_best():
    picked = firsts(SalPolicy(), replicas(1.0))
    assert {"r0", "r1"} <= picked and "r3" not in picked  # near-best only: never the replica 5000 tokens behind
    assert firsts(SalPolicy(SalParams(spread=0.0)), replicas(1.0)) == {"r0"}  # the ablation


def old_prefix_aware(policy, request, replicas, rng):
    """prefix_aware's ranking as it was before peers (the spec without B), for the B = 0 identity."""
    from halffull.router.policies import outstanding, rank_ascending
    from halffull.router.policies.prefix_aware import is_imbalanced

    loads = list(map(outstanding, replicas))
    ids = [r.replica_id for r in replicas]
    if is_imbalanced(min(loads), max(loads), policy.params):
        return rank_ascending(loads, ids, rng)
    matched = policy.index.match(request.prefix_hashes) if request.prefix_hashes else None
    if not matched:
        return rank_ascending(loads, ids, rng)
    keys = [(-matched.get(rid, 0) if matched.get(rid, 0) >= policy.params.min_match_blocks else 0, load, rng.random(), rid)
            for rid, load in zip(ids, loads)]
    return [[k[3]] for k in sorted(keys)]


@pytest.mark.parametrize("seed", range(30))
def test_prefix_aware_without_peers_ranks_as_before(seed):
    rng = random.Random(seed)
    policy = make_policy("prefix_aware")
    for _ in range(20):
        policy.on_routed(RequestView("w", 100, 10, prefix_hashes=(rng.randrange(5), rng.randrange(5))),
                         f"r{rng.randrange(6)}", now=0.0)
    snaps = [ReplicaSnapshot(f"r{i}", num_running=rng.randrange(0, 60), stats_time=0.0) for i in range(6)]
    request = RequestView("q", 100, 10, prefix_hashes=(rng.randrange(5), rng.randrange(5)))
    assert policy.choose(request, snaps, now=0.0, rng=random.Random(seed)) == old_prefix_aware(
        policy, request, snaps, random.Random(seed))


def test_prefix_aware_spreads_unseen_decisions_among_the_least_loaded_and_keeps_affinity():
    policy = make_policy("prefix_aware")
    snaps = [ReplicaSnapshot(f"r{i}", num_running=n, peers_in_transit=4.0) for i, n in enumerate((0, 1, 2, 30))]
    view = RequestView("q", 100, 10)
    picked = {policy.choose(view, snaps, now=0.0, rng=random.Random(s))[0][0] for s in range(200)}
    assert picked == {"r0", "r1", "r2"}  # the level of 4 requests over loads 0, 1, 2 never reaches 30
    policy.on_routed(RequestView("w", 100, 10, prefix_hashes=(7, 8)), "r3", now=0.0)
    held = RequestView("q", 100, 10, prefix_hashes=(7, 8))
    assert {policy.choose(held, snaps, now=0.0, rng=random.Random(s))[0][0] for s in range(50)} == {"r3"}


# ---- the process channel -----------------------------------------------------------------------------------------
class Listener:
    def __init__(self):
        self.batches: list[list] = []

        self.arrivals: list[float] = []

    def _peer_bookings(self, batch: list, arrived: float) -> None:
        self.batches.append(batch)
        self.arrivals.append(arrived)


@pytest.fixture
def channel():
    yield
    peers.detach_sender()


def test_post_without_a_link_drops_the_booking(channel):
    peers.detach_sender()
    assert peers.post(peers.booking("r0", 1.0, 1, 1.0)) is False


def test_bookings_posted_in_one_loop_step_go_out_as_one_batch(channel):
    sent: list[list] = []
    peers.attach_sender(sent.append)

    async def burst():
        for i in range(5):
            assert peers.post(peers.booking("r0", float(i), 1, 1.0))
        assert sent == []  # not during the decision
        await asyncio.sleep(0)

    asyncio.run(burst())
    assert [len(b) for b in sent] == [5]
    assert peers.post(peers.booking("r0", 9.0, 1, 1.0)) and len(sent) == 2  # no loop: at once


def test_the_outbox_is_bounded(channel, monkeypatch):
    stuck: list[list] = []
    peers.attach_sender(stuck.append)

    async def flood():
        for i in range(peers.MAX_OUTBOX + 100):
            peers.post(peers.booking("r0", float(i), 1, 1.0))
        assert len(peers._outbox) == peers.MAX_OUTBOX  # the oldest dropped
        await asyncio.sleep(0)

    asyncio.run(flood())
    assert sum(map(len, stuck)) == peers.MAX_OUTBOX and max(map(len, stuck)) <= peers.MAX_BATCH


def test_deliver_reaches_every_registered_router():
    a, b = Listener(), Listener()
    peers.register(a)
    peers.register(b)
    batch = [peers.booking("r0", 1.0, 1, 1.0)]
    assert peers.deliver(batch, 5.0) >= 2
    assert a.batches == [batch] and b.batches == [batch] and a.arrivals == b.arrivals == [5.0]
    assert peers.deliver("not a list", 5.0) == 0


def test_poll_hands_over_to_the_attached_link_and_is_a_no_op_without_one(channel):
    polls = []
    peers.attach_sender(lambda batch: None, lambda: polls.append(1) or 2)
    assert peers.poll() == 2 and polls == [1]
    peers.detach_sender()
    assert peers.poll() == 0 and polls == [1]


def test_the_wire_format_round_trips_and_refuses_what_is_not_ours():
    batch = [peers.booking("r0", 1.5, 10, 2.5, (1, 2)), peers.booking("r1", 2.0, 3, 0.0)]
    data = peers.encode("secret", batch)
    assert peers.decode(data, "secret") == batch
    assert peers.decode(data, "other") is None
    for junk in (b"", b"\xff\xfe", b"[1, 2]", b'{"t": "secret", "b": 3}', b"{" * 100000):
        assert peers.decode(junk, "secret") is None
