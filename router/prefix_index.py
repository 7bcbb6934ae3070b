"""Router-side prefix index: which replica was sent which prompt prefix (approximate, bounded, LRU).

A router cannot see the replicas' KV caches, so, like the SGLang cache-aware router and Ray's
``PrefixCacheAffinityRouter``, it remembers what it *sent* where and assumes the replica still caches it.

Keys are the chained prefix block hashes of ``RequestView.prefix_hashes``: hash k stands for the whole prompt
prefix of blocks 0..k, so a replica holding hash k was sent all of blocks 0..k. Hence

    match(hashes)[r] = 1 + max{ k : r holds hashes[k] }      (the longest prefix r was sent, in blocks)

which stays correct when LRU eviction has dropped some shallower entry of r (no contiguity required).

Bound: at most ``max_entries`` (hash, replica) pairs. Inserting a pair that exists refreshes it; when full,
the least recently inserted pair is evicted. ``insert`` adds a prompt's blocks deepest first, so its shallow
blocks (the ones other requests share: system prompts, conversation heads) are the most recent and are evicted
last — the same order in which vLLM frees a sequence's tail blocks first.

``match`` is read-only (it does not refresh recency): policies call it inside ``choose``, which must be pure;
recency is refreshed by ``insert`` from ``on_routed``.

Cost: ``match`` is O(len(hashes)) dict look-ups plus C-level set operations; the Python-level work per
replica is one dict insertion, so it stays cheap with many replicas holding a shared prefix.

Memory: a hash held by one replica (most of them: distinct prompts) maps to that replica's id itself, not to
a one-element set; only hashes held by several replicas get a set. A small set costs ~216 bytes, about half
of a pair's footprint, so the full index (65,536 pairs) takes ~20 MB instead of ~40 MB: the bound is reached
in a long-running ingress (a soak of distinct ~1.6k-token prompts adds ~25 pairs per request).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class PrefixIndex:
    """Maps prefix block hash -> replicas that were sent that prefix; bounded with LRU eviction."""

    __slots__ = ("max_entries", "_holders", "_by_replica", "_lru")

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._holders: dict[int, str | set[str]] = {}  # hash -> the replica holding it, or a set of >= 2
        self._by_replica: dict[str, set[int]] = {}  # replica -> hashes it holds (for remove_replica)
        self._lru: OrderedDict[tuple[int, str], None] = OrderedDict()  # (hash, replica), oldest first

    def __len__(self) -> int:
        """Number of (hash, replica) pairs held."""
        return len(self._lru)

    def __contains__(self, pair: tuple[int, str]) -> bool:
        return pair in self._lru

    def replicas(self) -> set[str]:
        """Replicas that hold at least one entry."""
        return set(self._by_replica)

    def match(self, prefix_hashes: Sequence[int]) -> dict[str, int]:
        """Longest matched prefix, in blocks, per replica that holds any of ``prefix_hashes`` (read-only)."""
        holders = self._holders
        matched: dict[str, int] = {}
        seen: set[str] = set()
        # Deepest first: the first depth at which a replica appears is its longest match.
        for depth in range(len(prefix_hashes), 0, -1):
            owners = holders.get(prefix_hashes[depth - 1])
            if owners is None:
                continue
            if owners.__class__ is str:  # one holder (see "Memory")
                if owners not in seen:
                    matched[owners] = depth
                    seen.add(owners)
                continue
            new = owners - seen
            if new:
                matched.update(dict.fromkeys(new, depth))
                seen |= new
        return matched

    def insert(self, prefix_hashes: Sequence[int], replica_id: str) -> None:
        """Record that ``replica_id`` was sent the prefix ``prefix_hashes`` (refreshing existing entries)."""
        if not prefix_hashes:
            return
        holders, lru = self._holders, self._lru
        mine = self._by_replica.setdefault(replica_id, set())
        for h in reversed(prefix_hashes):  # deepest first so the shared head is the most recent
            key = (h, replica_id)
            if key in lru:
                lru.move_to_end(key)
                continue
            lru[key] = None
            owners = holders.get(h)
            if owners is None:
                holders[h] = replica_id
            elif owners.__class__ is str:  # a second holder (not replica_id: the pair was new)
                holders[h] = {owners, replica_id}
            else:
                owners.add(replica_id)
            mine.add(h)
        while len(lru) > self.max_entries:
            (h, r), _ = lru.popitem(last=False)
            self._drop(h, r)

    def remove_replica(self, replica_id: str) -> None:
        """Forget everything sent to ``replica_id`` (it left the candidate set or lost its cache)."""
        for h in self._by_replica.pop(replica_id, ()):
            del self._lru[(h, replica_id)]
            self._release(h, replica_id)

    def pairs(self) -> list[tuple[int, str]]:
        """(hash, replica) pairs, least recently inserted first."""
        return list(self._lru)

    def clear(self) -> None:
        self._holders.clear()
        self._by_replica.clear()
        self._lru.clear()

    def _release(self, h: int, replica_id: str) -> None:
        """``replica_id`` no longer holds ``h`` in ``_holders`` (back to the one-holder form at one left)."""
        owners = self._holders[h]
        if owners.__class__ is str:
            del self._holders[h]
            return
        owners.discard(replica_id)
        if len(owners) == 1:
            self._holders[h] = next(iter(owners))

    def _drop(self, h: int, replica_id: str) -> None:
        self._release(h, replica_id)
        mine = self._by_replica[replica_id]
        mine.discard(h)
        if not mine:
            del self._by_replica[replica_id]

    def check_invariants(self) -> None:
        """Assert the three maps agree (tests only)."""
        pairs = {(h, r) for h, rs in self._holders.items() for r in ((rs,) if isinstance(rs, str) else rs)}
        assert pairs == set(self._lru), "holders and LRU disagree"
        assert pairs == {(h, r) for r, hs in self._by_replica.items() for h in hs}, "by_replica disagrees"
        assert all(isinstance(rs, str) or len(rs) >= 2 for rs in self._holders.values()), "a set of < 2 kept"
        assert all(self._by_replica.values()), "empty set kept"
        assert len(self._lru) <= self.max_entries

