"""deploy/serve_config.yaml and the app builder, offline: the config validates against Serve's schema, binds
loopback, and every router / engine policy name builds an app (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray.exceptions
import yaml
from ray.serve.schema import ServeDeploySchema

from halffull.deploy.app import (RAY_DEFAULT_ROUTER, AppConfig, build_app, build_app_with_env, ingress_env,
                                 process_env)
from halffull.deploy.run import classify as _classify
from halffull.replicas.engine.policies import engine_policy_names
from halffull.router.registry import POLICY_NAMES

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_validates_and_binds_loopback():
    raw = load_config()
    schema = ServeDeploySchema.parse_obj(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "halffull.deploy.app:build_app"
    assert "runtime_env" not in raw["applications"][0] or not raw["applications"][0]["runtime_env"].get("working_dir")
    args = raw["applications"][0]["args"]
    assert (args["num_replicas"], args["router"], args["engine_policy"], args["gpu"], args["model"]) == (
        4, "sal", "larry", "h100", "llama3-8b")
    assert args["stats_period_s"] <= 0.5 and args["max_ongoing_requests"] >= 100


def deployment_options(app) -> dict:
    """The LLMReplica deployment inside a built application."""
    llm = app._bound_deployment.init_args[0]
    return llm._bound_deployment._deployment_config


def test_serve_accepts_build_app_as_an_app_builder():
    """What `serve run <config>` does with ``import_path``: Serve's own check wants exactly one parameter."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    app = call_user_app_builder_with_args_if_necessary(build_app, load_config()["applications"][0]["args"])
    assert isinstance(app, Application)


def test_default_app_builds_with_the_halffull_router():
    app = build_app(load_config()["applications"][0]["args"])
    config = deployment_options(app)
    assert config.num_replicas == 4 and config.max_ongoing_requests == 512
    router = config.request_router_config
    assert router.request_router_class == "halffull.router.serve_router:HalffullRequestRouter"
    assert router.request_router_kwargs["policy"] == "sal"
    assert router.request_routing_stats_period_s == 0.5


ONE_LOOP = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"


@pytest.mark.parametrize(("environ", "expected"), [
    pytest.param({}, {"MALLOC_ARENA_MAX": "2"}, id="defaults"),
    pytest.param({"MALLOC_ARENA_MAX": "8"}, {"MALLOC_ARENA_MAX": "8"}, id="builder-value-wins"),
    pytest.param({"MALLOC_ARENA_MAX": ""}, {}, id="empty-keeps-glibc-default"),
    pytest.param({ONE_LOOP: "0", "PATH": "/bin"}, {"MALLOC_ARENA_MAX": "2", ONE_LOOP: "0"}, id="one-loop-passed-on"),
    pytest.param({ONE_LOOP: ""}, {"MALLOC_ARENA_MAX": "2"}, id="empty-keeps-ray-default"),
])
def test_process_env(environ, expected):
    assert process_env(environ) == expected


ARENAS = {"MALLOC_ARENA_MAX": "2"}


@pytest.mark.parametrize(("environ", "expected"), [
    pytest.param({}, {**ARENAS, ONE_LOOP: "0"}, id="one-loop-by-default"),
    pytest.param({ONE_LOOP: "1"}, {**ARENAS, ONE_LOOP: "1"}, id="two-loops-exported"),
    pytest.param({ONE_LOOP: ""}, ARENAS, id="empty-keeps-ray-default"),
    pytest.param({ONE_LOOP: "0"}, {**ARENAS, ONE_LOOP: "0"}, id="one-loop-exported"),
    pytest.param({"MALLOC_ARENA_MAX": ""}, {ONE_LOOP: "0"}, id="arenas-as-process-env"),
    pytest.param({"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}, {**ARENAS, ONE_LOOP: "0"}, id="router-not-passed"),
])
def test_ingress_env(environ, expected):
    assert ingress_env(environ) == expected


@pytest.mark.parametrize(("environ", "ingress", "llm"), [
    pytest.param(None, {**ARENAS, ONE_LOOP: "0"}, ARENAS, id="this-process"),
    pytest.param({ONE_LOOP: "0"}, {**ARENAS, ONE_LOOP: "0"}, {**ARENAS, ONE_LOOP: "0"}, id="one-loop-everywhere"),
    pytest.param({ONE_LOOP: "1"}, {**ARENAS, ONE_LOOP: "1"}, {**ARENAS, ONE_LOOP: "1"}, id="two-loops-everywhere"),
])
def test_both_deployments_start_with_their_process_env(monkeypatch, environ, ingress, llm):
    for name in ("MALLOC_ARENA_MAX", ONE_LOOP):
        monkeypatch.delenv(name, raising=False)
    args = load_config()["applications"][0]["args"]
    app = build_app(args) if environ is None else build_app_with_env(args, environ)
    llm_deployment = app._bound_deployment.init_args[0]._bound_deployment
    assert app._bound_deployment.ray_actor_options["runtime_env"] == {"env_vars": ingress}
    assert llm_deployment.ray_actor_options["runtime_env"] == {"env_vars": llm}
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 0  # the ingress still takes no CPU slot


@pytest.mark.parametrize("router", [*POLICY_NAMES, RAY_DEFAULT_ROUTER])
def test_every_router_name_builds(router):
    config = deployment_options(build_app({"router": router})).request_router_config
    if router == RAY_DEFAULT_ROUTER:
        assert "PowerOfTwoChoices" in str(config.request_router_class)
    else:
        assert config.request_router_kwargs["policy"] == router


@pytest.mark.parametrize("policy", engine_policy_names())
def test_every_engine_policy_builds(policy):
    assert AppConfig.from_args({"engine_policy": policy}).engine_config().engine_policy == policy


@pytest.mark.parametrize(
    "args, message",
    [
        ({"routr": "sal"}, "unknown app argument"),
        ({"router": "fastest"}, "unknown policy"),
        ({"router": "sal", "router_params": {"nope": 1}}, "unknown params"),
        ({"engine_policy": "lifo"}, "unknown engine policy"),
        ({"engine": {"speedup": 2}}, "top level"),
        ({"engine": {"blocks": 2}}, "unknown sim engine option"),
        ({"gpu": "tpu"}, "unknown gpu"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"replica_calls": "http"}, "replica_calls must be one of"),
    ],
    ids=["typo", "unknown-router", "router-param", "engine-policy", "engine-overlap", "engine-option", "gpu",
         "replicas", "replica-calls"],
)
def test_bad_app_arguments_fail_at_build(args, message):
    with pytest.raises(ValueError, match=message):
        AppConfig.from_args(args).max_model_len()


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (ValueError("request can never fit in 10 KV blocks"), 400, "invalid_request"),
        (ray.exceptions.ActorDiedError(), 503, "replica_unavailable"),
        (ray.exceptions.ActorUnavailableError("gone", None), 503, "replica_unavailable"),
        (RuntimeError("bug"), 500, "internal_error"),
    ],
    ids=["engine-rejects", "replica-died", "replica-unavailable", "other"],
)
def test_failures_from_the_llm_deployment_map_to_http_errors(exc, status, code):
    err = _classify(exc)
    assert (err.status, err.code) == (status, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
