"""Property tests (hypothesis) for what comes from outside: app arguments, engine options, router kwargs, and
the stats replicas publish. No Ray cluster.

* Configuration parses to a valid object or fails with ``ValueError`` naming the problem; nothing else (no
  TypeError from a comparison deep inside, no config that builds and then fails in every replica).
* The Serve router adapter never raises on malformed, missing, stale or hostile replica stats: every candidate
  is ranked exactly once and the hooks stay quiet (router/accounting.parse_stats makes such stats "unknown").

Trace loaders are fuzzed in tests/test_traces.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import types
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from halffull.deploy.app import RAY_DEFAULT_ROUTER, AppConfig, build_app
from halffull.replicas.engine.larry import LarryParams
from halffull.replicas.engine.policies import engine_policy_names
from halffull.replicas.engine.stats import STATS_KEYS
from halffull.replicas.sim.realtime import AsyncSimEngine, SimEngineConfig
from halffull.router.registry import POLICY_NAMES, params_class
from halffull.router.serve_router import HalffullRequestRouter, routing_kwarg

pytestmark = pytest.mark.timeout(240)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# ---- value strategies ------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5000), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0.001, 100.0), st.text(max_size=8),
    st.sampled_from(["inf", "nan", "1e400", "0", "sal", "h100", "llama3-8b", "larry"]),
)
json_like = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                         max_leaves=6)


def fields_of(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def params_dicts(names: list[str]):
    return st.dictionaries(st.sampled_from(names + ["bogus"]), json_like, max_size=3)


ROUTER_PARAM_NAMES = sorted({name for p in POLICY_NAMES for name in fields_of(params_class(p))})
ENGINE_OPTIONS = [n for n in fields_of(SimEngineConfig)
                  if n not in {"gpu", "model", "speedup", "engine_policy", "engine_params", "output_vocab"}]

def typed(hint):
    """Mostly values of the annotated type (edge cases included), sometimes anything."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    pool = []
    for option in options:
        if option is type(None):
            pool.append(st.none())
        elif option is bool:
            pool.append(st.booleans())
        elif option is int:
            pool.append(st.integers(-2, 5000) | st.integers(-(2**40), 2**40))
        elif option is float:
            pool.append(st.floats(-1.0, 1e4) | st.sampled_from([0.0, 1e-9, math.inf, -math.inf, math.nan, 1e300]))
        elif option is str:
            pool.append(st.text(max_size=6))
    return st.one_of(*pool, json_like) if pool else json_like


app_values = {
    name: typed(hint) for name, hint in typing.get_type_hints(AppConfig).items()
}
app_values.update({
    "router": st.sampled_from([*POLICY_NAMES, RAY_DEFAULT_ROUTER, "fastest", 3]),
    "router_params": params_dicts(ROUTER_PARAM_NAMES) | json_like,
    "engine_policy": st.sampled_from([*engine_policy_names(), "lifo", None]),
    "engine_params": params_dicts(fields_of(LarryParams)) | json_like,
    "engine": st.dictionaries(st.sampled_from(ENGINE_OPTIONS + ["speedup", "blocks"]),
                              st.integers(-2, 100_000) | json_like, max_size=3),
    "gpu": st.sampled_from(["h100", "a100", "h200", "a10g", "l4", "tpu", 1]),
    "model": st.sampled_from(["llama3-8b", "llama3-70b", "gpt", None]),
    "served_model_name": st.sampled_from([None, "m", "", " "]) | json_like,
})
app_args = st.lists(st.sampled_from(fields_of(AppConfig) + ["routr"]), max_size=5, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: app_values.get(k, json_like) for k in keys}))


@FUZZ
@given(app_args)
def test_app_arguments_parse_or_fail_with_value_error(args):
    try:
        config = AppConfig.from_args(args)
    except ValueError:
        return
    # Accepted: everything downstream of the arguments must work too.
    assert config.max_model_len() >= 2
    build_app(args)  # Serve's own option validation (pydantic) agrees
    engine = config.engine_config()
    if (engine.num_blocks or 0) <= 100_000:
        AsyncSimEngine.from_config(engine)  # what every replica does at start


@FUZZ
@given(st.dictionaries(st.sampled_from(fields_of(SimEngineConfig) + ["nope"]), json_like, max_size=5))
def test_engine_options_parse_or_fail_with_value_error(options):
    try:
        config = SimEngineConfig.from_dict(options)
    except ValueError:
        return
    assert config.speedup > 0
    if (config.num_blocks or 0) <= 100_000:
        try:
            AsyncSimEngine.from_config(config)
        except ValueError:  # the GPU/model profile itself refuses (e.g. a 70B model on one small GPU)
            pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["policy", "policy_params", "seed", "max_stats_age_s", "polcy"]),
                       json_like | st.sampled_from(POLICY_NAMES), max_size=4))
