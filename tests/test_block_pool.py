"""BlockPool alone: allocation, reference counts, LRU free queue, prefix hits, eviction (vLLM V1 semantics).

Pools here have 8 blocks of 4 tokens. The free queue starts as ``[0 1 2 3 4 5 6 7]`` (head first); blocks
are handed out from the head and returned, last block first, to the tail.
"""

from __future__ import annotations

import copy

import pytest

from halffull.prefix_hash import hash_token_blocks
from halffull.replicas.engine.block_pool import BlockPool, cdiv
from halffull.replicas.engine.request import Request

BS = 4


def pool(num_blocks: int = 8, **kw) -> BlockPool:
    return BlockPool(num_blocks, BS, **kw)


def r_len(rid: str, n: int) -> Request:
    """A prompt given by length only: salted hashes, never shared with another request."""
    r = Request(rid, n, 4)
    r.extend_block_hashes(BS)
    return r


def r_ids(rid: str, token_ids: list[int]) -> Request:
    """A prompt given by token ids: chained content hashes, shared by equal prefixes."""
    return Request(rid, len(token_ids), 4, prompt_token_ids=token_ids,
                   block_hashes=hash_token_blocks(token_ids, BS))


def state(p: BlockPool):
    return (list(p.free_queue), list(p.ref_cnt), list(p.block_hash), dict(p.cached),
            copy.deepcopy(p.req_blocks), dict(p.req_num_hashed), p.num_evictions)


@pytest.mark.parametrize(
    "a,b,expected",
    [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (16, 4, 4), (17, 4, 5)],
    ids=["zero", "one", "exact", "one-over", "four-blocks", "four-plus-one"],
)
def test_cdiv(a, b, expected):
    assert cdiv(a, b) == expected


