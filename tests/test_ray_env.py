"""The environment halffull starts Ray with (deploy/ray_env.py): what ``apply`` sets, that every other entry point
that starts Ray exports the same values, and that Serve's proxy of a live cluster runs with them."""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest
import yaml

from halffull.deploy import ray_env

ROOT = Path(__file__).resolve().parent.parent
EVERYTHING = {**ray_env.LOOPBACK, **ray_env.DEFAULTS}


@pytest.mark.parametrize("given, expected", [
    ({}, EVERYTHING),
    ({"RAY_SERVE_PROXY_USE_GRPC": "0"}, {**EVERYTHING, "RAY_SERVE_PROXY_USE_GRPC": "0"}),  # a user's choice stays
    ({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, EVERYTHING),  # loopback is not optional
    ({"OTHER": "x"}, {**EVERYTHING, "OTHER": "x"}),
])
def test_apply_forces_loopback_and_fills_unset_defaults(given, expected):
    env = dict(given)
    in_effect = ray_env.apply(env)
    assert env == expected
    assert in_effect == {name: expected[name] for name in EVERYTHING}


def test_serve_local_exports_every_variable_with_its_value():
    script = (ROOT / "deploy" / "serve_local.sh").read_text()
    for name, value in ray_env.LOOPBACK.items():
        assert re.search(rf"^export {name}={value}$", script, re.M), name
    for name, value in ray_env.DEFAULTS.items():  # overridable from the caller's environment
        assert re.search(rf'^export {name}="\${{{name}:-{value}}}"$', script, re.M), name


@pytest.mark.parametrize("path", ["cluster.yaml", "deploy/cluster_local.yaml"])
def test_cluster_launcher_starts_every_node_with_the_defaults(path):
    config = yaml.safe_load((ROOT / path).read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        for name, value in ray_env.DEFAULTS.items():
            assert f"{name}={value} ray start" in command, command


def _proxy_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ProxyActor" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_the_live_proxy_runs_with_the_grpc_hop(ray_cluster):
    """The session's cluster (tests/serve_support.py) starts as every halffull cluster does: Serve's HTTP proxy
    process has RAY_SERVE_PROXY_USE_GRPC=1, which it reads when it builds its handle to the ingress."""
    proxies = _proxy_processes()
    assert proxies, "no Serve ProxyActor process under this test session"
    for proxy in proxies:
        env = proxy.environ()
        for name, value in EVERYTHING.items():
            assert env.get(name) == value, (name, env.get(name))
