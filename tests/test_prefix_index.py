"""PrefixIndex: longest match per replica, LRU bound, refresh, remove_replica, read-only match."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.router.prefix_index import PrefixIndex


def index_with(*sent: tuple[tuple[int, ...], str], max_entries: int = 1000) -> PrefixIndex:
    """An index after routing each (prefix_hashes, replica) in order."""
    index = PrefixIndex(max_entries)
    for hashes, replica in sent:
        index.insert(hashes, replica)
    return index


@pytest.mark.parametrize(
    ("sent", "query", "expected"),
    [
        pytest.param([], (1, 2, 3), {}, id="empty-index"),
        pytest.param([((1, 2, 3), "a")], (), {}, id="empty-query"),
        pytest.param([((1, 2, 3), "a")], (1, 2, 3), {"a": 3}, id="full-match"),
        pytest.param([((1, 2, 3), "a")], (1, 2, 9), {"a": 2}, id="diverges-at-3"),
        pytest.param([((1, 2, 3), "a")], (1, 2, 3, 4, 5), {"a": 3}, id="query-longer"),
        pytest.param([((1, 2, 3), "a")], (7, 8), {}, id="no-match"),
        pytest.param(
            [((1, 2, 3, 4), "a"), ((1, 2), "b"), ((1,), "c")],
            (1, 2, 3, 4),
            {"a": 4, "b": 2, "c": 1},
            id="longest-per-replica",
        ),
        pytest.param(
            [((1,), "a"), ((1, 2, 3), "a")], (1, 2, 3), {"a": 3}, id="same-replica-longest-wins"
        ),
        pytest.param([((1, 2, 3), "a"), ((1, 2, 3), "b")], (1, 2), {"a": 2, "b": 2}, id="two-holders"),
    ],
)
def test_match_longest_prefix_per_replica(sent, query, expected):
    assert index_with(*sent).match(query) == expected


def test_match_counts_deepest_hash_without_contiguity():
    # Chained hashes: holding hash k means the replica was sent blocks 0..k, even if the entry for a
    # shallower block was evicted.
    index = index_with(((1, 2, 3), "a"), ((2, 3), "a"), ((7,), "b"), max_entries=3)
    # (2, 3) refreshed blocks 1 and 2, so inserting for b evicted only the head, (1, "a")
    assert (1, "a") not in index and (2, "a") in index and (3, "a") in index
    assert index.match((1, 2, 3)) == {"a": 3}


def test_lru_bound_evicts_oldest_pairs():
    index = index_with(((1, 2), "a"), ((3, 4), "b"), max_entries=3)
    assert len(index) == 3
    # insert order was (2,a), (1,a), (4,b), (3,b): the oldest (2, "a") went first
    assert (2, "a") not in index
    assert index.match((1, 2)) == {"a": 1}
    assert index.match((3, 4)) == {"b": 2}
    index.check_invariants()


def test_insert_deepest_first_so_shared_head_survives_eviction():
    index = index_with(((1, 2, 3, 4), "a"), max_entries=2)
    assert index.pairs() == [(2, "a"), (1, "a")]
    assert index.match((1, 9)) == {"a": 1}


def test_reinsert_refreshes_recency():
    index = index_with(((1,), "a"), ((2,), "b"), max_entries=2)
    index.insert((1,), "a")  # refresh: (2, b) is now the oldest
    index.insert((3,), "c")
    assert index.match((1,)) == {"a": 1}
    assert index.match((2,)) == {}
    assert index.match((3,)) == {"c": 1}
    index.check_invariants()


def test_match_is_read_only():
    index = index_with(((1, 2), "a"), ((3,), "b"), max_entries=3)
    before = index.pairs()
    index.match((1, 2))
    assert index.pairs() == before


def test_remove_replica_forgets_only_that_replica():
    index = index_with(((1, 2, 3), "a"), ((1, 2), "b"))
    index.remove_replica("a")
    assert index.match((1, 2, 3)) == {"b": 2}
    assert index.replicas() == {"b"}
    assert len(index) == 2
    index.remove_replica("a")  # idempotent
    index.remove_replica("never-seen")
    index.check_invariants()


def test_empty_insert_is_a_no_op():
    index = index_with(((), "a"))
    assert len(index) == 0 and index.replicas() == set()
    index.check_invariants()


def test_max_entries_must_be_positive():
    with pytest.raises(ValueError, match="max_entries"):
        PrefixIndex(0)


# Small hashes (so prefixes meet) and the extremes of the 64-bit hashes (a pair key packs hash and replica slot).
HASHES = st.one_of(st.integers(0, 12), st.sampled_from([-1, -(2**63), 2**63 - 1]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.lists(HASHES, max_size=6), st.sampled_from("abcd")),
        st.tuples(st.just("remove"), st.just([]), st.sampled_from("abcd")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, max_entries=st.integers(1, 10))
def test_invariants_and_bound_hold_under_any_sequence(ops, max_entries):
    index = PrefixIndex(max_entries)
    reference: OrderedDict[tuple[int, str], None] = OrderedDict()  # the spec: pairs, least recently inserted first
    for op, hashes, replica in ops:
        if op == "insert":
            index.insert(tuple(hashes), replica)
            for h in reversed(hashes):
                reference[(h, replica)] = None
                reference.move_to_end((h, replica))
            while len(reference) > max_entries:
                reference.popitem(last=False)
        else:
            index.remove_replica(replica)
            for pair in [p for p in reference if p[1] == replica]:
                del reference[pair]
        index.check_invariants()
        assert index.pairs() == list(reference)
        assert index.replicas() == {r for _, r in reference}
    # match agrees with a brute-force reading of the pairs
    query = tuple(range(13))
    pairs = set(index.pairs())
    expected = {}
    for depth in range(len(query), 0, -1):
        for _, replica in {p for p in pairs if p[0] == query[depth - 1]}:
            expected.setdefault(replica, depth)
    assert index.match(query) == expected


def test_refreshing_the_same_prefix_keeps_the_order_bounded():
    index = index_with(*[((1, 2, 3), "a")] * 1000, ((9,), "b"))
    index.check_invariants()
    assert len(index._order) <= 2 * len(index) + 64  # stale occurrences were squeezed out
    assert index.pairs() == [(3, "a"), (2, "a"), (1, "a"), (9, "b")]


def test_a_reused_slot_does_not_inherit_the_old_replicas_pairs():
    index = index_with(((1, 2), "a"), ((3,), "b"), max_entries=3)
    index.remove_replica("a")
    index.insert((1, 2), "c")  # c takes a's slot
    index.insert((4,), "b")  # evicts the oldest pair: (3, "b"), not one of c's
    index.check_invariants()
    assert index.pairs() == [(2, "c"), (1, "c"), (4, "b")]