def test_router_kwargs_parse_or_fail_with_value_error(kwargs):
    router = HalffullRequestRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
    try:
        router.initialize_state(**kwargs)
    except ValueError:
        return


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="'num_replicas' must be int"):
        AppConfig.from_args({"num_replicas": "4"})
    with pytest.raises(ValueError, match="'max_num_seqs' must be int"):
        AppConfig.from_args({"engine": {"max_num_seqs": 2.5}})
    with pytest.raises(ValueError, match="'tau' of policy 'larry' must be float"):
        AppConfig.from_args({"engine_params": {"tau": "fast"}})
    with pytest.raises(ValueError, match="pressure_order"):
        AppConfig.from_args({"engine_params": {"pressure_order": "yes"}})
    with pytest.raises(ValueError, match="request_timeout_s"):
        AppConfig.from_args({"request_timeout_s": -1})
    assert AppConfig.from_args({"speedup": "inf"}).speedup == math.inf


# ---- the router adapter under hostile stats ----------------------------------------------------------------
DEP = DeploymentID(name="LLMReplica", app_name="fuzz")


class FakeReplica:
    def __init__(self, uid: str, stats):
        self.replica_id = ReplicaID(uid, DEP)
        self.routing_stats = stats
        self.max_ongoing_requests = 100


def good_stats(now: float) -> dict:
    return dict(num_running=2, num_waiting=1, num_waiting_prompt_tokens=500, num_decode_tokens_remaining=800.0,
                num_free_blocks=900, num_total_blocks=1000, block_size=16, decode_cost_ratio=1.2,
                num_preemptions=0, stats_time=now - 0.2)


stat_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
corrupt = st.dictionaries(st.sampled_from(STATS_KEYS), stat_values, max_size=4)  # overrides of a good dict
drop = st.lists(st.sampled_from(STATS_KEYS), max_size=3)
one_replica_stats = st.one_of(
    st.tuples(corrupt, drop).map(lambda cd: ("patch", cd)),
    st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), json_like)
      .map(lambda raw: ("raw", raw)),
    st.floats(-1e6, 1e6).map(lambda age: ("age", age)),
)


def materialize(spec, now: float):
    kind, value = spec
    if kind == "raw":
        return value
    stats = good_stats(now)
    if kind == "age":
        stats["stats_time"] = now - value
        return stats
    overrides, dropped = value
    stats.update(overrides)
    for key in dropped:
        stats.pop(key, None)
    return stats


@FUZZ
@given(st.sampled_from(POLICY_NAMES), st.lists(one_replica_stats, min_size=1, max_size=5),
       st.integers(1, 5000), st.integers(1, 500))
def test_the_adapter_never_crashes_on_replica_stats(policy, specs, num_prompt, max_tokens):
    async def main():
        router = HalffullRequestRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN,
                                       self_actor_id="fuzz")
        router.initialize_state(policy=policy, seed=0)
        router._log_error = lambda message: pytest.fail(f"adapter logged an error: {message}")
        now = time.time()
        replicas = [FakeReplica(f"r{i}", materialize(spec, now)) for i, spec in enumerate(specs)]
        router.update_replicas(replicas)
        for k in range(3):
            pr = PendingRequest(args=[{}], kwargs={"routing": routing_kwarg(f"q{k}", list(range(num_prompt)), max_tokens,
                                                                            prefix_block_size=64)},
                                metadata=RequestMetadata(request_id=f"q{k}", internal_request_id=f"i{k}"))
            tiers = await router.choose_replicas(replicas, pr)
            ranked = [r.replica_id.unique_id for tier in tiers for r in tier]
            assert sorted(ranked) == sorted(r.replica_id.unique_id for r in replicas)  # each exactly once
            router.on_request_routed(pr, tiers[0][0].replica_id, None)
            for replica in replicas:
                router.accounting.snapshot(replica.replica_id.unique_id, replica.routing_stats)
        for k in range(3):
            for replica in replicas:
                router.on_request_completed(replica.replica_id, f"i{k}")
        router.on_replica_actor_died(replicas[0].replica_id)
        assert not router._inflight or all(e.replica_id != "r0" for e in router._inflight.values())

    asyncio.run(asyncio.wait_for(main(), timeout=10))


def test_stale_or_future_stats_are_unknown():
    async def main():
        router = HalffullRequestRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(policy="sal", seed=0, max_stats_age_s=5.0)
        now = time.time()
        # "stale" would look idle, but its stats are a minute old: it ranks after the replica with known load.
        stale = FakeReplica("stale", dict(good_stats(now), num_running=0, num_waiting=0, num_waiting_prompt_tokens=0,
                                          num_decode_tokens_remaining=0.0, stats_time=now - 60))
        future = FakeReplica("future", dict(good_stats(now), num_running=0, num_waiting_prompt_tokens=0,
                                            num_decode_tokens_remaining=0.0, stats_time=now + 60))
        busy = FakeReplica("busy", dict(good_stats(now), num_waiting_prompt_tokens=20_000))
        pr = PendingRequest(args=[{}], kwargs={"routing": routing_kwarg("q", list(range(100)), 16, prefix_block_size=64)},
                            metadata=RequestMetadata(request_id="q", internal_request_id="i"))
        tiers = await router.choose_replicas([stale, future, busy], pr)
        assert [t[0].replica_id.unique_id for t in tiers][0] == "busy"

    asyncio.run(asyncio.wait_for(main(), timeout=10))
