"""Shared support for the Ray Serve tests: ONE local Ray cluster per test session, loopback only.

``ray_cluster`` (session fixture, exported by tests/conftest.py) starts Ray with 4 logical CPUs on 127.0.0.1
and Serve's HTTP proxy on a free 127.0.0.1 port, only when a test asks for it; at the end it runs
``serve.shutdown()`` and ``ray.shutdown()``, which stop every process the session started. Each test module
deploys its own app under its own route prefix with ``ray_cluster.deploy(name, args)`` (a module-scoped
fixture) and deletes it at module end.
"""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass, field

import pytest

from halffull.deploy import ray_env

# Keep Ray's listeners on 127.0.0.1 (DESIGN.md §9), and the environment every halffull cluster starts with
# (deploy/ray_env.py). Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is first imported (ray_constants), and
# test modules import Ray at collection, before any fixture runs: so it is set here, when conftest.py loads.
ray_env.apply()

# Routers log their stats delivery delays and the output counts they observed every this many seconds (60 by
# default): often enough for tests to read (ingress_log_matches). Read by each router in its own process, so it is
# set here, before the session's Ray starts, for every worker to inherit.
os.environ.setdefault("HALFFULL_DELAY_LOG_EVERY_S", "5")

APP_READY_TIMEOUT_S = 120


@dataclass
class ServeCluster:
    http: str  # http://127.0.0.1:<port>
    apps: list[str] = field(default_factory=list)

    def deploy(self, name: str, args: dict) -> str:
        """Deploy halffull.deploy.app:build_app(args) as app ``name`` at ``/name``; returns its base URL."""
        from ray import serve

        from halffull.deploy.app import build_app

        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        self.apps.append(name)
        return f"{self.http}/{name}"

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)
        self.apps.remove(name)


@pytest.fixture(scope="session")
def ray_cluster():
    ray_env.apply()  # keep Ray's listeners on 127.0.0.1 (DESIGN.md §9); the gRPC proxy hop
    import ray
    from ray import serve

    ray.init(
        address="local",  # always a new cluster of our own, never one found on the machine
        num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
        namespace="halffull-tests", _system_config={"metrics_report_interval_ms": 1000},
    )
    port = ray_env.free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeCluster(http=f"http://127.0.0.1:{port}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def replica_actor(app: str, replica_id: str):
    """The Ray actor of one LLMReplica replica of ``app`` (Serve names it after the app and the replica id)."""
    import ray

    return ray.get_actor(f"SERVE_REPLICA::{app}#LLMReplica#{replica_id}", namespace="serve")


def replica_actors(app: str) -> dict:
    """Replica id -> Ray actor, for every live LLMReplica replica of ``app``."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#LLMReplica#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return {name[len(prefix):]: ray.get_actor(name, namespace="serve") for name in names}


def wait_until(predicate, timeout: float, interval: float = 0.25, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass (fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


def ingress_log_matches(app: str, pattern: re.Pattern) -> list[re.Match]:
    """Matches of ``pattern`` in the Serve log files of ``app``'s ingress replicas (this Ray session), in order."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    out: list[re.Match] = []
    for path in sorted(glob.glob(os.path.join(session, "logs", "serve", f"replica_{app}_OpenAIIngress_*.log"))):
        with open(path) as f:
            out += [m for m in map(pattern.search, f) if m]
    return out