@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (8, 0), (-1, 4)], ids=["no-blocks", "zero-size", "neg"])
def test_constructor_rejects_non_positive(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockPool(num_blocks, block_size)


@pytest.mark.parametrize(
    "num_tokens,new_blocks,hashed",
    # 10 tokens: blocks [0 1 2], two full (hashed), the third holds tokens 8..9 (not hashed).
    [(1, 1, 0), (4, 1, 1), (5, 2, 1), (10, 3, 2), (12, 3, 3), (32, 8, 8)],
    ids=["1tok", "1block-full", "5tok", "10tok", "12tok", "whole-pool"],
)
def test_allocate_takes_from_head_refcounts_and_registers_full_blocks(num_tokens, new_blocks, hashed):
    p = pool()
    r = r_len("a", num_tokens)
    assert p.allocate(r, num_tokens) == new_blocks
    assert p.req_blocks["a"] == list(range(new_blocks))
    assert p.num_free_blocks == 8 - new_blocks
    assert list(p.free_queue) == list(range(new_blocks, 8))
    assert [p.ref_cnt[b] for b in range(8)] == [1] * new_blocks + [0] * (8 - new_blocks)
    assert len(p.cached) == hashed
    assert [p.block_hash[b] for b in range(hashed)] == r.block_hashes[:hashed]
    assert p.usage == pytest.approx(new_blocks / 8)
    p.check_invariants()


def test_allocate_grows_request_one_block_at_a_time():
    p = pool()
    r = r_len("a", 4)
    assert p.allocate(r, 4) == 1  # slots 0..3
    r.num_computed_tokens = 4
    assert p.allocate(r, 0) == 0  # nothing new
    assert p.allocate(r, 1) == 1  # slot 4 -> second block
    r.num_computed_tokens = 5
    assert p.allocate(r, 3) == 0  # slots 5..7 in block 1
    assert p.allocate(r, 4) == 1  # slots 5..8 -> third block
    assert p.req_blocks["a"] == [0, 1, 2]
    p.check_invariants()


def test_free_returns_blocks_in_reverse_order_to_the_tail():
    p = pool()
    a, b = r_len("a", 12), r_len("b", 8)
    p.allocate(a, 12)  # blocks 0 1 2
    p.allocate(b, 8)  # blocks 3 4
    p.free(a)
    # free queue:  head -> [5 6 7] + a's blocks last first [2 1 0] <- tail
    assert list(p.free_queue) == [5, 6, 7, 2, 1, 0]
    assert p.ref_cnt[:3] == [0, 0, 0]
    p.free(b)
    assert list(p.free_queue) == [5, 6, 7, 2, 1, 0, 4, 3]
    assert p.req_blocks == {} and p.req_num_hashed == {}
    p.check_invariants()


def test_free_of_unknown_request_is_a_no_op():
    p = pool()
    before = state(p)
    p.free(r_len("ghost", 4))
    assert state(p) == before


def test_freed_blocks_stay_cached_and_are_evicted_from_the_head():
    p = pool()
    a = r_len("a", 12)  # 3 full blocks, all hashed
    p.allocate(a, 12)
    p.free(a)  # free queue [3 4 5 6 7 2 1 0]
    assert len(p.cached) == 3 and p.num_evictions == 0
    b = r_len("b", 20)  # 5 blocks: takes 3..7, no eviction
    p.allocate(b, 20)
    assert p.req_blocks["b"] == [3, 4, 5, 6, 7] and p.num_evictions == 0
    a_hashes = a.block_hashes
    c = r_len("c", 4)  # 1 block: takes a's *last* block (2) first -> eviction
    p.allocate(c, 4)
    assert p.req_blocks["c"] == [2]
    assert p.num_evictions == 1
    assert a_hashes[2] not in p.cached and a_hashes[0] in p.cached and a_hashes[1] in p.cached
    assert p.block_hash[2] == c.block_hashes[0]  # re-registered under c's hash
    # a's first two blocks are still findable
    a.num_computed_tokens = 0
    assert p.find_cached_prefix(a) == [0, 1]
    p.check_invariants()


def test_uncached_blocks_are_reused_first_cached_ones_last():
    # vLLM's BlockPool.free_blocks: ref-0 blocks without a hash are prepended (evicted first), in free order
    p = pool()
    a = r_ids("a", list(range(10)))  # blocks 0 1 (full, hashed) and 2 (partial)
    p.allocate(a, 10)
    p.free(a)
    assert list(p.free_queue) == [2, 3, 4, 5, 6, 7, 1, 0]
    p.check_invariants()


def test_shared_prefix_blocks_have_ref_cnt_two_and_survive_one_free():
    p = pool()
    tokens = list(range(10))
    a, b = r_ids("a", tokens), r_ids("b", tokens)
    p.allocate(a, 10)  # blocks 0 1 2; 0 and 1 full and hashed
    hits = p.find_cached_prefix(b)
    assert hits == [0, 1]
    # b holds hits [0 1] and needs one new block for tokens 8..9; shared hits cost no free block
    assert p.blocks_needed(b, 10, hits) == 1
    assert p.allocate(b, 2, hits) == 1
    assert p.req_blocks["b"] == [0, 1, 3]
    assert p.ref_cnt[:4] == [2, 2, 1, 1]
    p.free(a)
    assert p.ref_cnt[:4] == [1, 1, 0, 1]
    # only a's partial block 2 came back; holding no cached content it goes to the head (vLLM: evict first)
    assert list(p.free_queue) == [2, 4, 5, 6, 7]
    p.check_invariants()
    p.free(b)
    assert p.num_free_blocks == 8
    p.check_invariants()


@pytest.mark.parametrize(
    "num_prompt,expected_hits",
    # cached: 3 full blocks of tokens 0..11. At most num_tokens-1 tokens may hit.
    [(3, 0), (4, 0), (5, 1), (8, 1), (9, 2), (12, 2), (13, 3), (16, 3)],
    ids=["3", "4", "5", "8", "9", "12", "13", "16"],
)
def test_find_cached_prefix_caps_at_num_tokens_minus_one(num_prompt, expected_hits):
    p = pool()
    p.allocate(r_ids("a", list(range(16))), 12)  # registers 3 blocks (tokens 0..11)
    b = r_ids("b", list(range(num_prompt)))
    assert len(p.find_cached_prefix(b)) == expected_hits


def test_find_cached_prefix_stops_at_first_miss():
    p = pool()
    a = r_ids("a", list(range(16)))
    p.allocate(a, 16)
    p.free(a)  # free queue [4 5 6 7 3 2 1 0]; a's blocks 0..3 cached
    for _ in range(4):  # take 4 5 6 7 (uncached), then a's block 3, then 2 ...
        p.allocate(r_len(f"x{_}", 4), 4)
    evict = r_len("y", 4)
    p.allocate(evict, 4)  # takes block 3 (a's last)
    p.allocate(r_len("z", 4), 4)  # takes block 2
    b = r_ids("b", list(range(17)))
    assert p.find_cached_prefix(b) == [0, 1]
    # hashes are chained: a different first block means no block can hit
    c = r_ids("c", [99] + list(range(1, 17)))
    assert p.find_cached_prefix(c) == []


def test_blocks_needed_counts_evictable_hits_but_not_shared_ones():
    p = pool()
    tokens = list(range(13))
    a = r_ids("a", tokens)
    p.allocate(a, 13)  # blocks 0..3, 0..2 hashed
    b = r_ids("b", tokens)
    hits = p.find_cached_prefix(b)
    assert hits == [0, 1, 2]
    # shared (ref_cnt 1): only the 4th block is new
    assert p.blocks_needed(b, 13, hits) == 1
    p.free(a)
    # evictable (ref_cnt 0): the three hits leave the free queue too
    assert p.blocks_needed(b, 13, hits) == 1 + 3
    assert p.allocate(b, 1, hits) == 4
    assert p.req_blocks["b"][:3] == [0, 1, 2]
    assert p.num_free_blocks == 4
    p.check_invariants()


def test_blocks_needed_without_hits_counts_held_blocks():
    p = pool()
    r = r_len("a", 12)
    assert p.blocks_needed(r, 12) == 3
    p.allocate(r, 5)  # 2 blocks
    assert p.blocks_needed(r, 12) == 1
    assert p.blocks_needed(r, 4) == 0  # never negative


@pytest.mark.parametrize(
    "reserve,ok",
    # 3 blocks free, the request needs 2: ok while 2 + reserve <= 3
    [(0, True), (1, True), (2, False), (5, False)],
    ids=["no-reserve", "reserve-fits-exactly", "reserve-one-over", "reserve-large"],
)
def test_allocate_reserve(reserve, ok):
    p = pool()
    p.allocate(r_len("big", 20), 20)  # 5 blocks, 3 free
    r = r_len("r", 8)
    before = state(p)
    got = p.allocate(r, 8, reserve=reserve)
    if ok:
        assert got == 2 and p.num_free_blocks == 1
    else:
        assert got is None and state(p) == before
    p.check_invariants()


@pytest.mark.parametrize(
    "scenario",
    ["no-room", "hits-evictable-no-room", "reserve"],
)
def test_failed_allocate_changes_nothing(scenario):
    p = pool()
    tokens = list(range(12))
    a = r_ids("a", tokens)
    p.allocate(a, 12)  # blocks 0 1 2, all hashed
    p.free(a)  # cached, in the free queue
    filler = r_len("f", 16)
    p.allocate(filler, 16)  # takes 3 4 5 6 from the head; 4 free: [7 2 1 0]
    b = r_ids("b", tokens + [50, 51, 52, 53, 54, 55, 56, 57, 58])  # 21 tokens -> 6 blocks
    hits = p.find_cached_prefix(b) if scenario != "no-room" else []
    before = state(p)
    if scenario == "no-room":
        got = p.allocate(b, 21)  # 6 > 4
    elif scenario == "hits-evictable-no-room":
        assert hits == [0, 1, 2]
        got = p.allocate(b, 9, hits)  # 3 new + 3 evictable hits = 6 > 4
    else:
        got = p.allocate(r_len("c", 4), 4, reserve=4)  # 1 + 4 > 4
    assert got is None
    assert state(p) == before


def test_duplicate_content_lookup_returns_the_first_copy():
    p = pool()
    tokens = list(range(8))
    a, b = r_ids("a", tokens), r_ids("b", tokens)
    p.allocate(a, 8)  # blocks 0 1 registered
    p.allocate(b, 8)  # computed without hits: blocks 2 3 hold the same content
    assert p.find_cached_prefix(r_ids("c", tokens + [99])) == [0, 1]
    p.check_invariants()


DUPLICATE_BUG = (
    "BUG: replicas/engine/block_pool.py _register_full_blocks skips a block whose hash is already cached "
    "('the first copy stays canonical, as in vLLM'), and `cached` maps a hash to one block. vLLM V1 does "
    "not de-duplicate: cached_block_hash_to_block maps hash -> {block_id: block}, every full block gets its "
    "hash, and evicting one copy (_maybe_evict_cached_block) leaves the others findable. Here, once the "
    "first copy is evicted, the duplicate that is still held or cached is lost for prefix hits."
)


def test_duplicate_copy_stays_findable_after_the_first_is_evicted():
    p = pool()
    tokens = list(range(8))
    a, b = r_ids("a", tokens), r_ids("b", tokens)
    p.allocate(a, 8)  # blocks 0 1 (first copy)
    p.allocate(b, 8)  # blocks 2 3 (same content)
    p.free(a)  # free queue [4 5 6 7 1 0]
    for i in range(6):  # take 4 5 6 7, then a's 1 and 0: the first copy is evicted
        p.allocate(r_len(f"x{i}", 4), 4)
    assert p.num_evictions == 2
    assert p.find_cached_prefix(r_ids("c", tokens + [99])) == [2, 3]


def test_prefix_caching_disabled_never_hits_or_registers():
    p = pool(enable_prefix_caching=False)
    tokens = list(range(12))
    p.allocate(r_ids("a", tokens), 12)
    assert p.cached == {}
    assert p.find_cached_prefix(r_ids("b", tokens)) == []


def test_num_blocks_of():
    p = pool()
    r = r_len("a", 9)
    assert p.num_blocks_of(r) == 0
    p.allocate(r, 9)
    assert p.num_blocks_of(r) == 3


def test_cache_blocks_registers_full_blocks_up_to_num_tokens():
    p = pool()
    r = Request("a", 10, 4)  # by length: no hashes until the engine asks (at preemption)
    p.allocate(r, 10)  # 3 blocks, nothing registered
    assert p.cached == {}
    r.extend_block_hashes(BS, 9)  # hashes for the 2 full blocks among the first 9 tokens
    p.cache_blocks(r, 9)
    assert p.cached == {r.block_hashes[0]: 0, r.block_hashes[1]: 1}
    p.cache_blocks(r, 9)  # idempotent
    assert len(p.cached) == 2
    p.free(r)
    r.num_computed_tokens = 0
    r.num_output_tokens = 1  # 11 tokens: cap 10 -> 2 blocks
    assert p.find_cached_prefix(r) == [0, 1]
    p.check_invariants()


def test_cache_blocks_of_a_request_without_blocks_is_a_no_op():
    p = pool()
    before = state(p)
    p.cache_blocks(r_len("ghost", 8), 8)
    assert state(p) == before


def test_take_free_block_appends_the_head_block():
    p = pool()
    r = r_len("a", 4)
    p.allocate(r, 4)  # block 0
    p.take_free_block(r)
    assert p.req_blocks["a"] == [0, 1] and p.ref_cnt[1] == 1 and p.num_free_blocks == 6
    p.check_invariants()
