"""Paged KV cache: a fixed pool of blocks with reference counts and prefix caching (vLLM V1 semantics).

::

    request A  [b3][b7][b1]         block table: KV of tokens 0..3*block_size-1
    request B  [b3][b9]             shares b3 (same first block hash), ref_cnt(b3) = 2
    free queue  head -> [b4][b0][b8] ... [b2] <- tail     LRU: evict from the head, free to the tail

* ``allocate(request, num_new_tokens, hit_blocks)`` gives the request slots for ``num_computed + hits +
  num_new`` tokens, or returns None when the free queue cannot supply the blocks: the *scheduler* decides
  what to preempt. Hit blocks with ref_cnt 0 sit in the free queue, so touching them consumes free capacity
  (counted as vLLM does).
* After allocation, every block that is full of tokens the request has (computed or being computed this
  step) is registered under its chained hash. A freed block keeps its hash and stays findable until the
  free queue hands it out again (eviction).
* ``free(request)`` releases blocks in reverse order, so a request's tail blocks are evicted first; blocks
  holding no cached content go to the head of the free queue, as in vLLM.
* ``free_finished(request, num_tokens)`` is what a finished request's release means (its full blocks
  registered, then ``free``), without hashing what nobody can look up again (below).

How the free queue is stored (the pool's hot path is handing out and taking back hundreds of blocks per
request, so it works on runs of blocks rather than one block at a time)::

    head -> [ empty blocks (a stack) ][ LRU: block, block, Run[b b b b], block, Run[b b] ... ] <- tail

* A block holding no content is always ahead of every block holding some: freeing puts the former at the
  head and the latter at the tail, and a free block's content changes only when it is handed out. So the
  empty blocks form a stack (``_empty``, top = queue head) in front of the LRU part.
* The LRU part (``_lru``, an ordered dict) holds block ids with a registered hash, which a prefix
  hit may pull out from the middle, and ``_Run``s: the private blocks of a finished request. Those blocks
  would be registered under the request's salted private hashes (request.py), which only that request can
  ever look up; once it is gone they are content nobody can find, so they are kept unhashed, as one
  entry, in the place their registration would put them, and handing them out later counts as the
  evictions it would be. (Exact as long as no two requests' salts, crc32 of their ids, collide: the
  traces' ``t{i}`` ids do not.)

Reference counts are kept for blocks that hold a hash, the only ones that can be shared; a block without a
hash belongs to exactly one request, or is free. ``ref_cnt``, ``free_queue`` and ``check_invariants`` give
the per-block view (tests).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from halffull.replicas.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Run:
    """Free blocks of a finished request, in queue order: content nobody can look up (module docstring)."""

    __slots__ = ("blocks",)

    def __init__(self, blocks: list[int]):
        self.blocks = blocks


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_hash: list[int | None] = [None] * num_blocks
        self._ref = [0] * num_blocks  # holders, for blocks holding a hash
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))  # free, no content; top = queue head
        # Free, with content; oldest first. OrderedDict, not dict: finding a plain dict's first key gets slow
        # once many keys were deleted from its front.
        self._lru: OrderedDict[int | _Run, None] = OrderedDict()
        self.num_free_blocks = num_blocks  # read-only outside
        self.cached: dict[int, int] = {}  # block hash -> the block a lookup returns
        # Further blocks holding the same content (a request computing its own copy, e.g. past the hit cap).
        # As in vLLM they stay findable: when the returned copy is evicted, another one takes its place.
        self.duplicates: dict[int, list[int]] = {}
        self.req_blocks: dict[str, list[int]] = {}
        self.req_num_hashed: dict[str, int] = {}  # leading blocks of the request already registered
        self.num_evictions = 0

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def free_queue(self) -> list[int]:
        """The free blocks in eviction order, head first (a copy)."""
        out = self._empty[::-1]
        for entry in self._lru:
            if isinstance(entry, _Run):
                out.extend(entry.blocks)
            else:
                out.append(entry)
        return out

    @property
    def ref_cnt(self) -> list[int]:
        """Holders of every block (a copy, derived from the block tables)."""
        counts = [0] * self.num_blocks
        for blocks in self.req_blocks.values():
            for blk in blocks:
                counts[blk] += 1
        return counts

    def num_blocks_of(self, request: Request) -> int:
        return len(self.req_blocks.get(request.request_id, ()))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Longest run of cached blocks matching the request's leading hashes.

        At most ``num_tokens - 1`` tokens may hit: the last token must be computed to sample from it.
        """
        if not self.enable_prefix_caching or not request.block_hashes:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        cached = self.cached
        for h in request.block_hashes[:max_blocks]:
            blk = cached.get(h)
            if blk is None:
                break
            hits.append(blk)
        return hits

    def blocks_needed(self, request: Request, num_tokens: int, hit_blocks: Sequence[int] = ()) -> int:
        """Free blocks consumed if the request is to hold slots for ``num_tokens`` tokens."""
        return self.blocks_needed_each(request, (num_tokens,), hit_blocks)[0]

    def blocks_needed_each(self, request: Request, token_counts: Sequence[int],
                           hit_blocks: Sequence[int] = ()) -> list[int]:
        """``blocks_needed`` for each of several token counts (an admission asks three at once)."""
        have = len(self.req_blocks.get(request.request_id, ())) + len(hit_blocks)
        evictable = 0
        if hit_blocks:
            ref = self._ref
            evictable = sum(1 for b in hit_blocks if ref[b] == 0)
        bs = self.block_size
        out = []
        for num_tokens in token_counts:
            new = -(-num_tokens // bs) - have  # cdiv
            out.append((new if new > 0 else 0) + evictable)
        return out

    # ---- mutation ------------------------------------------------------------------------------------
    def allocate(
        self,
        request: Request,
        num_new_tokens: int,
        hit_blocks: Sequence[int] = (),
        *,
        reserve: int = 0,
        needed: int | None = None,
    ) -> int | None:
        """Slots for the request's computed tokens, its hits and ``num_new_tokens`` more.

        Returns the number of blocks newly taken from the free queue, or None (nothing changed) when that
        would leave fewer than ``reserve`` free blocks. ``needed``: ``blocks_needed`` of exactly this
        allocation, when the caller has it already.
        """
        bs = self.block_size
        num_computed = request.num_computed_tokens + len(hit_blocks) * bs
        total = num_computed + num_new_tokens
        if not hit_blocks:
            # Fast path (most decode steps): the request's last block still has room.
            held = self.req_blocks.get(request.request_id)
            if held is not None and total <= len(held) * bs:
                if reserve > self.num_free_blocks:
                    return None
                if request.block_hashes:  # else there is nothing to register
                    self._register_full_blocks(request, min(total, request.num_tokens))
                return 0
        if needed is None:
            needed = self.blocks_needed(request, total, hit_blocks)
        if needed + reserve > self.num_free_blocks:
            return None
        blocks = self.req_blocks.get(request.request_id)
        if blocks is None and not hit_blocks:  # a first allocation: the taken list becomes the table
            blocks = self.req_blocks[request.request_id] = self.take(cdiv(total, bs))
            if request.block_hashes:
                self._register_full_blocks(request, min(total, request.num_tokens))
            return needed
        if blocks is None:
            blocks = self.req_blocks[request.request_id] = []
        if hit_blocks:
            # Hits only happen at admission, on a request holding no blocks; they are registered already.
            self._touch(hit_blocks, blocks)
            self.req_num_hashed[request.request_id] = len(hit_blocks)
        blocks += self.take(cdiv(total, bs) - len(blocks))
        if request.block_hashes:  # else there is nothing to register
            self._register_full_blocks(request, min(total, request.num_tokens))
        return needed

    def take_free_block(self, request: Request) -> None:
        """Append one block from the free queue to the request (the caller has checked it is there)."""
        self.req_blocks[request.request_id] += self.take(1)

    def take(self, n: int) -> list[int]:
        """Remove ``n`` blocks from the free queue's head (the caller has checked they are there); their
        cached content, if any, is evicted. Returned in queue order, in a list that is the caller's (it may be
        a free run's own list, handed over); the caller hands them to requests."""
        if n <= 0:
            return []
        self.num_free_blocks -= n
        empty = self._empty
        num_empty = len(empty)
        if n <= num_empty:  # blocks that never held anything, or held nothing cached
            out = empty[-n:]
            del empty[-n:]
            out.reverse()
            return out
        if num_empty:
            out = empty[::-1]
            empty.clear()
            n -= num_empty
        else:  # the usual case under load: every free block holds content
            out = []
        # Then the LRU part's head, evicting what it holds. A run's list is handed over whole when that
        # copies fewer block ids than copying the run's blocks out (ids are objects: copies cost refcounts).
        lru = self._lru
        while n > 0:
            entry = next(iter(lru))
            if type(entry) is _Run:
                blocks = entry.blocks
                size = len(blocks)
                if size <= n:
                    del lru[entry]
                    if len(out) < size:  # the run is gone: its list is nobody else's
                        blocks[:0] = out
                        out = blocks
                    else:
                        out += blocks
                    n -= size
                    self.num_evictions += size
                else:  # take the run's first n blocks; the rest keeps its place at the head
                    if len(out) + size - n < n:
                        entry.blocks = blocks[n:]
                        del blocks[n:]
                        blocks[:0] = out
                        out = blocks
                    else:
                        if out:
                            out += blocks[:n]
                        else:
                            out = blocks[:n]
                        del blocks[:n]
                    self.num_evictions += n
                    return out
            else:
                del lru[entry]
                self._evict(entry)
                out.append(entry)
                n -= 1
        return out

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's full blocks among its first ``num_tokens`` tokens under their hashes."""
        if request.request_id in self.req_blocks:
            self._register_full_blocks(request, num_tokens)

    def free(self, request: Request) -> None:
        """Return the request's blocks, tail first; cached ones stay findable until evicted.

        As vLLM's ``BlockPool.free_blocks``: blocks holding no cached content go to the head of the free
        queue (reused first), cached ones to the tail (LRU).
        """
        blocks = self.req_blocks.pop(request.request_id, None)
        self.req_num_hashed.pop(request.request_id, None)
        if blocks:
            self._release(blocks)

    def free_finished(self, request: Request, num_tokens: int) -> None:
        """Release a request that is gone for good, as registering its full blocks among its first
        ``num_tokens`` tokens and then ``free`` would, without hashing its private blocks.

        Its full blocks past the registered ones would be registered under private hashes only it could
        look up; they go to the tail as one ``_Run`` (module docstring). Falls back to the per-block way
        when the request has hashes not registered yet (they might be shareable).
        """
        rid = request.request_id
        blocks = self.req_blocks.get(rid)
        num_hashed = self.req_num_hashed.get(rid, 0)
        full = num_tokens // self.block_size if blocks else 0
        if blocks and full > len(blocks):  # (min(), without the builtin's call cost: once per finish)
            full = len(blocks)
        if not self.enable_prefix_caching or len(request.block_hashes) > num_hashed or full <= num_hashed:
            request.extend_block_hashes(self.block_size, num_tokens)
            self.cache_blocks(request, num_tokens)
            self.free(request)
            return
        del self.req_blocks[rid]
        self.req_num_hashed.pop(rid, None)
        # Tail first, as free() walks: the partial last block (no content) to the head, the private full
        # blocks to the tail as one run, then the registered ones. (The request's table, nobody else's now,
        # becomes the run.)
        if full < len(blocks):
            self._empty += blocks[full:]
            self.num_free_blocks += len(blocks) - full
            del blocks[full:]
        hashed = blocks[:num_hashed]
        del blocks[:num_hashed]
        blocks.reverse()
        self._lru[_Run(blocks)] = None
        self.num_free_blocks += len(blocks)
        if hashed:
            self._release(hashed)

    def _release(self, blocks: list[int]) -> None:
        ref, lru, block_hash = self._ref, self._lru, self.block_hash
        evict_first = []
        for blk in reversed(blocks):
            if block_hash[blk] is None:
                evict_first.append(blk)
                continue
            ref[blk] -= 1
            if ref[blk] == 0:
                lru[blk] = None
                self.num_free_blocks += 1
        # vLLM prepends them one by one in block order: the last one ends up at the head.
        evict_first.reverse()
        self._empty += evict_first
        self.num_free_blocks += len(evict_first)

    # ---- internals -----------------------------------------------------------------------------------
    def _touch(self, hit_blocks: Sequence[int], blocks: list[int]) -> None:
        ref, lru = self._ref, self._lru
        for blk in hit_blocks:
            if ref[blk] == 0:
                del lru[blk]
                self.num_free_blocks -= 1
            ref[blk] += 1
            blocks.append(blk)

    def _evict(self, blk: int) -> None:
        """The free block is handed out again: its cached content is gone."""
        h = self.block_hash[blk]
        self.block_hash[blk] = None
        self._forget(h, blk)
        self.num_evictions += 1

    def _forget(self, h: int, blk: int) -> None:
        copies = self.duplicates.get(h)
        if self.cached.get(h) == blk:
            if copies:
                self.cached[h] = copies.pop()
            else:
                del self.cached[h]
        elif copies:
            copies.remove(blk)
        if copies is not None and not copies:
            del self.duplicates[h]

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        start = self.req_num_hashed.get(rid, 0)
        if end <= start:
            return
        blocks, hashes, cached, block_hash = self.req_blocks[rid], request.block_hashes, self.cached, self.block_hash
        ref = self._ref
        for j in range(start, end):
            h = hashes[j]
            blk = blocks[j]
            # A block reached through a hit is registered already.
            if block_hash[blk] is None:
                block_hash[blk] = h
                ref[blk] = 1  # from now on it can be shared: count its holders
                if h in cached:
                    self.duplicates.setdefault(h, []).append(blk)
                else:
                    cached[h] = blk
        self.req_num_hashed[rid] = end

    # ---- test support --------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError when the pool's bookkeeping is inconsistent."""
        owned: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            assert len(set(blocks)) == len(blocks), "a request holds a block twice"
            for blk in blocks:
                owned[blk] = owned.get(blk, 0) + 1
        queue = self.free_queue
        free = set(queue)
        assert len(free) == len(queue), "a block is in the free queue twice"
        assert len(queue) == self.num_free_blocks, "free count out of date"
        assert not free & owned.keys(), "a held block is in the free queue"
        assert len(free) + len(owned) == self.num_blocks, "blocks not conserved"
        for blk in self._empty:
            assert self.block_hash[blk] is None, f"block {blk} holds a hash among the empty ones"
        for entry in self._lru:
            if isinstance(entry, _Run):
                assert entry.blocks and all(self.block_hash[b] is None for b in entry.blocks), "bad run"
            else:
                assert self.block_hash[entry] is not None, f"block {entry}: unhashed in the LRU part"
        for blk, h in enumerate(self.block_hash):
            if h is not None:
                assert self._ref[blk] == owned.get(blk, 0), f"block {blk}: ref_cnt {self._ref[blk]}"
            else:
                assert owned.get(blk, 0) <= 1, f"unhashed block {blk} is shared"
        for h, blk in self.cached.items():
            assert self.block_hash[blk] == h, f"cached hash {h} points at block {blk} with another hash"
        for h, copies in self.duplicates.items():
            assert h in self.cached and copies, f"duplicates of {h} without a returned copy"
            assert all(self.block_hash[b] == h for b in copies), f"duplicate of {h} holds another hash"
        hashed = sum(1 for h in self.block_hash if h is not None)
        assert hashed == len(self.cached) + sum(map(len, self.duplicates.values())), "hashed blocks not indexed"
