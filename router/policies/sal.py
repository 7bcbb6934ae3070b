"""``sal``: token-aware load balancing — route to the least outstanding token work (DESIGN.md §4.1).

For each candidate replica i with published stats (``stats_known``), all in prompt-token equivalents:

    K        = delta_scale, or 1 / traffic_share when delta_scale is None (router/share.py; 1 when alone)
    P_i      = num_waiting_prompt_tokens + K * delta_prompt_tokens
               prompt tokens routed to i and not yet prefilled (published, net of cache hits) plus what this
               router sent since the stats, times K: the other routers, on the same stale stats, sent about
               (K - 1) times as much (share-scaled deltas)
    D_i      = num_decode_tokens_remaining + K * delta_decode_tokens
               expected remaining decode tokens (published) plus those of requests routed since, times K
    w_d      = decode_weight (default 0.5), or the replica's decode_cost_ratio when decode_weight is None;
               0 when use_decode_work is False
    load_i   = P_i + w_d * D_i

    credit_i = min(m_i * prefix_block_size, num_prompt_tokens - 1)
                   if use_prefix_credit and m_i >= min_match_blocks, else 0
               (m_i = blocks of the request's prefix this router sent to i, from the PrefixIndex; at least one
               prompt token is always computed, as in vLLM)
    cost_i   = num_prompt_tokens - credit_i                (the new request's uncached prompt on i)

    KV fit (when kv_penalty and the replica reports its cache, i.e. num_total_blocks > 0 and block_size > 0):
    free_i   = num_free_blocks - ceil(P_i / block_size)    blocks left once the prompts queued ahead of it
               - ceil(kv_growth_weight * D_i / block_size)  (and, if weighted, the expected decode growth)
                                                           are allocated
    fits_i   = ceil(cost_i / block_size) <= free_i
    penalty_i = 0 if fits_i else load_i                    it must wait behind the whole queue ahead:
                                                           memory frees only as that work drains

    score_i  = load_i + penalty_i + cost_i - (prefix_credit_weight - 1) * credit_i

``prefix_credit_weight`` (w >= 0, default 8): how much a cached prompt token on i is worth against a queued
token. With w = 1 the score is this request's own finish-time estimate; but a recompute also delays every
request queued behind it, so under load a conversation moved off the replica holding its prefix costs the
fleet far more than the request saves. On Mooncake at its knee (4 H100s, x5) w = 1, 2, 4, 8, 16 gave mean
TTFT 1.98, 1.19, 0.96, 0.76, 0.71 s (prefix_aware: 0.81 s) and no change below the knee; 8 is the default.

Rank known replicas by ascending ``(score_i, not fits_i)`` (at equal score a replica that fits first), ties
in uniformly random order from ``rng``.

Power of d among many routers: when ``traffic_share < alone_share`` and ``sample_size`` >= 1, draw
``sample_size`` known replicas uniformly with ``rng`` and add every *holder* (m_i >= min_match_blocks: it
holds the request's prefix, so affinity never leaves the sample); rank the sample first, then the rest, each
by the order above. Why: N routers sending every request to the argmin of the same stale loads herd onto one
replica between two stats (Mitzenmacher, "How useful is old information?"); sampling spreads the herd, and a
router that is alone (share near 1) keeps the full argmin, which measured better (1 router p99 0.44x pow2
full argmin vs 0.50x sampled, Azure conv x14).

Replicas with ``stats_known`` False: their load is unknown, so they are ranked *after* all known replicas,
by ascending ``local_outstanding`` (this router's exact count), random tie-break. Why not mix them in: an
unmeasured replica would otherwise look empty and attract a burst; stats arrive within one stats period, and
the fallback tiers still reach these replicas. If no replica has stats the ranking is least-local-outstanding.

Shared prefix knowledge: with ``use_published_prefixes`` the index also takes every replica's published
``recent_prefix_hashes`` (router/feed.py) through ``on_stats``, so a conversation another router sent is
found where it is (with 8 routers each router alone would see an eighth of the conversations).

Bookings shared between routers (``peer_bookings``, router/peers.py): every router broadcasts where it sent
each request, and the others count those sends in their deltas until the stats include them, and insert their
prefix hashes in the index (``on_peer_routed``). With every peer's bookings arriving, the deltas are the
fleet's and the traffic share this router knows of is about 1: it is "alone" (K = 1). What it still cannot
see are the peers' decisions made within the bookings' lag of its own, ``peers_in_transit`` (B): the
water-filled pick below draws with the budget ``spread * ((K - 1) + B) * work`` (K - 1 = 0 when alone), so
it is the single-router rule exactly when B = 0 (one router, or peers' decisions never close to ours). A
router whose peers fall silent sees its share drop and B decay to 0, and falls back to share-scaled deltas
and the water-filled pick with K.

Note on ``free_i``: subtracting all of ``P_i`` (not just the delta) counts the published waiting prompts too;
vLLM allocates their blocks only when it schedules them, so they are not yet out of ``num_free_blocks``.

State (updated only by hooks):
  index      PrefixIndex of prefixes routed (``on_routed`` inserts; ``on_stats`` merges the published ones;
             ``on_replica_removed`` forgets)
  estimator  OutputLengthEstimator (``on_finished`` observes the output length). Callers fill
             ``delta_decode_tokens`` with ``expected_decode_tokens(request)`` and ``delta_prompt_tokens`` with
             ``uncached_prompt_tokens(request, replica)`` for each request they route after the stats, so
             deltas are net of cache hits like the published waiting tokens.

Params (``SalParams``):
  decode_weight        float >= 0 or None, default 0.5    None: use each replica's decode_cost_ratio (the
                                                          marginal cost of a decode token at its batch, ~2
                                                          prefill tokens at large batches). 0.5 measured
                                                          better for TTFT: it is set by the prefill queue,
                                                          which decode work slows less than it costs in
                                                          throughput (Azure conv x15 p99 TTFT 0.48 vs 0.65 s,
                                                          Mooncake x5 2.5 vs 3.8 s, TPOT p99 lower too)
  use_decode_work      bool, default True                 False: w_d = 0 (ablation: prompt work only)
  use_prefix_credit    bool, default True                 False: cost_i = num_prompt_tokens, no index
  kv_penalty           bool, default True                 False: no KV-fit penalty
  kv_growth_weight     float >= 0, default 0.0            KV fit also subtracts ceil(weight * D_i / block_size)
                                                          from free_i: blocks its requests' expected decode
                                                          growth will take (docs/results/long_output.md)
  min_match_blocks     int >= 1, default 1                shorter prefix matches earn no credit
  prefix_credit_weight float >= 0, default 8.0            weight of a cached prompt token (see above)
  max_index_entries    int >= 1, default 65536            (hash, replica) pairs in the prefix index
  prior_output_tokens  float > 0, default 256.0           output-length estimate before any completion
  prior_weight         float >= 0, default 8.0            observations the prior is worth
  delta_scale          float >= 0 or None, default None   K; None: 1 / traffic_share (self-calibrating);
                                                          1.0 = the single-router rule (ablation)
  spread               float >= 0, default 2.0            water-filled pick: L with sum (L - score_i)+ =
                                                          spread * ((K - 1) + B) * work (work =
                                                          prompt + w_d * expected decode of this request); the
                                                          first tier is i with probability (L - score_i)+ /
                                                          that budget, drawn among prefix holders only when
                                                          there are any; 0: argmin. Azure conv x14, 4 replicas,
                                                          8 routers, with K (no bookings): spread 0 / 0.5 / 1 /
                                                          2 / 4 gave p99 0.364 / 0.325 / 0.353 / 0.326 / 0.360
                                                          s, mean 0.128 / 0.104 / 0.104 / 0.102 / 0.103 s.
                                                          With bookings (B, 1.2 ms lag), Azure x40, 16
                                                          replicas, 16 routers: spread 0 / 1 / 2 / 4 / 8 gave
                                                          mean 55.8 / 50.7 / 49.7 / 49.3 / 48.7 ms (measured
                                                          with B as rate * lag, before it learned bursts)
  sample_size          int >= 0, default 0                d of the power-of-d sample (prefix holders always
                                                          in it); 0: never sample. With K, d = 2 gave 0.359 /
                                                          0.107 s on the same run: off by default
  alone_share          float in [0, 1], default 0.75      at or above this traffic share the router is alone:
                                                          K = 1, no sampling, spread by B only (the
                                                          single-router rule exactly when B = 0)
  use_published_prefixes bool, default True               False: the index holds only this router's sends
  spread_pool          "deepest" | "holders", default "deepest"
                                                          who the water-filled pick draws among when the
                                                          request has prefix holders. "deepest": only the
                                                          replicas holding its longest matched prefix, and
                                                          none (the argmin stays first) when the argmin is not
                                                          one of them; "holders": every holder. Why: a shared
                                                          head (a system prompt every replica holds) makes
                                                          every replica a holder, and a budget of spread *
                                                          (K - 1) * work (14x the request's work at K = 8)
                                                          outweighs the credit of the conversation's own
                                                          replica. Mooncake conv x4.5, 4 replicas, 8 routers:
                                                          "holders" p99 0.971 / mean 0.357 s, prefix hits
                                                          0.177; "deepest" 1.013 / 0.332 s, hits 0.239 (1
                                                          router: 0.699 / 0.285 s, hits 0.247)

  peer_bookings        bool, default True                 broadcast this router's bookings and take its peers'
                                                          (router/peers.py); False: share nothing but the stats
                                                          (ablation)

Cost: ``choose`` is one pass over the candidates plus a sort. The request-independent part of each snapshot
(``load_i``, the free blocks left after its queued prompts) is memoized per snapshot object (``_prepare``;
snapshots are immutable and a router's accounting reuses a replica's snapshot until its stats or queue
change), bounded at 16 entries per candidate + 1024. The memo changes no result: tests/test_router_sal_golden.py
compares every ranking and every rng draw with the plain form above. ``halffull bench router`` at 64 replicas,
same process, interleaved (CPU time of this process, loaded 2-core box): 65 -> 44 us per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from halffull.router.estimate import OutputLengthEstimator
from halffull.router.policies import waterfill_pick
from halffull.router.feed import merge_published
from halffull.router.prefix_index import PrefixIndex
from halffull.router.types import Completion, ReplicaSnapshot, RequestView, Rng, Tiers

NAME = "sal"

# ``choose`` unpacks a snapshot positionally: these are the fields it reads, at their positions.
_UNPACKED = {0: "replica_id", 3: "num_waiting_prompt_tokens", 4: "num_decode_tokens_remaining", 5: "num_free_blocks",
             6: "num_total_blocks", 7: "block_size", 8: "decode_cost_ratio", 11: "stats_known",
             12: "local_outstanding", 14: "delta_prompt_tokens", 15: "delta_decode_tokens"}
if len(ReplicaSnapshot._fields) != 18 or any(ReplicaSnapshot._fields[i] != f for i, f in _UNPACKED.items()):
    raise TypeError("SalPolicy.choose unpacks ReplicaSnapshot positionally: update it with the fields")


@dataclass(frozen=True, slots=True)
class SalParams:
    """Weights, ablation switches, index size and output-length prior of ``sal`` (module docstring)."""

    decode_weight: float | None = 0.5
    use_decode_work: bool = True
    use_prefix_credit: bool = True
    kv_penalty: bool = True
    kv_growth_weight: float = 0.0
    min_match_blocks: int = 1
    prefix_credit_weight: float = 8.0
    max_index_entries: int = 65536
    prior_output_tokens: float = 256.0
    prior_weight: float = 8.0
    delta_scale: float | None = None
    spread: float = 2.0
    sample_size: int = 0
    alone_share: float = 0.75
    use_published_prefixes: bool = True
    spread_pool: str = "deepest"
    peer_bookings: bool = True

    def __post_init__(self) -> None:
        if self.decode_weight is not None and not self.decode_weight >= 0:
            raise ValueError(f"decode_weight must be >= 0 or None, got {self.decode_weight}")
        if not self.kv_growth_weight >= 0:
            raise ValueError(f"kv_growth_weight must be >= 0, got {self.kv_growth_weight}")
        if not self.prefix_credit_weight >= 0:
            raise ValueError(f"prefix_credit_weight must be >= 0, got {self.prefix_credit_weight}")
        if self.min_match_blocks < 1:
            raise ValueError(f"min_match_blocks must be >= 1, got {self.min_match_blocks}")
        if self.max_index_entries < 1:
            raise ValueError(f"max_index_entries must be >= 1, got {self.max_index_entries}")
        if not self.prior_output_tokens > 0:
            raise ValueError(f"prior_output_tokens must be > 0, got {self.prior_output_tokens}")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.delta_scale is not None and not self.delta_scale >= 0:
            raise ValueError(f"delta_scale must be >= 0 or None, got {self.delta_scale}")
        if not self.spread >= 0:
            raise ValueError(f"spread must be >= 0, got {self.spread}")
        if self.sample_size < 0:
            raise ValueError(f"sample_size must be >= 0, got {self.sample_size}")
        if self.spread_pool not in ("deepest", "holders"):
            raise ValueError(f"spread_pool must be 'deepest' or 'holders', got {self.spread_pool!r}")
        if not 0 <= self.alone_share <= 1:
            raise ValueError(f"alone_share must be in [0, 1], got {self.alone_share}")


class SalPolicy:
    """Least outstanding token work, net of router-known prefix hits, with a KV-fit penalty."""

    __slots__ = ("params", "index", "estimator", "_memo")
    name = NAME

    def __init__(self, params: SalParams | None = None) -> None:
        self.params = params or SalParams()
        self.index = PrefixIndex(self.params.max_index_entries)
        self.estimator = OutputLengthEstimator(self.params.prior_output_tokens, self.params.prior_weight)
        self._memo: dict[int, tuple] = {}  # id(snapshot) -> ``_prepare`` entry; bounded in ``choose``

    def expected_decode_tokens(self, request: RequestView) -> float:
        """Expected output tokens of a request about to be routed (fills ``delta_decode_tokens``)."""
        return self.estimator.expected_remaining(request.max_tokens, 0)

    def uncached_prompt_tokens(self, request: RequestView, replica_id: str) -> int:
        """``cost_i`` of the request on the chosen replica: what callers record as ``delta_prompt_tokens``
        (call before ``on_routed``, which inserts the request's own prefix)."""
        p, prompt = self.params, request.num_prompt_tokens
        if not (p.use_prefix_credit and request.prefix_hashes):
            return prompt
        blocks = self.index.match(request.prefix_hashes).get(replica_id, 0)
        if blocks < p.min_match_blocks:
            return prompt
        return prompt - min(blocks * request.prefix_block_size, max(prompt - 1, 0))

    def choose(
        self, request: RequestView, replicas: Sequence[ReplicaSnapshot], *, now: float, rng: Rng
    ) -> Tiers:
        p = self.params
        prompt = request.num_prompt_tokens
        matched = None
        if p.use_prefix_credit and request.prefix_hashes:
            matched = self.index.match(request.prefix_hashes)
        fixed_wd = 0.0 if not p.use_decode_work else p.decode_weight  # None: per replica
        floor, rnd = p.min_match_blocks, rng.random
        # (conditional expressions, not min/max: a builtin min/max call costs more than the rest of a line here)
        block_tokens, max_credit = request.prefix_block_size, (prompt - 1 if prompt > 1 else 0)
        extra_credit = p.prefix_credit_weight - 1.0
        share = replicas[0].traffic_share if replicas else 1.0
        alone = share >= p.alone_share  # alone: the single-router rule exactly (K = 1, argmin)
        scale = p.delta_scale if p.delta_scale is not None else (1.0 if alone else 1.0 / share)
        known, unknown, holders = [], [], []
        append = known.append
        memo = self._memo
        if len(memo) > 16 * len(replicas) + 1024:  # bounded: a few generations of every snapshot
            memo.clear()
        get, last_bs, need = memo.get, 0, 0
        # One pass per candidate; the request-independent part of each snapshot comes from the memo (see
        # ``_prepare``). Same arithmetic, same order of operations and of rng draws as the plain form in the
        # module docstring (tests/test_router_sal_golden.py holds that form and compares).
        for r in replicas:
            e = get(id(r))
            if e is None or e[0] is not r or e[1] != scale:
                e = self._prepare(r, scale, fixed_wd)
            _, _, load, free_after, bs, rid, local = e
            if load is None:  # no usable stats
                unknown.append((local, rnd(), rid))
                continue
            if matched:
                blocks = matched.get(rid, 0)
                if blocks >= floor:
                    credit = min(blocks * block_tokens, max_credit)
                    cost = prompt - credit
                    score = load + cost - extra_credit * credit
                    holders.append(len(known))
                    if free_after is not None and -(-cost // bs) > free_after:
                        append((score + load, True, rnd(), rid))  # penalty: wait behind the whole queue ahead
                    else:
                        append((score, False, rnd(), rid))
                    continue
            if free_after is not None:
                if bs != last_bs:
                    last_bs, need = bs, -(-prompt // bs)  # blocks of the prompt (ceil)
                if need > free_after:
                    append((load + prompt + load, True, rnd(), rid))
                    continue
            append((load + prompt, False, rnd(), rid))
        if not alone and 0 < p.sample_size < len(known):
            known = _sample_first(known, p.sample_size, holders, rng)
        else:
            known.sort()
            # the others route about (K - 1) requests like this one on the same view meanwhile, plus the ones
            # whose bookings are on their way (peers_in_transit): decisions neither side sees yet
            blind = (scale - 1.0 if not alone else 0.0) + (replicas[0].peers_in_transit if replicas else 0.0)
            if p.spread > 0 and blind > 0 and len(known) > 1:
                work = prompt + wd_of(fixed_wd) * self.expected_decode_tokens(request)
                # prefix holders keep the request: spread only among them (affinity never leaves the draw)
                if not holders:
                    pool = known
                elif p.spread_pool == "holders":
                    pool = [k for k in known if matched.get(k[3], 0) >= floor]
                else:  # "deepest": only the longest-prefix holders; the argmin stays first when it is not one
                    deepest = max(matched[known_key[3]] for known_key in known if known_key[3] in matched)
                    pool = [k for k in known if matched.get(k[3], 0) == deepest]
                    if pool[0] is not known[0]:
                        pool = [known[0]]
                pick = _waterfill_pick(pool, p.spread * blind * work, rng)
                if pick is not known[0]:
                    known.remove(pick)
                    known.insert(0, pick)
        tiers = [[k[3]] for k in known]
        if unknown:
            unknown.sort()
            tiers += [[u[2]] for u in unknown]
        return tiers

    def _prepare(self, r: ReplicaSnapshot, scale: float, fixed_wd: float | None) -> tuple:
        """The memo entry of snapshot ``r`` at delta scale ``scale``: (r, scale, load_i or None when
        ``stats_known`` is False, the free blocks left after the queued prompts or None when the KV check does
        not apply, block_size, replica_id, local_outstanding). Snapshots are immutable and the entry holds
        ``r``, so an entry found under ``id(r)`` whose ``r`` is the candidate is exact; the memo changes no
        result (a cache of a pure function), only the cost of ``choose`` with many replicas."""
        (rid, _, _, wpt, dec, free, total, bs, ratio, _, _, ok, local, _, dpt, ddt, _, _) = r
        if not ok:
            e = (r, scale, None, None, bs, rid, local)
        else:
            waiting = wpt + scale * dpt
            load = waiting + (ratio if fixed_wd is None else fixed_wd) * (dec + scale * ddt)
            # (ceil via negated floor division) free blocks once the prompts queued ahead are allocated
            kv = self.params.kv_penalty and total > 0 and bs > 0
            if kv and self.params.kv_growth_weight > 0:
                # expected decode growth of its requests will take blocks too: not free for this one
                free -= -(-int(self.params.kv_growth_weight * (dec + scale * ddt)) // bs)
            e = (r, scale, load, free + (-waiting // bs) if kv else None, bs, rid, local)
        self._memo[id(r)] = e
        return e

    def on_routed(self, request: RequestView, replica_id: str, *, now: float) -> None:
        if self.params.use_prefix_credit and request.prefix_hashes:
            self.index.insert(request.prefix_hashes, replica_id)

    def on_peer_routed(self, prefix_hashes: Sequence[int], replica_id: str) -> None:
        """A peer router sent a request with these prefix hashes to ``replica_id`` (router/peers.py)."""
        if self.params.use_prefix_credit:
            self.index.insert(prefix_hashes, replica_id)

    def on_finished(self, completion: Completion) -> None:
        self.estimator.observe(completion.num_output_tokens)

    def on_replica_removed(self, replica_id: str) -> None:
        self.index.remove_replica(replica_id)

    def on_stats(self, replica_id: str, stats: Mapping[str, Any]) -> None:
        p = self.params
        if p.use_prefix_credit and p.use_published_prefixes:
            merge_published(self.index, replica_id, stats)


def _sample_first(known: list[tuple], d: int, holders: list[int], rng: Rng) -> list[tuple]:
    """``known`` keys re-ordered: ``d`` uniform draws plus the prefix holders (indices into ``known``),
    sorted, then the rest, sorted (power of d; module docstring)."""
    n = len(known)
    drawn: set[int] = set()
    while len(drawn) < d:  # d distinct uniform draws (d < n)
        drawn.add(rng.randrange(n))
    picked = drawn.union(holders)
    first = sorted(known[i] for i in picked)
    rest = sorted(known[i] for i in range(n) if i not in picked)
    return first + rest


def wd_of(fixed_wd: float | None) -> float:
    return 1.0 if fixed_wd is None else fixed_wd


def _waterfill_pick(known: list[tuple], budget: float, rng: Rng) -> tuple:
    """``waterfill_pick`` over the sorted ``known`` keys by their scores (``k[0]``)."""
    return waterfill_pick(known, [k[0] for k in known], budget, rng)
