"""A replica dies mid-run (``ray.kill`` on its actor): callers get a clean error, never a hang; new requests go
to the survivors; Serve starts a replacement. Three simulated replicas at real speed (speed-up 1).

Every wait is bounded: HTTP timeouts of 30 s, futures waited with timeouts, recovery polled for at most 90 s.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.serve_support import replica_actor, replica_actors, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

M = "llama3-8b"
APP = "faults"
NUM_STREAMS = 6
NUM_BLOCKING = 6


@pytest.fixture(scope="module")
def base_url(ray_cluster):
    url = ray_cluster.deploy(APP, {"num_replicas": 3, "router": "sal", "speedup": 1.0, "stats_period_s": 0.2})
    yield url
    ray_cluster.delete(APP)


def replica_actor_names() -> set[str]:
    return set(replica_actors(APP))


class Stream:
    """One streaming completion on its own client, opened until the replica accepted it."""

    def __init__(self, base_url: str, i: int):
        self.client = httpx.Client(base_url=base_url, timeout=30)
        body = {"model": M, "prompt": f"long stream {i}", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        self._cm = self.client.stream("POST", "/v1/completions", json=body)
        self.response = self._cm.__enter__()
        assert self.response.status_code == 200
        self.replica = self.response.headers["x-halffull-replica"]
        self.lines = self.response.iter_lines()

    def next_events(self, n: int) -> list[str]:
        out = []
        for line in self.lines:
            if line:
                out.append(line)
                if len(out) == n or line == "data: [DONE]":
                    break
        return out

    def drain(self) -> tuple[list[str], float]:
        start = time.monotonic()
        events = [line for line in self.lines if line]
        return events, time.monotonic() - start

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        self.client.close()


def blocking_completion(base_url: str, i: int) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        body = {"model": M, "prompt": f"blocking {i}", "max_tokens": 800, "ignore_eos": True}
        return http.post("/v1/completions", json=body)


def test_killed_replica_fails_cleanly_and_is_replaced(base_url):
    import ray

    before = wait_until(lambda: (n := replica_actor_names()) and len(n) == 3 and n, 60, message="3 replicas")
    streams = [Stream(base_url, i) for i in range(NUM_STREAMS)]
    pool = cf.ThreadPoolExecutor(max_workers=NUM_BLOCKING + NUM_STREAMS)
    try:
        victim = streams[0].replica
        assert victim in before
        blocking = [pool.submit(blocking_completion, base_url, i) for i in range(NUM_BLOCKING)]
        time.sleep(1.0)  # everything is in flight
        for s in streams:
            assert s.next_events(2)  # tokens are flowing everywhere
        ray.kill(replica_actor(APP, victim), no_restart=True)
        killed_at = time.monotonic()

        # In-flight streams on the victim end with one error event and [DONE], promptly.
        on_victim = [s for s in streams if s.replica == victim]
        for events, _ in pool.map(Stream.drain, on_victim, timeout=45):
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2][len("data: "):])["error"]
            assert error["code"] == "replica_unavailable" and error["type"] == "server_error"
        assert time.monotonic() - killed_at < 30

        # Streams on the other replicas keep going.
        for s in streams:
            if s.replica != victim:
                assert len(s.next_events(5)) == 5

        # In-flight blocking requests: 200 from a survivor or a clean 503 from the victim, never a hang. One
        # that had not started on the victim is re-sent to a survivor (x-halffull-retries > 0): no 503 then.
        affected = 0
        for future in cf.as_completed(blocking, timeout=60):
            response = future.result()
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "replica_unavailable"
                affected += 1
            else:
                assert response.status_code == 200 and response.headers["x-halffull-replica"] != victim
                affected += response.headers.get("x-halffull-retries", "0") != "0"
        assert affected > 0, "sal spreads equal requests evenly, so some were on the victim"
    finally:
        for s in streams:
            s.close()
        pool.shutdown(wait=False, cancel_futures=True)

    # New requests go to the survivors (or to the replacement), never to the dead replica.
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for i in range(10):
            r = http.post("/v1/completions", json={"model": M, "prompt": f"after {i}", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.headers["x-halffull-replica"] != victim

        # Serve replaces the dead replica; the replacement takes traffic.
        after = wait_until(lambda: (n := replica_actor_names()) and len(n) == 3 and victim not in n and n, 90,
                           interval=1.0, message="Serve to replace the killed replica")
        (replacement,) = after - before

        def replacement_serves():
            r = http.post("/v1/completions", json={"model": M, "prompt": "who serves?", "max_tokens": 2})
            return r.status_code == 200 and r.headers["x-halffull-replica"] == replacement

        wait_until(replacement_serves, 60, interval=0.2, message="the replacement replica to serve a request")
