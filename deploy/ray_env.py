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
                                         (The ingress's own calls to the LLM replicas go over gRPC by the app's
                                         choice, per handle, whatever the environment says: AppConfig
                                         ``replica_calls``, deploy/config.py. Their tokens travel on halffull's
                                         token channel; what gRPC saves there is CPU per request.) The gRPC
                                         server is the one every Serve replica runs;
                                         halffull's replicas bind it to the node IP
                                         (replicas/deployment.py ``bind_replica_grpc_to_node_ip``).
"""

from __future__ import annotations

import os
from typing import MutableMapping

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DEFAULTS = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``LOOPBACK`` and fill unset ``DEFAULTS`` in ``environ`` (default ``os.environ``), before Ray starts a
    cluster from this process; returns the values in effect for every variable named here."""
    env = os.environ if environ is None else environ
    env.update(LOOPBACK)
    for name, value in DEFAULTS.items():
        env.setdefault(name, value)
    return {name: env[name] for name in (*LOOPBACK, *DEFAULTS)}
