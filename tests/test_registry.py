"""Registry: every policy is named once, builds with defaults, and bad config fails loudly."""

from __future__ import annotations

import dataclasses
import inspect
import random

import pytest

from halffull.router.registry import POLICY_NAMES, make_policy, params_class
from halffull.router.types import ReplicaSnapshot, RequestView

EXPECTED_NAMES = ("round_robin", "random", "pow2", "least_requests", "prefix_aware", "sal")


def test_policy_names_are_the_design_table():
    assert POLICY_NAMES == EXPECTED_NAMES


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_name_resolves_to_a_working_policy(name):
    policy = make_policy(name)
    assert policy.name == name
    replicas = [ReplicaSnapshot("a"), ReplicaSnapshot("b")]
    tiers = policy.choose(RequestView("r", 10, 10), replicas, now=0.0, rng=random.Random(0))
    assert sorted(t[0] for t in tiers) == ["a", "b"]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_params_are_frozen_dataclasses_with_all_defaults_and_a_spec(name):
    cls = params_class(name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))
    assert make_policy(name).params == cls()
    module = inspect.getmodule(type(make_policy(name)))
    assert module.__doc__ and name in module.__doc__.split("\n")[0]
    for field in dataclasses.fields(cls):  # every parameter is documented in the module spec
        assert field.name in module.__doc__


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_each_make_policy_call_has_its_own_state(name):
    assert make_policy(name) is not make_policy(name)


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        pytest.param("prefix_aware", {"rel_threshold": 2}, {"rel_threshold": 2.0}, id="int-to-float"),
        pytest.param("sal", {"decode_weight": None}, {"decode_weight": None}, id="optional-none"),
        pytest.param("sal", {"decode_weight": 3}, {"decode_weight": 3.0}, id="optional-float"),
        pytest.param("sal", {"kv_penalty": False}, {"kv_penalty": False}, id="bool"),
        pytest.param("sal", {}, {"prior_output_tokens": 256.0}, id="empty-dict"),
        pytest.param("sal", None, {"use_prefix_credit": True}, id="none-params"),
    ],
)
def test_valid_params(name, params, expected):
    built = make_policy(name, params).params
    for key, value in expected.items():
        assert getattr(built, key) == value and type(getattr(built, key)) is type(value)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        pytest.param("nope", None, r"unknown policy 'nope'; valid: \['round_robin'", id="unknown-name"),
        pytest.param("SAL", None, "unknown policy", id="case-sensitive"),
        pytest.param("sal", {"decode_wieght": 1}, r"unknown params.*decode_wieght.*valid: \[", id="typo"),
        pytest.param("round_robin", {"x": 1}, "valid: none", id="no-params-policy"),
        pytest.param("sal", {"kv_penalty": 1}, "'kv_penalty' .* must be bool", id="int-for-bool"),
        pytest.param("sal", {"kv_penalty": "yes"}, "must be bool", id="str-for-bool"),
        pytest.param("sal", {"min_match_blocks": 1.5}, "must be int", id="float-for-int"),
        pytest.param("sal", {"min_match_blocks": True}, "must be int", id="bool-for-int"),
        pytest.param("sal", {"decode_weight": "2"}, r"must be float \| None", id="str-for-optional-float"),
        pytest.param("prefix_aware", {"rel_threshold": True}, "must be float", id="bool-for-float"),
        pytest.param("prefix_aware", {"max_index_entries": None}, "must be int", id="none-for-int"),
        pytest.param("prefix_aware", {"rel_threshold": 0.9}, "rel_threshold must be >= 1", id="range-rel"),
        pytest.param("prefix_aware", {"abs_threshold": -1}, "abs_threshold", id="range-abs"),
        pytest.param("sal", {"decode_weight": -1.0}, "decode_weight", id="range-decode-weight"),
        pytest.param("sal", {"prior_output_tokens": 0}, "prior_output_tokens", id="range-prior"),
        pytest.param("sal", {"max_index_entries": 0}, "max_index_entries", id="range-index"),
        pytest.param("sal", [("kv_penalty", True)], "must be a mapping", id="not-a-mapping"),
    ],
)
def test_bad_config_raises_value_error(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, params)
