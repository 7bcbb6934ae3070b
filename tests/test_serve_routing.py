"""Routing decisions through real Ray Serve: two simulated replicas at real speed (speed-up 1).

Scenario: one long request (a 6,000-token prompt, 2,000 output tokens, over a minute on the simulated A10G)
keeps replica B busy; then 20 one-token requests are sent one after another. Which replica served each request is read from the
replica itself (it names itself in the stream's first event; the ingress returns it as ``x-halffull-replica``).

* ``sal`` sees B's outstanding work (its published decode work plus the router's own in-flight delta), so the
  short requests avoid B. Only while the long request's expected remaining output is more than a token: once it
  has generated more than the replica's mean output length (256 before anything finished), the estimate says
  one token is left (router/estimate.py) and B looks free. Hence the A10G profile (a 2.5 s prefill and 36 ms
  decode steps put that ~12 s after the start, where an H100's 0.16 s and 8 ms put it at ~2.2 s, and a slow
  CI host's 20 requests once ran past it) and one-token short requests (no decode step after the prefill).
* ``round_robin`` ignores load: the short requests alternate, 10 and 10.

The ``sal`` app also shows that the output token counts the ingress reports reach its router's policy (the
router logs how many it observed, tests/serve_support.py ``ingress_log_matches``).
"""

from __future__ import annotations

import collections
import re

import httpx
import pytest

from tests.serve_support import ingress_log_matches, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

M = "llama3-8b"
NUM_SHORT = 20


@pytest.fixture(scope="module")
def deploy(ray_cluster):
    deployed = []

    def run(router: str) -> str:
        name = f"routing-{router.replace('_', '-')}"
        url = ray_cluster.deploy(name, {"num_replicas": 2, "router": router, "router_seed": 7, "speedup": 1.0,
                                        "stats_period_s": 0.2, "gpu": "a10g"})
        deployed.append(name)
        return url

    yield run
    for name in deployed:
        ray_cluster.delete(name)


def short_requests_while_one_is_busy(base_url: str) -> tuple[str, collections.Counter]:
    """(busy replica, replica -> short requests served)."""
    long_body = {"model": M, "prompt": [300 + i % 50 for i in range(6000)], "max_tokens": 2000, "ignore_eos": True,
                 "stream": True}
    counts: collections.Counter = collections.Counter()
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long_body) as busy:
            assert busy.status_code == 200
            busy_replica = busy.headers["x-halffull-replica"]
            for i in range(NUM_SHORT):
                r = http.post("/v1/completions", json={"model": M, "prompt": f"short request {i}", "max_tokens": 1})
                assert r.status_code == 200, r.text
                counts[r.headers["x-halffull-replica"]] += 1
        # leaving the block closed the long stream: the replica aborts it
    return busy_replica, counts


COUNTS_LINE = re.compile(r"halffull router: stats delivery delay .*; output counts observed (\d+);")


def test_sal_steers_new_requests_away_from_the_busy_replica(deploy):
    busy, counts = short_requests_while_one_is_busy(deploy("sal"))
    assert sum(counts.values()) == NUM_SHORT
    assert counts[busy] <= 2, f"busy replica {busy} got {counts[busy]} of {NUM_SHORT}: {dict(counts)}"
    # Every short request's output count reached the router's policy (the long one was abandoned: no count).
    def latest_count() -> int:
        observed = [int(m.group(1)) for m in ingress_log_matches("routing-sal", COUNTS_LINE)]
        return observed[-1] if observed else 0

    wait_until(lambda: latest_count() >= NUM_SHORT, timeout=30, interval=1.0,
               message=f"the sal router to log {NUM_SHORT} output counts observed")


def test_round_robin_spreads_evenly_regardless_of_load(deploy):
    busy, counts = short_requests_while_one_is_busy(deploy("round_robin"))
    assert sorted(counts.values()) == [NUM_SHORT // 2, NUM_SHORT // 2], dict(counts)
