"""The environment halffull starts Ray with (deploy/ray_env.py): what ``apply`` sets, that every other entry point
that starts Ray exports the same values, and that Serve's proxy of a live cluster runs with them."""

from __future__ import annotations

import re
import sys
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
    ({"RAY_SERVE_ENABLE_HA_PROXY": "0"}, {**EVERYTHING, "RAY_SERVE_ENABLE_HA_PROXY": "0"}),  # Serve's own proxy
])
def test_apply_forces_loopback_and_fills_unset_defaults(given, expected):
    env = dict(given)
    in_effect = ray_env.apply(env)
    haproxy = {name: env.pop(name, None) for name in (ray_env.HAPROXY_BINARY, *ray_env.HAPROXY_PORTS)}
    assert env == expected
    assert {name: in_effect[name] for name in EVERYTHING} == {name: expected[name] for name in EVERYTHING}
    if expected["RAY_SERVE_ENABLE_HA_PROXY"] == "1":  # HAProxy: this environment's wrapper, free ports
        assert haproxy[ray_env.HAPROXY_BINARY] == str(Path(sys.executable).parent / "halffull-haproxy")
        ports = [int(haproxy[name]) for name in ray_env.HAPROXY_PORTS]
        assert len(set(ports)) == len(ports) == 3 and all(0 < p < 65536 for p in ports)
        assert set(in_effect) == {*EVERYTHING, ray_env.HAPROXY_BINARY, *ray_env.HAPROXY_PORTS}
    else:
        assert haproxy == dict.fromkeys(haproxy) and set(in_effect) == set(EVERYTHING)


def test_apply_keeps_given_haproxy_binary_and_ports():
    given = {ray_env.HAPROXY_BINARY: "/opt/haproxy", "RAY_SERVE_HAPROXY_STATS_PORT": "8404",
             "RAY_SERVE_HAPROXY_METRICS_PORT": "9101"}
    env = dict(given)
    ray_env.apply(env)
    assert {name: env[name] for name in given} == given


def test_the_wrapper_is_installed_where_apply_points():
    assert Path(ray_env.haproxy_binary()).is_file(), "pip install -e . installs the halffull-haproxy script"


def test_serve_local_exports_every_variable_with_its_value():
    script = (ROOT / "deploy" / "serve_local.sh").read_text()
    for name, value in ray_env.LOOPBACK.items():
        assert re.search(rf"^export {name}={value}$", script, re.M), name
    for name, value in ray_env.DEFAULTS.items():  # overridable from the caller's environment
        assert re.search(rf'^export {name}="\${{{name}:-{value}}}"$', script, re.M), name


def test_serve_local_points_ray_at_the_wrapper():
    script = (ROOT / "deploy" / "serve_local.sh").read_text()
    assert re.search(r'^export RAY_SERVE_HAPROXY_BINARY_PATH="\$\{RAY_SERVE_HAPROXY_BINARY_PATH:-\$PWD/\.venv/bin/'
                     r'halffull-haproxy\}"$', script, re.M)


@pytest.mark.parametrize("path", ["cluster.yaml", "deploy/cluster_local.yaml"])
def test_cluster_launcher_starts_every_node_with_the_defaults(path):
    config = yaml.safe_load((ROOT / path).read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assignments = command.split("ray start")[0].split(";")[-1].split()  # VAR=value ... ray start
        env = dict(a.split("=", 1) for a in assignments)
        assert env == {**ray_env.DEFAULTS, ray_env.HAPROXY_BINARY: "$HOME/venv/bin/halffull-haproxy"}, command


def _processes(pattern: str) -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if re.search(pattern, " ".join(p.cmdline())):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_the_live_front_is_haproxy_on_loopback(ray_cluster):
    """The session's cluster (tests/serve_support.py) starts as every halffull cluster does: Serve's HAProxy
    manager runs with halffull's environment, and the HAProxy it started (through halffull-haproxy) listens on
    127.0.0.1 only: the HTTP frontend, the stats page and the Prometheus exporter."""
    managers = _processes(r"HAProxyManager")
    assert managers, "no Serve HAProxyManager process under this test session"
    for manager in managers:
        env = manager.environ()
        for name, value in EVERYTHING.items():
            assert env.get(name) == value, (name, env.get(name))
    haproxies = _processes(r"(^|/)haproxy -db -f ")
    assert haproxies, "no HAProxy process under this test session"
    port = int(ray_cluster.http.rsplit(":", 1)[1])
    for proc in haproxies:
        listening = [c.laddr for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert {a.ip for a in listening} == {"127.0.0.1"}, listening
        env = managers[0].environ()
        expected = {port, *(int(env[name]) for name in ray_env.HAPROXY_PORTS[:2])}
        assert expected <= {a.port for a in listening}, listening
    for fallback in _processes(r"ray::ProxyActor"):  # Serve's proxy, HAProxy's backup server: loopback too
        listening = [c.laddr for c in fallback.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert {a.ip for a in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        assert int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) in {a.port for a in listening}, listening


class _Choices:
    """An rng whose ``choice`` returns the given ports in order."""

    def __init__(self, *ports: int):
        self.ports = iter(ports)

    def choice(self, _candidates) -> int:
        return next(self.ports)


def test_free_port_draws_below_the_ephemeral_range_and_is_free():
    low = ray_env.ephemeral_low()
    for _ in range(20):
        port = ray_env.free_port()
        assert port in ray_env.FREE_PORTS and port < low
        assert ray_env.bindable(port)


def test_free_port_skips_a_port_in_use():
    import socket

    free = (p for p in ray_env.FREE_PORTS if ray_env.bindable(p))
    busy, spare = next(free), next(free)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", busy))
        taken.listen()
        assert ray_env.free_port(_Choices(busy, spare), low=30000) == spare


def test_free_port_falls_back_to_the_os_where_no_range_is_left():
    port = ray_env.free_port(_Choices(), low=ray_env.FREE_PORTS.start)  # the rng is never asked
    assert port not in ray_env.FREE_PORTS and ray_env.bindable(port)


@pytest.mark.parametrize("content, expected", [
    ("32768\t60999\n", 32768),
    ("1024 65535", 1024),
    ("", 32768),
    ("x y", 32768),
    (None, 32768),  # no such file
])
def test_ephemeral_low(tmp_path, content, expected):
    path = tmp_path / "ip_local_port_range"
    if content is not None:
        path.write_text(content)
    assert ray_env.ephemeral_low(str(path)) == expected
