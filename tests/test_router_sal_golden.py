"""sal's fast ``choose`` (memoized per snapshot, router/policies/sal.py) against the plain form it replaced:
identical ranked tiers and identical rng use, call after call, on seeded random fleets that exercise every
branch (alone and shared, spread, power of d, KV misfits, prefix holders, unknown replicas, per-replica decode
weights, mixed block sizes, snapshots reused across calls and rebuilt)."""

from __future__ import annotations

import random

import pytest

from halffull.router.policies.sal import SalParams, SalPolicy, _sample_first, _waterfill_pick, wd_of
from halffull.router.types import ReplicaSnapshot, RequestView


def reference_choose(policy: SalPolicy, request: RequestView, replicas, rng) -> list[list[str]]:
    """The plain form of ``SalPolicy.choose`` (the code before the memo), verbatim but for ``self`` and the
    later ``spread_pool`` switch."""
    p = policy.params
    prompt = request.num_prompt_tokens
    matched = None
    if p.use_prefix_credit and request.prefix_hashes:
        matched = policy.index.match(request.prefix_hashes)
    fixed_wd = 0.0 if not p.use_decode_work else p.decode_weight
    kv, floor, rnd = p.kv_penalty, p.min_match_blocks, rng.random
    block_tokens, max_credit = request.prefix_block_size, max(prompt - 1, 0)
    extra_credit = p.prefix_credit_weight - 1.0
    share = replicas[0].traffic_share if replicas else 1.0
    alone = share >= p.alone_share
    scale = p.delta_scale if p.delta_scale is not None else (1.0 if alone else 1.0 / share)
    known, unknown, holders = [], [], []
    for r in replicas:
        if not r.stats_known:
            unknown.append((r.local_outstanding, rnd(), r.replica_id))
            continue
        waiting = r.num_waiting_prompt_tokens + scale * r.delta_prompt_tokens
        wd = r.decode_cost_ratio if fixed_wd is None else fixed_wd
        load = waiting + wd * (r.num_decode_tokens_remaining + scale * r.delta_decode_tokens)
        cost = prompt
        score = load + cost
        if matched:
            blocks = matched.get(r.replica_id, 0)
            if blocks >= floor:
                credit = min(blocks * block_tokens, max_credit)
                cost = prompt - credit
                score = load + cost - extra_credit * credit
                holders.append(len(known))
        misfit = False
        bs = r.block_size
        if kv and r.num_total_blocks > 0 and bs > 0:
            if -(-cost // bs) > r.num_free_blocks + (-waiting // bs):
                misfit = True
                score += load
        known.append((score, misfit, rnd(), r.replica_id))
    holder_ids = {known[i][3] for i in holders}
    if not alone and 0 < p.sample_size < len(known):
        known = _sample_first(known, p.sample_size, holders, rng)
    else:
        known.sort()
        if p.spread > 0 and not alone and scale > 1 and len(known) > 1:
            work = prompt + wd_of(fixed_wd) * policy.expected_decode_tokens(request)
            if not holders:
                pool = known
            elif p.spread_pool == "holders":
                pool = [k for k in known if k[3] in holder_ids]
            else:  # (spread_pool, added after the memo: the same rule in both forms)
                deepest = max(matched[k[3]] for k in known if k[3] in holder_ids)
                pool = [k for k in known if matched.get(k[3], 0) == deepest]
                if pool[0] is not known[0]:
                    pool = [known[0]]
            pick = _waterfill_pick(pool, p.spread * (scale - 1) * work, rng)
            if pick is not known[0]:
                known.remove(pick)
                known.insert(0, pick)
    tiers = [[k[3]] for k in known]
    if unknown:
        unknown.sort()
        tiers += [[u[2]] for u in unknown]
    return tiers


def fleet(n: int, rng: random.Random, share: float) -> list[ReplicaSnapshot]:
    """Random snapshots; small integer ranges so that equal scores (ties) and exact KV edges occur."""
    out = []
    for i in range(n):
        bs = rng.choice((16, 16, 16, 32, 0))
        out.append(ReplicaSnapshot(
            f"r{i}", num_waiting_prompt_tokens=rng.choice((0, 0, 64, rng.randint(0, 4000))),
            num_decode_tokens_remaining=rng.choice((0.0, float(rng.randint(0, 3000)))),
            num_free_blocks=rng.randint(0, 300), num_total_blocks=rng.choice((0, 512, 512, 512)), block_size=bs,
            decode_cost_ratio=rng.choice((1.0, 2.5)), stats_known=rng.random() > 0.1,
            local_outstanding=rng.randint(0, 3), delta_prompt_tokens=rng.choice((0, 0, rng.randint(0, 900))),
            delta_decode_tokens=rng.choice((0.0, 100.0)), traffic_share=share))
    return out


PARAMS = {
    "defaults": {},
    "delta-scale-2": {"delta_scale": 2.0},
    "sample-2": {"sample_size": 2},
    "spread-pool-holders": {"spread_pool": "holders"},
    "no-spread": {"spread": 0.0},
    "per-replica-decode-weight": {"decode_weight": None},
    "no-decode-work": {"use_decode_work": False},
    "no-kv": {"kv_penalty": False},
    "no-prefix-credit": {"use_prefix_credit": False},
    "min-match-2-weight-1": {"min_match_blocks": 2, "prefix_credit_weight": 1.0},
}


@pytest.mark.parametrize("params", PARAMS.values(), ids=list(PARAMS))
@pytest.mark.parametrize("n", [1, 4, 64])
def test_fast_choose_matches_the_plain_form(params, n):
    rng = random.Random(n * 7919 + len(params))
    fast, plain = SalPolicy(SalParams(**params)), SalPolicy(SalParams(**params))
    fleets = [fleet(n, rng, share) for share in (1.0, 1.0, 0.5, 0.125, 0.125)]
    families = [[rng.getrandbits(40) for _ in range(6)] for _ in range(5)]
    seed_fast, seed_plain = random.Random(1), random.Random(1)
    for k in range(300):
        hashes = tuple(families[k % 5][:rng.randint(0, 6)])
        request = RequestView(f"q{k}", rng.randint(1, 3000), rng.choice((64, 512)), prefix_hashes=hashes,
                              prefix_block_size=16)
        replicas = fleets[k % len(fleets)]
        if k % 7 == 0:  # a rebuilt fleet (new snapshot objects, equal or changed values)
            replicas = fleets[k % len(fleets)] = [r._replace(delta_prompt_tokens=r.delta_prompt_tokens + k % 2)
                                                  for r in replicas]
        assert fast.choose(request, replicas, now=0.0, rng=seed_fast) == reference_choose(
            plain, request, replicas, seed_plain)
        chosen = f"r{rng.randrange(n)}"
        fast.on_routed(request, chosen, now=0.0)
        plain.on_routed(request, chosen, now=0.0)
    assert seed_fast.random() == seed_plain.random()  # the same number of draws


def test_memo_is_bounded():
    policy, rng = SalPolicy(), random.Random(0)
    for k in range(200):
        policy.choose(RequestView("q", 100, 64), fleet(8, rng, 1.0), now=0.0, rng=rng)
    assert len(policy._memo) <= 16 * 8 + 1024 + 8
