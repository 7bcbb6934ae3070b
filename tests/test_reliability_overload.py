"""Overload: a flood far past every queue limit gets prompt 429s (Retry-After, OpenAI-shaped body), memory and
queues stay bounded, and the service recovers as soon as the flood stops.

App ``rel-overload``: two simulated replicas at a quarter of real speed with small limits, so the flood hits all
three:

    ingress    ingress_max_ongoing_requests 40     generation requests in the ingress at once (reason "ingress")
    handle     max_queued_requests 8               waiting for a free LLMReplica slot       (reason "queue")
    replica    max_ongoing_requests 8              Serve sends a replica at most 8 at once
    engine     max_num_seqs 4, max_waiting 2       the engine refuses a 7th                 (reason "engine")

Each accepted request (25 tokens) takes ~0.7 s, so the engines serve ~15 requests/s. Two kinds of flood:

* open loop, 40 requests/s for 6 s (~3x capacity), twice: the 429 latency is measured here, at the client,
  next to the latency of a trivial request (``GET /v1/models``, one every 50 ms) at the same moment — the floor
  of the HTTP path on this machine, which also runs Ray, the proxy and the clients (and, on a shared machine,
  whatever else). Bound, side by side with the 200s of the same round: median 429 latency < half the median
  200 latency, 90th percentile < the median 200 latency (a 429 that queued for a slot would take at least one
  request's service time, ~700 ms, like a 200) (skipped with a warning when the floor itself exceeds 50 ms: a
  machine that busy bounds nothing);
* a burst of 300 requests from 150 clients at once, twice: every request is answered (200 or 429), nothing
  hangs (the HTTP path of a 2-core machine, not a queue, sets the latency here).

A sampler records the peak ingress and engine queue lengths meanwhile; resident memory of the ingress and the
replicas after the first round (flood + burst) and after the second must not differ by 20 MB.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import warnings

import httpx
import pytest

from tests.serve_support import replica_actors, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

APP = "rel-overload"
M = "llama3-8b"
LIMITS = {"ingress_max_ongoing_requests": 40, "max_queued_requests": 8, "max_ongoing_requests": 8,
          "engine": {"max_num_seqs": 4, "max_waiting_requests": 2}, "retry_after_s": 2.0}
RATE, SECONDS = 40, 6  # open-loop flood: ~3x what the engines serve
BURST, CONCURRENCY = 300, 150  # closed burst
BODY = {"model": M, "max_tokens": 25, "ignore_eos": True}
BUSY_FLOOR_MS = 50  # a trivial request slower than this: the machine is too busy to bound latency


@pytest.fixture(scope="module")
def base_url(ray_cluster):
    url = ray_cluster.deploy(APP, {"num_replicas": 2, "speedup": 0.25, "stats_period_s": 0.2, **LIMITS})
    yield url
    ray_cluster.delete(APP)


def replica_stats() -> dict[str, dict]:
    import ray

    refs = [actor.record_routing_stats.remote() for actor in replica_actors(APP).values()]
    return {s["replica"]: s for s in ray.get(refs, timeout=10)}


_handle = None


def ingress_load() -> dict:
    global _handle
    from ray import serve

    if _handle is None:
        _handle = serve.get_app_handle(APP)
    return _handle.load.remote().result(timeout_s=10)


def rss_mb() -> float:
    """Resident memory of the ingress and every LLM replica together (MB)."""
    return (ingress_load()["rss_bytes"] + sum(s["rss_bytes"] for s in replica_stats().values())) / 1e6


class Sampler(threading.Thread):
    """Peak queue lengths while the flood runs (ingress requests in progress; engine waiting queues)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.max_active = self.max_waiting = self.max_running = 0
        self.samples = 0

    def run(self):
        while not self.stop.is_set():
            self.max_active = max(self.max_active, ingress_load()["num_active"])
            for s in replica_stats().values():
                self.max_waiting = max(self.max_waiting, s["num_waiting"])
                self.max_running = max(self.max_running, s["num_running"])
            self.samples += 1
            time.sleep(0.1)


async def one(client: httpx.AsyncClient, i: int):
    start = time.perf_counter()
    response = await client.post("/v1/completions", json={**BODY, "prompt": f"flood {i}"})
    return response, time.perf_counter() - start


def open_loop_flood(base_url: str) -> tuple[list[tuple[httpx.Response, float]], float]:
    """(responses with latencies, median latency of GET /v1/models meanwhile)."""
    async def main():
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            floor: list[float] = []
            stop = asyncio.Event()

            async def probe():
                while not stop.is_set():
                    start = time.perf_counter()
                    assert (await client.get("/v1/models")).status_code == 200
                    floor.append(time.perf_counter() - start)
                    await asyncio.sleep(0.05)

            prober = asyncio.create_task(probe())
            tasks, t0 = [], time.perf_counter()
            for i in range(RATE * SECONDS):
                await asyncio.sleep(max(0.0, t0 + i / RATE - time.perf_counter()))
                tasks.append(asyncio.create_task(one(client, i)))
            results = await asyncio.gather(*tasks)
            stop.set()
            await prober
            return results, statistics.median(floor)

    return asyncio.run(asyncio.wait_for(main(), timeout=120))


