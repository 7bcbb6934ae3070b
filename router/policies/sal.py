"""``sal``: token-aware load balancing — route to the least outstanding token work (DESIGN.md §4.1).

For each candidate replica i with published stats (``stats_known``), all in prompt-token equivalents:

    P_i      = num_waiting_prompt_tokens + delta_prompt_tokens
               prompt tokens routed to i and not yet prefilled (published, net of cache hits) plus what this
               router sent since the stats
    D_i      = num_decode_tokens_remaining + delta_decode_tokens
               expected remaining decode tokens (published) plus those of requests routed since
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

Replicas with ``stats_known`` False: their load is unknown, so they are ranked *after* all known replicas,
by ascending ``local_outstanding`` (this router's exact count), random tie-break. Why not mix them in: an
unmeasured replica would otherwise look empty and attract a burst; stats arrive within one stats period, and
the fallback tiers still reach these replicas. If no replica has stats the ranking is least-local-outstanding.

Note on ``free_i``: subtracting all of ``P_i`` (not just the delta) counts the published waiting prompts too;
vLLM allocates their blocks only when it schedules them, so they are not yet out of ``num_free_blocks``.

State (updated only by hooks):
  index      PrefixIndex of prefixes routed (``on_routed`` inserts; ``on_replica_removed`` forgets)
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
  min_match_blocks     int >= 1, default 1                shorter prefix matches earn no credit
  prefix_credit_weight float >= 0, default 8.0            weight of a cached prompt token (see above)
  max_index_entries    int >= 1, default 65536            (hash, replica) pairs in the prefix index
  prior_output_tokens  float > 0, default 256.0           output-length estimate before any completion
  prior_weight         float >= 0, default 8.0            observations the prior is worth
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from halffull.router.estimate import OutputLengthEstimator
from halffull.router.prefix_index import PrefixIndex
from halffull.router.types import Completion, ReplicaSnapshot, RequestView, Rng, Tiers

NAME = "sal"


@dataclass(frozen=True, slots=True)
class SalParams:
    """Weights, ablation switches, index size and output-length prior of ``sal`` (module docstring)."""

    decode_weight: float | None = 0.5
    use_decode_work: bool = True
    use_prefix_credit: bool = True
    kv_penalty: bool = True
    min_match_blocks: int = 1
    prefix_credit_weight: float = 8.0
    max_index_entries: int = 65536
    prior_output_tokens: float = 256.0
    prior_weight: float = 8.0

    def __post_init__(self) -> None:
        if self.decode_weight is not None and not self.decode_weight >= 0:
            raise ValueError(f"decode_weight must be >= 0 or None, got {self.decode_weight}")
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


class SalPolicy:
    """Least outstanding token work, net of router-known prefix hits, with a KV-fit penalty."""

    __slots__ = ("params", "index", "estimator")
    name = NAME

    def __init__(self, params: SalParams | None = None) -> None:
        self.params = params or SalParams()
        self.index = PrefixIndex(self.params.max_index_entries)
        self.estimator = OutputLengthEstimator(self.params.prior_output_tokens, self.params.prior_weight)

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
        kv, floor, rnd = p.kv_penalty, p.min_match_blocks, rng.random
        block_tokens, max_credit = request.prefix_block_size, max(prompt - 1, 0)
        extra_credit = p.prefix_credit_weight - 1.0
        known, unknown = [], []
        for r in replicas:
            if not r.stats_known:
                unknown.append((r.local_outstanding, rnd(), r.replica_id))
                continue
            waiting = r.num_waiting_prompt_tokens + r.delta_prompt_tokens
            wd = r.decode_cost_ratio if fixed_wd is None else fixed_wd
            load = waiting + wd * (r.num_decode_tokens_remaining + r.delta_decode_tokens)
            cost = prompt
            score = load + cost
            if matched:
                blocks = matched.get(r.replica_id, 0)
                if blocks >= floor:
                    credit = min(blocks * block_tokens, max_credit)
                    cost = prompt - credit
                    score = load + cost - extra_credit * credit
            misfit = False
            bs = r.block_size
            if kv and r.num_total_blocks > 0 and bs > 0:
                # ceil via negated floor division; free blocks after the prompts queued ahead are allocated
                if -(-cost // bs) > r.num_free_blocks + (-waiting // bs):
                    misfit = True
                    score += load  # penalty: wait behind the whole queue ahead
            known.append((score, misfit, rnd(), r.replica_id))
        known.sort()
        tiers = []
        for k in known:  # (a loop: cheaper than a comprehension's frame for a handful of replicas)
            tiers.append([k[3]])
        if unknown:
            unknown.sort()
            tiers += [[u[2]] for u in unknown]
        return tiers

    def on_routed(self, request: RequestView, replica_id: str, *, now: float) -> None:
        if self.params.use_prefix_credit and request.prefix_hashes:
            self.index.insert(request.prefix_hashes, replica_id)

    def on_finished(self, completion: Completion) -> None:
        self.estimator.observe(completion.num_output_tokens)

    def on_replica_removed(self, replica_id: str) -> None:
        self.index.remove_replica(replica_id)
