"""halffull-haproxy (deploy/haproxy_loopback.py): the wildcard listeners of Serve's HAProxy config are bound to
the HTTP frontend's host, in place, and the real HAProxy runs with the same arguments. The live cluster's
listeners are checked in tests/test_ray_env.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

import pytest

from halffull.deploy import haproxy_loopback, ray_env

FRONTEND = "frontend http_frontend\n    bind {host}:8000\n    mode http\n"
PROMETHEUS = "frontend prometheus\n    bind :9101\n    mode http\n"
STATS = "listen stats\n  bind *:8404\n  stats enable\n"


@pytest.mark.parametrize("host, expected_host", [
    ("127.0.0.1", "127.0.0.1"),  # halffull's configs: everything on loopback
    ("10.0.0.5", "10.0.0.5"),  # a node IP: the same address as the frontend
    ("0.0.0.0", None),  # the user asked for every interface: left alone
    ("*", None),
])
def test_wildcard_binds_follow_the_frontend_host(host, expected_host):
    config = PROMETHEUS + FRONTEND.format(host=host) + STATS
    out = haproxy_loopback.bind_to_frontend_host(config)
    if expected_host is None:
        assert out == config
    else:
        assert out == (PROMETHEUS.replace("bind :9101", f"bind {host}:9101") + FRONTEND.format(host=host)
                       + STATS.replace("bind *:8404", f"bind {host}:8404"))


@pytest.mark.parametrize("config", [
    PROMETHEUS + STATS,  # no HTTP frontend: nothing to follow
    FRONTEND.format(host="127.0.0.1") + "backend b\n    server s1 127.0.0.1:30000 check\n",  # no wildcard
])
def test_configs_without_wildcards_or_frontend_stay(config):
    assert haproxy_loopback.bind_to_frontend_host(config) == config


@pytest.mark.parametrize("args, expected", [
    (["-db", "-f", "/tmp/x.cfg", "-dR"], "/tmp/x.cfg"),
    (["-db", "-f", "/tmp/x.cfg", "-sf", "12", "-x", "/tmp/admin.sock"], "/tmp/x.cfg"),
    (["-v"], None),
    (["-f"], None),
])
def test_config_path(args, expected):
    assert haproxy_loopback.config_path(args) == expected


def test_ray_template_still_has_the_wildcards_this_rewrites():
    """A Ray upgrade that binds these listeners itself (or renames the frontend) should be noticed here."""
    from ray.serve._private import haproxy_templates

    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    assert "frontend http_frontend\n    bind {{ config.frontend_host }}:" in template
    assert "bind :{{ config.metrics_port }}" in template
    assert "bind *:{{ config.stats_port }}" in template


def runnable_config(frontends: str, stats: str) -> str:
    """A config HAProxy accepts: defaults with timeouts, ``frontends`` (the last one ``http_frontend``) routed to
    a backend with one server, and the ``stats`` section."""
    return ("defaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
            + frontends + "    default_backend b\nbackend b\n    server s1 127.0.0.1:30000\n" + stats)


def test_the_wrapper_rewrites_and_runs_the_real_haproxy(tmp_path: Path):
    """The installed console script on a config HAProxy checks (-c): rewritten in place, accepted, exit 0."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(runnable_config(PROMETHEUS.replace("    mode http\n", "") + FRONTEND.format(host="127.0.0.1"),
                                      STATS))
    done = subprocess.run([ray_env.haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    text = config.read_text()
    assert "bind 127.0.0.1:9101" in text and "bind 127.0.0.1:8404" in text
    assert "bind :" not in text and "bind *:" not in text


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_haproxy_dies_with_the_process_that_started_it(tmp_path: Path):
    """A parent (Serve's HAProxy manager, here a plain Python process) killed outright takes the HAProxy it
    started through the wrapper with it, instead of leaving it running with its listeners."""
    port, stats = ray_env.free_port(), ray_env.free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(runnable_config(FRONTEND.replace("8000", str(port)).format(host="127.0.0.1"),
                                      STATS.replace("8404", str(stats))))
    starter = ("import subprocess, sys, time\n"
               f"p = subprocess.Popen([{ray_env.haproxy_binary()!r}, '-db', '-f', {str(config)!r}])\n"
               "print(p.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    haproxy = None
    try:
        haproxy = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while not any(c.laddr.port == port for c in psutil.Process(haproxy).net_connections("tcp")):
            assert time.monotonic() < deadline, "HAProxy never listened"
            time.sleep(0.05)
        assert psutil.Process(haproxy).name() == "haproxy"  # the wrapper exec'd into it: same pid
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not gone(haproxy):
            assert time.monotonic() < deadline, "HAProxy outlived the process that started it"
            time.sleep(0.05)
    finally:
        parent.kill()
        if haproxy is not None and not gone(haproxy):
            psutil.Process(haproxy).kill()
