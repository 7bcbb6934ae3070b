"""Clients that disconnect mid-stream: every engine request is aborted and every KV block returns to the pool.

App ``rel-cancel``: two simulated replicas at a quarter of real speed (a 50-request decode step is ~35 ms), so
100 concurrent streams produce ~3,000 SSE events a second — enough to be mid-generation, not enough to swamp
two CPU cores. 100 streams of 2,000 tokens each are opened at once; each client reads three tokens and hangs
up. Afterwards, on every replica: no unfinished request, no open token stream, the free-block count back to
its starting value; the ingress holds no request.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.serve_support import replica_actors, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

APP = "rel-cancel"
M = "llama3-8b"
NUM_STREAMS = 100


@pytest.fixture(scope="module", params=["grpc", "actor"])
def base_url(ray_cluster, request):
    """The app, its ingress calling the LLM replicas over gRPC (the default) or over Ray actor calls: a
    cancelled call must reach the replica's stream on both transports."""
    url = ray_cluster.deploy(APP, {"num_replicas": 2, "speedup": 0.25, "stats_period_s": 0.2,
                                   "replica_calls": request.param})
    yield url
    ray_cluster.delete(APP)


def replica_stats() -> dict[str, dict]:
    import ray

    refs = {rid: actor.record_routing_stats.remote() for rid, actor in replica_actors(APP).items()}
    return {rid: ray.get(ref, timeout=10) for rid, ref in refs.items()}


def ingress_load() -> dict:
    from ray import serve

    return serve.get_app_handle(APP).load.remote().result(timeout_s=10)


async def open_read_hang_up(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
    body = {"model": M, "prompt": [300 + (i * 7 + k) % 500 for k in range(300)], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        replica = response.headers["x-halffull-replica"]
        tokens = 0
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert "error" not in json.loads(line[6:])
                tokens += 1
                if tokens == 3:
                    break  # leaving the block closes the connection mid-stream
    return replica, tokens


def test_cancelled_streams_return_every_block(base_url):
    before = wait_until(lambda: (s := replica_stats()) and len(s) == 2 and s, 60, message="2 replicas")
    for stats in before.values():
        assert stats["num_unfinished"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]

    async def main():
        limits = httpx.Limits(max_connections=NUM_STREAMS + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(open_read_hang_up(client, i) for i in range(NUM_STREAMS)))

    results = asyncio.run(asyncio.wait_for(main(), timeout=90))
    assert all(tokens == 3 for _, tokens in results)
    assert {replica for replica, _ in results} == set(before), "both replicas served some streams"

    def back_to_start():
        now = replica_stats()
        done = all(s["num_unfinished"] == 0 and s["num_streams"] == 0 for s in now.values())
        return done and now

    after = wait_until(back_to_start, 30, interval=0.5, message="every replica to abort its cancelled streams")
    for rid, stats in after.items():
        assert stats["num_free_blocks"] == before[rid]["num_free_blocks"] == stats["num_total_blocks"], rid
    aborted = sum(after[r]["num_aborted"] - before[r]["num_aborted"] for r in after)
    finished = sum(after[r]["num_finished"] - before[r]["num_finished"] for r in after)
    assert (aborted, finished) == (NUM_STREAMS, 0)
    wait_until(lambda: ingress_load()["num_active"] == 0, 10, message="the ingress to release every request")
    assert ingress_load()["num_channel_runs"] == 0  # no cancelled run left registered on the token channel
