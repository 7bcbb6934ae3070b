"""Many routers on real Ray Serve: 4 ingress replicas (4 routers) in front of 2 simulated replicas.

* the replicas publish their received-requests feed (``num_received``, ``recent_prefix_hashes``) and the
  routers learn from it (traffic share, published prefixes);
* the ingress replicas find each other (hellos over Serve) and carry every router's bookings to the others
  over UDP (deploy/peer_link.py), and the routers apply them (router/peers.py);
* killing one ingress replica mid-load: requests on the others are unaffected; its own clients get a clean
  error (or their request served elsewhere), never a hang (the others' bookings to it are simply lost).
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from tests.serve_support import ingress_log_matches, replica_actor, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

M = "llama3-8b"
APP = "feed4"
PERIOD_S = 0.5


@pytest.fixture(scope="module")
def app(ray_cluster):
    url = ray_cluster.deploy(APP, {"num_replicas": 2, "ingress_replicas": 4, "router": "sal", "router_seed": 3,
                                   "speedup": 4.0, "stats_period_s": PERIOD_S})
    yield url
    ray_cluster.delete(APP)


def complete(http: httpx.Client, i: int) -> httpx.Response:
    return http.post("/v1/completions", json={"model": M, "prompt": [100 + i % 7] * 300 + [i], "max_tokens": 8})


def llm_replica_ids() -> list[str]:
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{APP}#LLMReplica#"
    return [a["name"][len(prefix):] for a in actors if a["name"].startswith(prefix)]


def test_replicas_publish_the_received_feed(app):
    import ray

    with httpx.Client(base_url=app, timeout=30) as http:
        for i in range(12):
            assert complete(http, i).status_code == 200
    published = [ray.get(replica_actor(APP, rid).record_routing_stats.remote()) for rid in llm_replica_ids()]
    assert sum(s["num_received"] for s in published) >= 12
    assert all(isinstance(h, int) for s in published for h in s["recent_prefix_hashes"])
    assert any(s["recent_prefix_hashes"] for s in published)


APPLIED = re.compile(r"halffull router: peer bookings applied \d+ \(total (\d+)\)")


def test_ingress_replicas_carry_each_others_bookings(app):
    from ray import serve

    with httpx.Client(base_url=app, timeout=30) as http:
        for i in range(40):
            assert complete(http, i).status_code == 200

    def links() -> list[dict]:
        return [r["peer_link"] for r in serve.get_app_handle(APP).broadcast("load").results(timeout_s=10)]

    # every link knows the three others (hellos), and what was booked went out and arrived, all with our tokens
    wait_until(lambda: all(link["peers"] == 3 for link in links()), 20.0, message="the ingress replicas to know each other")
    found = links()
    assert len(found) == 4 and sum(link["bookings_sent"] for link in found) >= 40, found
    wait_until(lambda: sum(link["datagrams_received"] for link in links()) >= 40, 10.0, message="the datagrams")
    assert all(link["datagrams_dropped"] == 0 for link in links())

    def applied() -> int:  # the largest running total a router logged (every 5 s here: tests/serve_support.py)
        return max((int(m.group(1)) for m in ingress_log_matches(APP, APPLIED)), default=0)

    wait_until(lambda: applied() >= 5, 20.0, message="a router to log the peer bookings it applied")


def test_killing_one_ingress_replica_mid_load_never_hangs_a_request(app):
    import ray

    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{APP}#OpenAIIngress#")]
    assert len(ingress) == 4
    outcomes: list[tuple[float, str]] = []  # (finish time, "ok" | "error <status or exception>")
    lock = threading.Lock()
    stop = time.time() + 12.0

    def client(k: int) -> None:
        with httpx.Client(base_url=app, timeout=20) as http:
            i = 0
            while time.time() < stop:
                try:
                    r = complete(http, k * 1000 + i)
                    result = "ok" if r.status_code == 200 else f"error {r.status_code}"
                except httpx.TimeoutException:
                    result = "hang"
                except httpx.HTTPError as exc:
                    result = f"error {type(exc).__name__}"
                with lock:
                    outcomes.append((time.time(), result))
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    killed_at = time.time()
    victim = ingress[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    results = [r for _, r in outcomes]
    assert "hang" not in results, results
    after = [r for at, r in outcomes if at > killed_at + 3.0]
    assert after and after.count("ok") >= 0.9 * len(after), after
    errors = [r for r in results if r != "ok"]
    assert len(errors) <= 6, errors  # at most the requests in flight on the killed replica (one per client)
