"""Serving metrics (loadtest/sim/metrics.py): one definition of TTFT/TPOT/E2E, goodput and saturation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.loadtest.sim.metrics import (
    SATURATION_MAX_FAILED_FRACTION,
    RequestRecord,
    Slo,
    format_table,
    percentile,
    saturation_rate_scale,
    summarize,
)

REQUIRED_KEYS = {
    "completed", "failed", "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_mean", "tpot_p50", "tpot_p90",
    "tpot_p99", "e2e_mean", "e2e_p50", "e2e_p90", "e2e_p99", "throughput_rps", "output_tokens_per_s",
    "preemptions_per_request", "goodput_rps", "slo_attainment", "prefix_hit_rate", "duration_s",
}


def rec(rid, arrival, first, finish, out, *, prompt=100, cached=0, preempt=0, error=None) -> RequestRecord:
    return RequestRecord(rid, arrival, first, finish, prompt, out, num_preemptions=preempt,
                         num_cached_prompt_tokens=cached, error=error)


# Times are exact binary fractions, so every expected value below is exact. Default SLO: TTFT 2 s, TPOT 100 ms.
HAND = [
    rec("ok", 0.0, 0.5, 1.5, 17, cached=50),                  # ttft .5  tpot 1/16  e2e 1.5   meets
    rec("slow_ttft", 1.0, 4.0, 5.0, 5, prompt=200, preempt=2),  # ttft 3   tpot .25   e2e 4     misses TTFT
    rec("one_token", 2.0, 2.25, 2.25, 1, cached=100),         # ttft .25 no tpot    e2e .25   meets
    rec("slow_tpot", 3.0, 3.5, 7.5, 9, preempt=1),            # ttft .5  tpot .5    e2e 4.5   misses TPOT
    rec("timeout", 4.0, 4.5, None, 0, prompt=1000, cached=1000, preempt=5, error="timeout"),
    rec("aborted", 0.5, 1.0, 8.0, 3, error="aborted"),        # finished, but failed: only its finish counts
]


def test_hand_computed_example():
    s = summarize(HAND)
    assert REQUIRED_KEYS <= s.keys()
    expected = {
        "completed": 4, "failed": 2, "duration_s": 8.0,
        # TTFT sorted .25 .5 .5 3: p50 at index 1.5, p90 at 2.7, p99 at 2.97
        "ttft_mean": 1.0625, "ttft_p50": 0.5, "ttft_p90": 0.5 + 2.5 * 0.7, "ttft_p99": 0.5 + 2.5 * 0.97,
        # TPOT over the 3 multi-token outputs: 1/16 .25 .5
        "tpot_mean": 0.8125 / 3, "tpot_p50": 0.25, "tpot_p90": 0.45, "tpot_p99": 0.495,
        # E2E sorted .25 1.5 4 4.5
        "e2e_mean": 2.5625, "e2e_p50": 2.75, "e2e_p90": 4.0 + 0.5 * 0.7, "e2e_p99": 4.0 + 0.5 * 0.97,
        "throughput_rps": 4 / 8, "output_tokens_per_s": (17 + 5 + 1 + 9) / 8,
        "preemptions_per_request": 3 / 4,
        "goodput_rps": 2 / 8, "slo_attainment": 2 / 6,
        "prefix_hit_rate": 150 / 500,
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("slo,good", [
    pytest.param(Slo(), 2, id="default"),
    pytest.param(Slo(ttft_s=3.0, tpot_s=0.25), 3, id="both_boundaries_inclusive"),
    pytest.param(Slo(tpot_s=0.5), 3, id="tpot_500ms_boundary_inclusive"),
    pytest.param(Slo(ttft_s=0.25, tpot_s=1.0), 1, id="only_one_token_meets_tight_ttft"),
    pytest.param(Slo(ttft_s=0.1), 0, id="none"),
])
def test_goodput_per_slo(slo, good):
    s = summarize(HAND, slo=slo)
    assert s["goodput_rps"] == good / 8 and s["slo_attainment"] == good / 6


def test_duration_override():
    s = summarize(HAND, duration_s=16.0)
    assert (s["duration_s"], s["throughput_rps"], s["goodput_rps"]) == (16.0, 0.25, 0.125)


@pytest.mark.parametrize("records", [
    pytest.param([], id="empty"),
    pytest.param([rec("a", 0.0, None, None, 0, error="refused"), rec("b", 1.0, 1.5, None, 3)], id="all_failed"),
    pytest.param([rec("a", 0.0, 0.1, 0.0, 1)], id="zero_duration"),
])
def test_degenerate_inputs_are_finite(records):
    s = summarize(records)
    assert REQUIRED_KEYS <= s.keys()
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in s.values())
    if not any(r.completed for r in records):
        assert s["completed"] == 0 and s["failed"] == len(records)
        assert all(s[k] == 0.0 for k in REQUIRED_KEYS - {"completed", "failed", "duration_s"})


def test_failed_requests_are_excluded_from_latency_stats():
    fast = [rec(f"r{i}", float(i), i + 0.5, i + 1.5, 11) for i in range(4)]
    failed = [rec("f1", 0.0, 50.0, 60.0, 11, error="500"), rec("f2", 0.0, None, None, 0, error="timeout")]
    assert summarize(fast + failed)["ttft_p99"] == summarize(fast)["ttft_p99"] == 0.5
    s = summarize(fast + failed)
    assert (s["completed"], s["failed"], s["slo_attainment"]) == (4, 2, 4 / 6)


@pytest.mark.parametrize("record,ttft,tpot,e2e", [
    pytest.param(rec("a", 1.0, 1.5, 3.5, 5), 0.5, 0.5, 2.5, id="streaming"),
    pytest.param(rec("a", 1.0, 1.5, 1.5, 1), 0.5, None, 0.5, id="one_token"),
    pytest.param(rec("a", 1.0, None, 3.0, 4), 2.0, 0.0, 2.0, id="non_streaming_ttft_is_e2e"),
    pytest.param(rec("a", 1.0, 1.5, None, 4, error="x"), 0.5, None, None, id="unfinished"),
    pytest.param(rec("a", 1.0, None, None, 0, error="x"), None, None, None, id="nothing"),
])
def test_record_properties(record, ttft, tpot, e2e):
    assert (record.ttft, record.tpot, record.e2e) == (ttft, tpot, e2e)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), q=st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_percentile_edges():
    assert percentile([], 50) == 0.0
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@pytest.mark.parametrize("summary", [pytest.param(summarize(HAND), id="hand"), pytest.param(summarize([]), id="empty")])
def test_format_table(summary):
    table = format_table(summary)
    lines = table.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["TTFT", "TPOT", "E2E"]
    for word in ("throughput", "preemptions", "goodput", "prefix"):
        assert word in table


def test_format_table_values_in_ms():
    table = format_table(summarize(HAND))
    assert table.splitlines()[1].split() == ["TTFT", "1062.5", "500.0", "2250.0", "2925.0"]
    assert "0.250 req/s (33.3% meet the SLO)" in table and "30.0% of prompt tokens" in table


def point(p99: float, completed: int = 100, failed: int = 0) -> dict:
    return {"ttft_p99": p99, "completed": completed, "failed": failed}


@pytest.mark.parametrize("points,slo,expected", [
    pytest.param([], Slo(), None, id="no_points"),
    pytest.param([(1.0, point(0.5)), (2.0, point(1.0)), (4.0, point(1.9))], Slo(), 4.0, id="all_meet"),
    pytest.param([(1.0, point(0.5)), (2.0, point(2.0)), (4.0, point(9.0))], Slo(), 2.0, id="boundary_inclusive"),
    pytest.param([(4.0, point(9.0)), (1.0, point(0.5)), (2.0, point(1.0))], Slo(), 2.0, id="unsorted_input"),
    pytest.param([(1.0, point(0.5)), (2.0, point(3.0)), (3.0, point(1.0))], Slo(), 1.0, id="stops_at_first_miss"),
    pytest.param([(1.0, point(2.5)), (2.0, point(1.0))], Slo(), None, id="lowest_misses"),
    pytest.param([(1.0, point(2.5)), (2.0, point(2.9))], Slo(ttft_s=3.0), 2.0, id="custom_slo"),
    pytest.param([(1.0, point(0.5)), (2.0, point(0.0, completed=0, failed=50))], Slo(), 1.0, id="nothing_completed"),
    pytest.param([(1.0, point(0.5, 99, 1)), (2.0, point(0.5, 98, 2))], Slo(), 1.0, id="failures_over_1pct"),
])
def test_saturation_rate_scale(points, slo, expected):
    assert SATURATION_MAX_FAILED_FRACTION == 0.01
    assert saturation_rate_scale(points, slo) == expected


def test_saturation_from_real_summaries():
    def run(scale: float) -> dict:  # queueing grows with load: TTFT = 0.4 * scale
        return summarize([rec(f"r{i}", float(i), i + 0.4 * scale, i + 1.0 + 0.4 * scale, 10) for i in range(20)])
    assert saturation_rate_scale([(x, run(x)) for x in (1.0, 2.0, 4.0, 5.0, 6.0, 8.0)], Slo()) == 5.0
