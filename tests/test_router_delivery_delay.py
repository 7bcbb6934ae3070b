"""Live measurement of the stats delivery delay that the simulator models as ``stats_delay_s``
(loadtest/sim/cluster.py ``STATS_DELAY_S``): how old a replica's routing stats are when a router receives them.

Path measured (Ray 2.60): the controller calls ``LLMReplica.record_routing_stats`` every
``request_routing_stats_period_s`` (randomized), collects the finished call in a later control-loop
iteration, and broadcasts the replicas' stats by long poll to every handle; the ``HalffullRequestRouter`` in the
ingress replica (the process that holds the handle) records ``time.time() - stats_time`` of every new publication
in ``update_replicas`` (``stats_time`` is ``time.time()`` inside ``record_routing_stats``; one host, one clock)
and logs them every 5 s here (``HALFFULL_DELAY_LOG_EVERY_S``, which tests/serve_support.py sets before Ray
starts so that its workers inherit it). The test deploys the real app (1 ingress replica, 2 simulated
replicas, period 0.5 s), keeps requests flowing over HTTP, and reads the ingress replica's log lines.

    HALFFULL_MEASURE=1 .venv/bin/python -m pytest -q -s tests/test_router_delivery_delay.py   (prints the distribution)
"""

from __future__ import annotations

import re
import statistics
import threading
import time

import httpx
import pytest

from tests.serve_support import ingress_log_matches

# A measurement (it sets the simulator default), not a gate. HALFFULL_MEASURE=1 runs it. (In a full suite run the
# log lines it reads were once missing: the log interval was a global of router/serve_router.py, which Ray pickles
# by value, so a module imported before this one froze it at 60 s; routers now read it when they are made.)
pytestmark = [pytest.mark.ray, pytest.mark.measure, pytest.mark.timeout(300)]

APP = "delay"
PERIOD_S = 0.5
LOAD_S = 30.0
LINE = re.compile(r"halffull router: stats delivery delay over (\d+) publications: .*; ms: ([\d ]+)")


def ingress_delays(app: str) -> list[float]:
    """Delays (s) listed by the routers of ``app``'s ingress replicas in this Ray session's Serve logs."""
    return [int(x) / 1000 for m in ingress_log_matches(app, LINE) for x in m.group(2).split()]


def load(url: str, seconds: float, clients: int = 3) -> int:
    done = []
    stop = time.time() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = 0
            while time.time() < stop:
                r = http.post("/v1/completions", json={"model": "llama3-8b", "prompt": [100 + k] * 300 + [i],
                                                       "max_tokens": 16})
                done.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(1 for s in done if s == 200)


def test_stats_reach_the_router_within_a_control_loop_or_two(ray_cluster):
    url = ray_cluster.deploy(APP, {"num_replicas": 2, "ingress_replicas": 1, "router": "sal", "router_seed": 1,
                                   "speedup": 4.0, "stats_period_s": PERIOD_S})
    try:
        ok = load(url, LOAD_S)
        time.sleep(6.0)  # one more log line
    finally:
        ray_cluster.delete(APP)
    delays = ingress_delays(APP)
    assert ok > 0 and len(delays) >= 20, (ok, delays)
    q = statistics.quantiles(delays, n=20)
    print(f"\nstats delivery delay, period {PERIOD_S}s, {ok} requests in {LOAD_S:.0f}s, {len(delays)} publications: "
          f"min {min(delays):.3f} median {statistics.median(delays):.3f} mean {statistics.mean(delays):.3f} "
          f"p90 {q[17]:.3f} p95 {q[18]:.3f} max {max(delays):.3f} s")
    assert 0 < statistics.median(delays) < PERIOD_S + 1.0


PEER_LINE = re.compile(r"halffull router: peer bookings applied (\d+) \(total \d+\): .*; ms: ([\d. ]+)")
PEER_APP = "peerlag"


def peer_lags(app: str) -> list[float]:
    """Lags (s) from a peer's decision to its booking reaching this router's process (the datagram's kernel
    receive time: every decision from then on sees it), as the routers of ``app`` log them."""
    return [float(x) / 1000 for m in ingress_log_matches(app, PEER_LINE) for x in m.group(2).split()]


def test_peer_bookings_reach_the_other_routers_within_milliseconds(ray_cluster):
    """The simulator's ``peer_delay_s`` (loadtest/sim/cluster.py ``PEER_DELAY_S``): 4 ingress replicas, so 4 routers
    broadcasting their bookings to each other (deploy/peer_link.py), each logging the lag of those it applies."""
    url = ray_cluster.deploy(PEER_APP, {"num_replicas": 2, "ingress_replicas": 4, "router": "sal", "router_seed": 1,
                                        "speedup": 4.0, "stats_period_s": PERIOD_S})
    try:
        ok = load(url, LOAD_S)
        time.sleep(6.0)
    finally:
        ray_cluster.delete(PEER_APP)
    lags = peer_lags(PEER_APP)
    assert ok > 0 and len(lags) >= 50, (ok, len(lags))
    q = statistics.quantiles(lags, n=20)
    print(f"\npeer booking lag, 4 ingress replicas, {ok} requests in {LOAD_S:.0f}s, {len(lags)} bookings applied "
          f"(the last {len(lags)} logged): min {min(lags) * 1000:.2f} median {statistics.median(lags) * 1000:.2f} "
          f"mean {statistics.mean(lags) * 1000:.2f} p90 {q[17] * 1000:.2f} p95 {q[18] * 1000:.2f} "
          f"max {max(lags) * 1000:.2f} ms")
    assert statistics.median(lags) < 0.5
