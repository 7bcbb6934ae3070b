"""SurvivalLengthEstimator (router/estimate.py): LARRY's expected final output length given tokens so far.

Table-driven cases with exact values, then hypothesis properties: the answer is never below ``g + 1``, it is a
mean of observations (so within their range) once enough lie at or above g's bucket, it never falls as g grows
within the observed range, and learning is order-independent.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.router.estimate import SurvivalLengthEstimator as Est


def est(observed=(), **kw) -> Est:
    e = Est(**kw)
    for n in observed:
        e.observe(n)
    return e


CASES = {
    # Nothing observed: the prior, or "as long again" once a request has outlived half of it.
    "prior": ((), 0, 256.0),
    "prior-as-long-again": ((), 200, 400.0),
    # 8 observations of 100 (= min_samples): their mean; a request at 100 generated must give at least 101.
    "learned": ([100] * 8, 0, 100.0),
    "learned-floor-g-plus-1": ([100] * 8, 100, 101.0),
    # 7 observations are not enough: the prior.
    "too-few": ([100] * 7, 0, 256.0),
    # Survival: 8 x 10 and 8 x 1000. At g = 0 the mean of all (505); at g = 500 only the 1000s remain.
    "conditional-all": ([10] * 8 + [1000] * 8, 0, 505.0),
    "conditional-tail": ([10] * 8 + [1000] * 8, 500, 1000.0),
    # Past every observation: too few above g, so "as long again".
    "past-observed": ([10] * 8 + [1000] * 8, 2000, 4000.0),
    # min_samples 1: one observation at or above g's bucket is enough.
    "min-samples-1": ([50, 3000], 1000, 3000.0),
}


@pytest.mark.parametrize("observed,g,expected", CASES.values(), ids=CASES.keys())
def test_expected_total(observed, g, expected):
    kw = {"min_samples": 1} if len(observed) == 2 else {}
    assert est(observed, **kw).expected_total(g) == pytest.approx(expected)


@pytest.mark.parametrize("kw", [{"prior_mean": 0}, {"prior_mean": -1}, {"prior_mean": float("nan")},
                                {"min_samples": 0}], ids=str)
def test_rejects_bad_params(kw):
    with pytest.raises(ValueError):
        Est(**kw)


lengths = st.lists(st.integers(0, 40_000), min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(lengths, st.integers(0, 50_000))
def test_never_below_g_plus_one(observed, g):
    assert est(observed).expected_total(g) >= g + 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40_000), min_size=8, max_size=60), st.integers(0, 40_000))
def test_a_mean_of_observations_when_enough_lie_above(observed, g):
    e = est(observed)
    above = [n for n in observed if Est.bucket(n) >= Est.bucket(g)]
    if len(above) >= e.min_samples:
        assert min(above) - 1e-9 <= e.expected_total(g)
        assert e.expected_total(g) <= max(max(above), g + 1) + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40_000), min_size=8, max_size=60), st.integers(0, 40_000), st.integers(0, 40_000))
def test_monotone_in_g_within_the_data(observed, g1, g2):
    """Dropping the lowest buckets can only raise a mean; below the last bucket holding min_samples."""
    e = est(observed)
    lo, hi = sorted((g1, g2))
    enough = sum(Est.bucket(n) >= Est.bucket(hi) for n in observed) >= e.min_samples
    if enough:
        assert e.expected_total(lo) <= e.expected_total(hi) + 1e-9


@settings(max_examples=100, deadline=None)
@given(lengths, st.randoms(use_true_random=False), st.integers(0, 20_000))
def test_order_of_observations_does_not_matter(observed, rng, g):
    shuffled = list(observed)
    rng.shuffle(shuffled)
    assert est(observed).expected_total(g) == pytest.approx(est(shuffled).expected_total(g))
    assert est(observed).count == len(observed)