def burst(base_url: str) -> list[tuple[httpx.Response, float]]:
    async def main():
        sem = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            async def guarded(i):
                async with sem:
                    return await one(client, i)

            return await asyncio.gather(*(guarded(i) for i in range(BURST)))

    return asyncio.run(asyncio.wait_for(main(), timeout=120))


def summarize(results, floor_s: float | None = None) -> dict:
    ok = [t for r, t in results if r.status_code == 200]
    rejected = [t for r, t in results if r.status_code == 429]
    other = [r.status_code for r, _ in results if r.status_code not in (200, 429)]
    reasons: dict[str, int] = {}
    for r, _ in results:
        if r.status_code == 429:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "overloaded"
            assert r.headers["retry-after"] == "2"
            key = "engine" if "waiting queue" in error["message"] else (
                "queue" if "backpressure" in error["message"] else "ingress")
            reasons[key] = reasons.get(key, 0) + 1
    q = statistics.quantiles(rejected, n=100) if len(rejected) > 1 else [0.0] * 99
    return {"ok": len(ok), "rejected": len(rejected), "other": other, "reasons": reasons,
            "floor_p50_ms": None if floor_s is None else 1e3 * floor_s,
            "reject_p50_ms": 1e3 * q[49], "reject_p90_ms": 1e3 * q[89], "reject_p99_ms": 1e3 * q[98],
            "reject_max_ms": 1e3 * max(rejected or [0.0]), "ok_p50_s": statistics.median(ok) if ok else None}


def test_a_flood_gets_prompt_429s_bounded_queues_and_recovery(base_url):
    wait_until(lambda: len(replica_stats()) == 2, 60, message="2 replicas")
    with httpx.Client(base_url=base_url, timeout=30) as http:
        assert http.post("/v1/completions", json={**BODY, "prompt": "warm"}).status_code == 200

    sampler = Sampler()
    sampler.start()
    try:
        first = summarize(*open_loop_flood(base_url))
        bursty = summarize(burst(base_url))
        rss_after_first = rss_mb()  # after one round of each kind: the high-water mark of a round
        last = summarize(*open_loop_flood(base_url))
        bursty_again = summarize(burst(base_url))
        rss_after_last = rss_mb()
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
    print(f"\nopen-loop flood 1: {first}\nburst 1: {bursty}\nopen-loop flood 2: {last}\nburst 2: {bursty_again}\n"
          f"peak ingress active {sampler.max_active}, engine waiting {sampler.max_waiting}, running "
          f"{sampler.max_running} ({sampler.samples} samples)\nRSS ingress+replicas: after round 1 "
          f"{rss_after_first:.1f} MB, after round 2 {rss_after_last:.1f} MB")

    for s, n in ((first, RATE * SECONDS), (bursty, BURST), (last, RATE * SECONDS), (bursty_again, BURST)):
        assert s["other"] == [] and s["ok"] + s["rejected"] == n  # every request answered: 200 or 429
        assert s["ok"] >= 12 and s["rejected"] >= n // 3
    for s in (first, last):  # prompt: a 429 comes at once, not after queueing until some timeout
        if s["floor_p50_ms"] > BUSY_FLOOR_MS:
            # Ray runs its workers at nice 15: when other jobs saturate the CPUs, every path through Serve
            # slows down together and no latency bound says anything about this code. Correctness and
            # boundedness are still checked.
            warnings.warn(f"machine too busy for the 429 latency bound (GET /v1/models p50 "
                          f"{s['floor_p50_ms']:.0f} ms > {BUSY_FLOOR_MS} ms): {s}")
            continue
        # A 429 that had waited for a slot would take at least one request's service time, so it would arrive
        # about as late as the 200s of the same round. Compared side by side, not against a fixed number of ms:
        # CI's 2 cores slow both together (a fixed 250 ms bound failed there at reject p50 392 ms, ok p50 1.55 s).
        ok_ms = 1e3 * s["ok_p50_s"]
        assert s["reject_p50_ms"] < 0.5 * ok_ms and s["reject_p90_ms"] < ok_ms, s
    assert max(bursty["reject_max_ms"], bursty_again["reject_max_ms"]) < 10_000  # answered, not left hanging
    # Every limit fired.
    assert {k for s in (first, bursty, last, bursty_again) for k in s["reasons"]} == {"ingress", "queue", "engine"}

    # Bounded: queues never exceed their limits; memory does not grow with the number of floods.
    assert sampler.max_active <= LIMITS["ingress_max_ongoing_requests"]
    assert sampler.max_waiting <= LIMITS["engine"]["max_waiting_requests"]
    assert sampler.max_running <= LIMITS["engine"]["max_num_seqs"]
    assert rss_after_last - rss_after_first < 20, "RSS grew by more than 20 MB in a repeated round of floods"

    # Recovery: once the flood stops, the queues drain and requests are served normally.
    wait_until(lambda: all(s["num_unfinished"] == 0 for s in replica_stats().values()), 30,
               message="the engines to drain")
    wait_until(lambda: ingress_load()["num_active"] == 0, 10, message="the ingress to drain")
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for i in range(5):
            start = time.monotonic()
            r = http.post("/v1/completions", json={**BODY, "prompt": f"after {i}"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 25
            assert time.monotonic() - start < 3.0
