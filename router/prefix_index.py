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
replica is one dict insertion, so it stays cheap with many replicas holding a shared prefix. ``insert`` is
amortised O(1) per block; ``remove_replica`` scans every pair (a replica leaving the set is rare).

Memory: the bound is reached in a long-running ingress (a soak of distinct ~1.6k-token prompts adds ~25 pairs
per request), so a pair is kept small: about 165 bytes with its hash int, the full index of 65,536 pairs ~11 MB
(a tuple-keyed ``OrderedDict`` plus per-replica sets took ~255 bytes; ``halffull bench router`` measures it):

* ``_holders``: hash -> the replica holding it, or a set only when several replicas do (distinct prompts are
  the common case).
* ``_count``: one int per pair, ``hash << SLOT_BITS | slot`` (``slot``: a small number for the replica id,
  recycled when the replica holds nothing), mapped to how many times the pair occurs in ``_order``.
* ``_order``: pair keys in insertion order, one more occurrence per refresh instead of a move. The least
  recently inserted pair is found by popping from the left: an occurrence whose count stays above zero has a
  later one (a refresh) and is skipped. Stale occurrences are squeezed out when they outnumber the pairs, so
  each insertion costs amortised O(1) and ``_order`` holds at most about twice the pairs.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

SLOT_BITS = 20  # a pair key is hash << SLOT_BITS | slot: up to 2**20 replicas at once in one index
_SLOT_MASK = (1 << SLOT_BITS) - 1


class PrefixIndex:
    """Maps prefix block hash -> replicas that were sent that prefix; bounded with LRU eviction."""

    __slots__ = ("max_entries", "_holders", "_count", "_order", "_slot", "_names", "_held", "_free")

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._holders: dict[int, str | set[str]] = {}  # hash -> the replica holding it, or a set of >= 2
        self._count: dict[int, int] = {}  # pair key -> its occurrences in _order (see "Memory")
        self._order: deque[int] = deque()  # pair keys, oldest first, with stale occurrences
        self._slot: dict[str, int] = {}  # replica id -> slot, for replicas holding >= 1 pair
        self._names: list[str | None] = []  # slot -> replica id
        self._held: list[int] = []  # slot -> pairs held
        self._free: list[int] = []  # slots to reuse

    def __len__(self) -> int:
        """Number of (hash, replica) pairs held."""
        return len(self._count)

    def __contains__(self, pair: tuple[int, str]) -> bool:
        h, replica_id = pair
        slot = self._slot.get(replica_id)
        return slot is not None and (h << SLOT_BITS | slot) in self._count

    def replicas(self) -> set[str]:
        """Replicas that hold at least one entry."""
        return set(self._slot)

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
        slot = self._slot.get(replica_id)
        if slot is None:
            slot = self._new_slot(replica_id)
        holders, count, order = self._holders, self._count, self._order
        added = 0
        for h in reversed(prefix_hashes):  # deepest first so the shared head is the most recent
            key = h << SLOT_BITS | slot
            order.append(key)
            n = count.get(key)
            if n is not None:  # a refresh: this occurrence is now the pair's latest
                count[key] = n + 1
                continue
            count[key] = 1
            added += 1
            owners = holders.get(h)
            if owners is None:
                holders[h] = replica_id
            elif owners.__class__ is str:  # a second holder (not replica_id: the pair was new)
                holders[h] = {owners, replica_id}
            else:
                owners.add(replica_id)
        self._held[slot] += added
        while len(count) > self.max_entries:
            self._evict_oldest()
        if len(order) > 2 * len(count) + 64:
            self._squeeze()

    def remove_replica(self, replica_id: str) -> None:
        """Forget everything sent to ``replica_id`` (it left the candidate set or lost its cache)."""
        slot = self._slot.get(replica_id)
        if slot is None:
            return
        count = self._count
        mine = [key for key in count if key & _SLOT_MASK == slot]
        for key in mine:
            del count[key]
            self._release(key >> SLOT_BITS, replica_id)
        # Its occurrences go too: the slot is reused, and an old occurrence must not count for a new pair.
        self._order = deque(key for key in self._order if key & _SLOT_MASK != slot)
        self._held[slot] = 0
        self._free_slot(slot)

    def pairs(self) -> list[tuple[int, str]]:
        """(hash, replica) pairs, least recently inserted first."""
        latest: dict[int, None] = {}
        for key in reversed(self._order):  # a pair's latest occurrence is the first seen from the right
            latest.setdefault(key)
        names = self._names
        return [(key >> SLOT_BITS, names[key & _SLOT_MASK]) for key in reversed(latest)]

    def clear(self) -> None:
        self._holders.clear()
        self._count.clear()
        self._order.clear()
        self._slot.clear()
        self._names.clear()
        self._held.clear()
        self._free.clear()

    def _new_slot(self, replica_id: str) -> int:
        if self._free:
            slot = self._free.pop()
            self._names[slot] = replica_id
        else:
            slot = len(self._names)
            if slot > _SLOT_MASK:
                raise OverflowError(f"more than {_SLOT_MASK + 1} replicas hold prefixes in one index")
            self._names.append(replica_id)
            self._held.append(0)
        self._slot[replica_id] = slot
        return slot

    def _free_slot(self, slot: int) -> None:
        del self._slot[self._names[slot]]
        self._names[slot] = None
        self._free.append(slot)

    def _evict_oldest(self) -> None:
        count, order = self._count, self._order
        while True:
            key = order.popleft()
            n = count[key] - 1
            if n:  # a refresh came later: not this pair's latest occurrence
                count[key] = n
                continue
            del count[key]
            slot = key & _SLOT_MASK
            self._release(key >> SLOT_BITS, self._names[slot])
            self._held[slot] -= 1
            if not self._held[slot]:  # every occurrence of the slot is gone: it may be reused
                self._free_slot(slot)
            return

    def _squeeze(self) -> None:
        """Drop stale occurrences from ``_order``, keeping each pair's latest (every count becomes 1)."""
        count = self._count
        kept: deque[int] = deque()
        for key in self._order:
            n = count[key]
            if n == 1:
                kept.append(key)
            else:
                count[key] = n - 1
        self._order = kept

    def _release(self, h: int, replica_id: str) -> None:
        """``replica_id`` no longer holds ``h`` in ``_holders`` (back to the one-holder form at one left)."""
        owners = self._holders[h]
        if owners.__class__ is str:
            del self._holders[h]
            return
        owners.discard(replica_id)
        if len(owners) == 1:
            self._holders[h] = next(iter(owners))

    def check_invariants(self) -> None:
        """Assert the maps agree (tests only)."""
        names = self._names
        pairs = {(h, r) for h, rs in self._holders.items() for r in ((rs,) if isinstance(rs, str) else rs)}
        assert pairs == {(k >> SLOT_BITS, names[k & _SLOT_MASK]) for k in self._count}, "holders and pairs disagree"
        assert all(isinstance(rs, str) or len(rs) >= 2 for rs in self._holders.values()), "a set of < 2 kept"
        assert sum(self._count.values()) == len(self._order), "occurrence counts and order disagree"
        assert set(self._order) == set(self._count), "an occurrence of a pair not held"
        for replica_id, slot in self._slot.items():
            assert names[slot] == replica_id, "slot table disagrees"
            assert self._held[slot] == sum(1 for k in self._count if k & _SLOT_MASK == slot) > 0, "held count"
        assert all(names[slot] is None for slot in self._free), "a free slot still named"
        assert len(self._count) <= self.max_entries
