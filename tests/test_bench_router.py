"""halffull bench router (loadtest/bench/router.py) on a tiny workload: every row and figure it prints exists.
Its numbers are measurements (the README quotes them); only their shape is checked here."""

from __future__ import annotations

from halffull.loadtest.bench import router as bench
from halffull.router.registry import POLICY_NAMES


def test_one_row_per_policy_and_replica_count():
    rows = bench.run((4, 16), calls=20, repeats=1, warm_requests=20)
    assert {(r["policy"], r["replicas"]) for r in rows} == {(p, n) for p in POLICY_NAMES for n in (4, 16)}
    assert all(r["us_per_call"] > 0 and r["cpu_us_per_call"] >= 0 for r in rows)
    assert {r["policy"] for r in rows if r["index_entries"]} == {"prefix_aware", "sal"}
    table = bench.format_table(rows).splitlines()
    assert table[0].split() == ["policy", "n=4", "n=16"] and len(table) == 1 + len(POLICY_NAMES)


def test_the_index_footprint_fills_the_index_to_its_bound():
    full = bench.index_footprint(max_entries=500, blocks=7)
    assert full["pairs"] == 500
    assert full["bytes_per_pair"] > 36  # at least the hash int itself
    assert full["insert_us_per_pair"] > 0


def test_the_whole_decision_runs_alone_and_with_peers():
    assert bench.decision(n=8, calls=700, peers=False) > 0
    assert bench.decision(n=8, calls=700, peers=True) > 0
