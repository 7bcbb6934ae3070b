"""``prefix_aware``: prefix-cache affinity unless load is imbalanced (the SGLang cache-aware router / Ray
``PrefixCacheAffinityRouter`` / llm-d prefix-scorer family).

Load of replica i: ``load_i = outstanding_requests`` (``ReplicaSnapshot.outstanding_requests``; the local
count when ``stats_known`` is False). Over the candidates, with ``hi = max load_i`` and ``lo = min load_i``:

    imbalanced  <=>  hi - lo > abs_threshold  and  hi > rel_threshold * lo

* imbalanced: rank by ascending load (cache affinity yields to load; both thresholds must trip, so a small
  cluster with a few requests never counts as imbalanced and an idle replica next to a busy one does).
* otherwise: ``m_i`` = blocks of the request's prefix this router sent to i (``PrefixIndex.match``: the
  longest chained-hash prefix per replica), with ``m_i < min_match_blocks`` counted as 0; rank by
  ``(-m_i, load_i)``: longest match first, ties on match by lower load, then the rest (m_i = 0) by load.

Remaining ties in uniformly random order from ``rng``.

With peers (``peers_in_transit`` = B > 0: the decisions of other routers this one cannot see yet, router/
peers.py): the first tier is drawn among the replicas with the first one's match depth (all of them when
ranking by load) by water-filling their loads with ``spread * B`` requests (``waterfill_pick``): each of the
routers deciding unseen at once lands on a different near-least-loaded replica in expectation, instead of all
on the same one. B = 0 (one router) leaves the ranking above exactly.

The index is this router's view (what it sent, not what the replica still caches): bounded to
``max_index_entries`` (hash, replica) pairs with LRU eviction, updated by ``on_routed`` (inserts the
request's prefix for the chosen replica), ``on_stats`` (with ``use_published_prefixes``: merges the replica's
published ``recent_prefix_hashes``, router/feed.py, so N routers share what each sent) and
``on_replica_removed`` (forgets the replica).

Params (``PrefixAwareParams``):
  abs_threshold      int >= 0,   default 32     requests; SGLang's original router default (its newer
                                                sgl-model-gateway uses 64)
  rel_threshold      float >= 1, default 1.5    SGLang model gateway default
  min_match_blocks   int >= 1,   default 1      shorter matches count as none (SGLang instead uses a match
                                                *ratio*, ``cache_threshold``; a block count needs no
                                                prompt text)
  max_index_entries  int >= 1,   default 65536  (hash, replica) pairs kept; ~ cluster KV capacity in
                                                prefix blocks is a good size
  use_published_prefixes bool, default True     False: the index holds only this router's sends (with 8
                                                routers, an eighth of the conversations)
  peer_bookings      bool, default True         broadcast this router's bookings and take its peers'
                                                (router/peers.py): their sends count in the loads until
                                                the stats include them, their prefixes enter the index
                                                at once (``on_peer_routed``); False: ablation
  spread             float >= 0, default 1.0    requests of water per unseen peer decision (above); 0: the
                                                single-router ranking even with peers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from halffull.router.policies import outstanding, waterfill_pick
from halffull.router.feed import merge_published
from halffull.router.prefix_index import PrefixIndex
from halffull.router.types import Completion, ReplicaSnapshot, RequestView, Rng, Tiers

NAME = "prefix_aware"


@dataclass(frozen=True, slots=True)
class PrefixAwareParams:
    """Thresholds and index size of ``prefix_aware`` (see the module docstring)."""

    abs_threshold: int = 32
    rel_threshold: float = 1.5
    min_match_blocks: int = 1
    max_index_entries: int = 65536
    use_published_prefixes: bool = True
    peer_bookings: bool = True
    spread: float = 1.0

    def __post_init__(self) -> None:
        if self.abs_threshold < 0:
            raise ValueError(f"abs_threshold must be >= 0, got {self.abs_threshold}")
        if self.rel_threshold < 1.0:
            raise ValueError(f"rel_threshold must be >= 1, got {self.rel_threshold}")
        if self.min_match_blocks < 1:
            raise ValueError(f"min_match_blocks must be >= 1, got {self.min_match_blocks}")
        if self.max_index_entries < 1:
            raise ValueError(f"max_index_entries must be >= 1, got {self.max_index_entries}")
        if not self.spread >= 0:
            raise ValueError(f"spread must be >= 0, got {self.spread}")


def is_imbalanced(lo: int, hi: int, params: PrefixAwareParams) -> bool:
    """Both thresholds exceeded: load wins over cache affinity."""
    return hi - lo > params.abs_threshold and hi > params.rel_threshold * lo


class PrefixAwarePolicy:
    """Longest router-known prefix match, unless outstanding requests are imbalanced."""

    __slots__ = ("params", "index")
    name = NAME

    def __init__(self, params: PrefixAwareParams | None = None) -> None:
        self.params = params or PrefixAwareParams()
        self.index = PrefixIndex(self.params.max_index_entries)

    def choose(
        self, request: RequestView, replicas: Sequence[ReplicaSnapshot], *, now: float, rng: Rng
    ) -> Tiers:
        if not replicas:
            return []
        loads = list(map(outstanding, replicas))
        ids = [r.replica_id for r in replicas]
        matched = None
        if not is_imbalanced(min(loads), max(loads), self.params) and request.prefix_hashes:
            matched = self.index.match(request.prefix_hashes)
        rnd = rng.random
        if not matched:  # by load alone (imbalanced, or no holder): match 0 for all
            keys = sorted(zip([0] * len(ids), loads, [rnd() for _ in ids], ids))
        else:
            get, floor = matched.get, self.params.min_match_blocks
            keys = []
            for rid, load in zip(ids, loads):
                blocks = get(rid, 0)
                keys.append((-blocks if blocks >= floor else 0, load, rnd(), rid))
            keys.sort()
        blind = replicas[0].peers_in_transit
        if blind > 0 and self.params.spread > 0 and len(keys) > 1:
            # peers route about ``blind`` requests unseen meanwhile: draw among the best match's replicas by load
            pool = [k for k in keys if k[0] == keys[0][0]]
            pick = waterfill_pick(pool, [k[1] for k in pool], self.params.spread * blind, rng)
            if pick is not keys[0]:
                keys.remove(pick)
                keys.insert(0, pick)
        return [[k[3]] for k in keys]

    def on_routed(self, request: RequestView, replica_id: str, *, now: float) -> None:
        self.index.insert(request.prefix_hashes, replica_id)

    def on_peer_routed(self, prefix_hashes: Sequence[int], replica_id: str) -> None:
        self.index.insert(prefix_hashes, replica_id)

    def on_finished(self, completion: Completion) -> None:
        pass

    def on_replica_removed(self, replica_id: str) -> None:
        self.index.remove_replica(replica_id)

    def on_stats(self, replica_id: str, stats: Mapping[str, Any]) -> None:
        if self.params.use_published_prefixes:
            merge_published(self.index, replica_id, stats)
