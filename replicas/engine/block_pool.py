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

The pool never knows about policies; invariants are checked by ``check_invariants`` (tests).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from replicas.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # OrderedDict, not dict: popping a plain dict's first key is O(n) once keys were deleted.
        # The first key is the LRU head. Values unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> the block a lookup returns
        # Further blocks holding the same content (a request computing its own copy, e.g. past the hit cap).
        # As in vLLM they stay findable: when the returned copy is evicted, another one takes its place.
        self.duplicates: dict[int, list[int]] = {}
        self.req_blocks: dict[str, list[int]] = {}
        self.req_num_hashed: dict[str, int] = {}  # leading blocks of the request already registered
        self.num_evictions = 0

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def num_blocks_of(self, request: Request) -> int:
        return len(self.req_blocks.get(request.request_id, ()))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Longest run of cached blocks matching the request's leading hashes.

        At most ``num_tokens - 1`` tokens may hit: the last token must be computed to sample from it.
        """
        if not self.enable_prefix_caching:
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
        have = len(self.req_blocks.get(request.request_id, ())) + len(hit_blocks)
        new = max(cdiv(num_tokens, self.block_size) - have, 0)
        ref = self.ref_cnt
        return new + sum(1 for b in hit_blocks if ref[b] == 0)

    # ---- mutation ------------------------------------------------------------------------------------
    def allocate(
        self,
        request: Request,
        num_new_tokens: int,
        hit_blocks: Sequence[int] = (),
        *,
        reserve: int = 0,
    ) -> int | None:
        """Slots for the request's computed tokens, its hits and ``num_new_tokens`` more.

        Returns the number of blocks newly taken from the free queue, or None (nothing changed) when that
        would leave fewer than ``reserve`` free blocks.
        """
        bs = self.block_size
        num_computed = request.num_computed_tokens + len(hit_blocks) * bs
        total = num_computed + num_new_tokens
        if not hit_blocks:
            # Fast path (most decode steps): the request's last block still has room.
            held = self.req_blocks.get(request.request_id)
            if held is not None and total <= len(held) * bs:
                if reserve > len(self.free_queue):
                    return None
                self._register_full_blocks(request, min(total, request.num_tokens))
                return 0
        needed = self.blocks_needed(request, total, hit_blocks)
        if needed + reserve > len(self.free_queue):
            return None
        blocks = self.req_blocks.setdefault(request.request_id, [])
        if hit_blocks:
            # Hits only happen at admission, on a request holding no blocks; they are registered already.
            self._touch(hit_blocks, blocks)
            self.req_num_hashed[request.request_id] = len(hit_blocks)
        self._take(blocks, cdiv(total, bs) - len(blocks))
        self._register_full_blocks(request, min(total, request.num_tokens))
        return needed

    def take_free_block(self, request: Request) -> None:
        """Append one block from the free queue to the request (the caller has checked it is there)."""
        self._take(self.req_blocks[request.request_id], 1)

    def _take(self, blocks: list[int], n: int) -> None:
        """Move ``n`` blocks from the free queue's head to ``blocks`` (the hot loop of prompt allocation)."""
        popitem, block_hash, ref = self.free_queue.popitem, self.block_hash, self.ref_cnt
        append = blocks.append
        for _ in range(n):
            blk = popitem(False)[0]
            if block_hash[blk] is not None:
                self._evict(blk)
            ref[blk] = 1
            append(blk)

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
        if not blocks:
            return
        ref, free_queue, block_hash = self.ref_cnt, self.free_queue, self.block_hash
        evict_first = []
        for blk in reversed(blocks):
            ref[blk] -= 1
            if ref[blk] == 0:
                if block_hash[blk] is None:
                    evict_first.append(blk)
                else:
                    free_queue[blk] = None
        for blk in reversed(evict_first):
            free_queue[blk] = None
            free_queue.move_to_end(blk, last=False)

    # ---- internals -----------------------------------------------------------------------------------
    def _touch(self, hit_blocks: Sequence[int], blocks: list[int]) -> None:
        ref, free_queue = self.ref_cnt, self.free_queue
        for blk in hit_blocks:
            if ref[blk] == 0:
                del free_queue[blk]
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
        for j in range(start, end):
            h = hashes[j]
            blk = blocks[j]
            # A block reached through a hit is registered already.
            if block_hash[blk] is None:
                block_hash[blk] = h
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
        for blk in range(self.num_blocks):
            assert self.ref_cnt[blk] == owned.get(blk, 0), f"block {blk}: ref_cnt {self.ref_cnt[blk]}"
            assert (blk in self.free_queue) == (self.ref_cnt[blk] == 0), f"block {blk}: free state"
        assert len(self.free_queue) + len(owned) == self.num_blocks, "blocks not conserved"
        for h, blk in self.cached.items():
            assert self.block_hash[blk] == h, f"cached hash {h} points at block {blk} with another hash"
        for h, copies in self.duplicates.items():
            assert h in self.cached and copies, f"duplicates of {h} without a returned copy"
            assert all(self.block_hash[b] == h for b in copies), f"duplicate of {h} holds another hash"
        hashed = sum(1 for h in self.block_hash if h is not None)
        assert hashed == len(self.cached) + sum(map(len, self.duplicates.values())), "hashed blocks not indexed"
