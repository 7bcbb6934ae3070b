"""A replica is killed (``ray.kill``) in the middle of a load of 240 requests: nothing is lost.

App ``rel-faults``: three simulated replicas at a quarter of real speed (a decode step is ~28 ms) running at
most 4 sequences each, routed by ``sal``. Load: 240 requests from 30 concurrent clients, alternating
streaming and non-streaming completions of 20-40 tokens, so each replica has ~4 requests generating and a few
waiting. After 80 have completed, the replica that served the latest response is killed. Every request must end
in one of three ways:

* complete: 200 and the whole answer (non-streaming JSON with usage; a stream with its finish_reason and
  ``[DONE]``) — requests that had not produced output when their replica died are re-sent to a survivor;
* cut: a stream that had already sent tokens from the killed replica ends with one ``data: {"error": ...}``
  event (``replica_unavailable``) and ``[DONE]``, and ``halffull_stream_errors_total`` counts it;
* failed cleanly: a non-streaming request that was generating on the killed replica gets a 503
  ``replica_unavailable`` with Retry-After, naming the killed replica (safe for the client to retry).

Anything else (a hang, a dropped connection, another status, a malformed answer) is a lost request. Requests sent from
two seconds after the kill never touch the dead replica (the router dropped it at once).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from halffull.deploy.tokenizer import SimTokenizer
from tests.serve_support import replica_actor, replica_actors, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

APP = "rel-faults"
M = "llama3-8b"
NUM_REQUESTS, CONCURRENCY, KILL_AFTER = 240, 30, 80
TOK = SimTokenizer()


@pytest.fixture(scope="module")
def base_url(ray_cluster):
    url = ray_cluster.deploy(APP, {"num_replicas": 3, "router": "sal", "speedup": 0.25, "stats_period_s": 0.2,
                                   "engine": {"max_num_seqs": 4}})
    yield url
    ray_cluster.delete(APP)


def replica_names() -> set[str]:
    return set(replica_actors(APP))


@dataclass
class Outcome:
    i: int
    stream: bool
    sent_at: float = 0.0
    status: int | None = None
    replica: str | None = None
    retries: int = 0
    retry_after: str | None = None
    tokens: int = 0  # usage's completion_tokens; a cut stream: the tokens of the text it streamed
    max_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    done: bool = False
    error: dict | None = None
    failure: str | None = None  # why it counts as lost
    events: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.failure:
            return "lost"
        if self.status == 200 and self.error is None and self.finish_reason and (self.done or not self.stream):
            return "complete"
        if self.stream and self.status == 200 and self.error and self.done and self.tokens > 0:
            return "cut"
        if (not self.stream and self.status == 503 and self.error and self.error["code"] == "replica_unavailable"
                and self.retry_after):
            return "failed_cleanly"
        return "lost"


async def one(client: httpx.AsyncClient, i: int, rng: random.Random) -> Outcome:
    out = Outcome(i, stream=i % 2 == 0, sent_at=time.monotonic())
    out.max_tokens = rng.randrange(20, 41)
    body = {"model": M, "prompt": f"request {i} " + "x" * rng.randrange(10, 400), "max_tokens": out.max_tokens,
            "ignore_eos": True, "stream": out.stream}
    if out.stream:
        body["stream_options"] = {"include_usage": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            out.status = response.status_code
            out.replica = response.headers.get("x-halffull-replica")
            out.retries = int(response.headers.get("x-halffull-retries", "0"))
            out.retry_after = response.headers.get("retry-after")
            if not out.stream or response.status_code != 200:
                payload = json.loads(await response.aread())
                out.error = payload.get("error")
                if out.error is None:
                    out.tokens = payload["usage"]["completion_tokens"]
                    out.text = payload["choices"][0]["text"]
                    out.finish_reason = payload["choices"][0]["finish_reason"]
                return out
            async for line in response.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    continue
                data = json.loads(line.removeprefix("data: "))
                if "error" in data:
                    out.error = data["error"]
                elif data.get("usage"):
                    out.tokens = data["usage"]["completion_tokens"]
                elif data["choices"][0]["finish_reason"]:
                    out.finish_reason = data["choices"][0]["finish_reason"]
                elif data["choices"][0]["text"]:
                    out.text += data["choices"][0]["text"]  # one event per batch: one or more tokens
            if out.error is not None:
                out.tokens = len(TOK.encode(out.text))
    except Exception as exc:  # a hang (timeout), a dropped connection, a malformed answer
        out.failure = f"{type(exc).__name__}: {exc}"
    return out


def test_killing_a_replica_under_load_loses_nothing(base_url):
    import ray

    before = wait_until(lambda: (n := replica_names()) and len(n) == 3 and n, 60, message="3 replicas")
    killed: dict = {}

    async def main():
        rng = random.Random(8)
        sem = asyncio.Semaphore(CONCURRENCY)
        completed: list[Outcome] = []
        limits = httpx.Limits(max_connections=CONCURRENCY + 5)
        async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(60.0), limits=limits) as client:

            async def guarded(i: int) -> Outcome:
                async with sem:
                    out = await one(client, i, rng)
                completed.append(out)
                if len(completed) == KILL_AFTER and not killed:
                    victim = next(o.replica for o in reversed(completed) if o.replica in before)
                    actor = replica_actor(APP, victim)
                    stats = await actor.record_routing_stats.remote()
                    ray.kill(actor, no_restart=True)
                    killed.update(replica=victim, at=time.monotonic(), running=stats["num_running"],
                                  waiting=stats["num_waiting"])
                return out

            return await asyncio.gather(*(guarded(i) for i in range(NUM_REQUESTS)))

    outcomes = asyncio.run(asyncio.wait_for(main(), timeout=180))
    victim, killed_at = killed["replica"], killed["at"]
    kinds: dict[str, list[Outcome]] = {}
    for o in outcomes:
        kinds.setdefault(o.kind, []).append(o)
    cut, failed, retried = kinds.get("cut", []), kinds.get("failed_cleanly", []), [o for o in outcomes if o.retries]
    print(f"\nkilled {victim} after {KILL_AFTER} of {NUM_REQUESTS} requests, with {killed['running']} requests "
          f"generating and {killed['waiting']} waiting there: "
          f"{ {k: len(v) for k, v in kinds.items()} }; streams cut {len(cut)}, non-streaming 503 {len(failed)}, "
          f"re-sent and completed {len(retried)} (re-sends {sum(o.retries for o in outcomes)}), lost "
          f"{len(kinds.get('lost', []))}")

    assert not kinds.get("lost"), [(o.i, o.status, o.failure, o.error) for o in kinds["lost"]][:5]
    # No token lost or doubled, however the events batched them and whether or not the request was re-sent.
    for o in kinds["complete"]:
        assert o.tokens == o.max_tokens == len(TOK.encode(o.text)), (o.i, o.tokens, o.max_tokens, o.retries)
    assert len(kinds["complete"]) + len(cut) + len(failed) == NUM_REQUESTS
    assert all(o.replica == victim for o in failed)  # only requests that were generating there
    # A cut stream had started on the victim and had sent tokens; its error event is the replica failure.
    for o in cut:
        assert o.replica == victim and o.tokens > 0 and o.error["code"] == "replica_unavailable"
    # Requests that had not produced output on the victim completed elsewhere.
    assert retried and all(o.kind == "complete" and o.replica != victim for o in retried if not o.stream)
    # The router dropped the dead replica at once: nothing sent from 2 s after the kill went there.
    late = [o for o in outcomes if o.sent_at > killed_at + 2.0]
    assert late and all(o.replica != victim and o.retries == 0 for o in late)

    # The cut streams are counted in Prometheus.
    with httpx.Client(base_url=base_url, timeout=30) as http:
        def counted():
            lines = [line for line in http.get("/metrics").text.splitlines()
                     if line.startswith("ray_halffull_stream_errors_total") and 'code="replica_unavailable"' in line]
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines) >= len(cut) and lines

        if cut:
            wait_until(counted, 60, interval=1.0, message="halffull_stream_errors_total to count the cut streams")

        def resends():
            lines = [line for line in http.get("/metrics").text.splitlines()
                     if line.startswith("ray_halffull_retries_total")]
            total = sum(float(line.rsplit(" ", 1)[1]) for line in lines)
            return total >= len(retried) and (total,)

        # Streams re-sent before their first token are not visible in their headers; the metric counts all.
        (total,) = wait_until(resends, 60, interval=1.0, message="halffull_retries_total")
        print(f"re-sends counted by halffull_retries_total: {total:.0f}")
    # Serve replaces the killed replica.
    wait_until(lambda: (n := replica_names()) and len(n) == 3 and victim not in n, 90, interval=1.0,
               message="Serve to replace the killed replica")
    # Every run, completed, cut or re-sent, let go of the token channel.
    from ray import serve

    assert serve.get_app_handle(APP).load.remote().result(timeout_s=10)["num_channel_runs"] == 0
