"""Two ingress replicas; one is killed (``ray.kill``) in the middle of a streaming load: its in-flight clients get
a clean error, never a hang, and the requests on the other ingress replica are unaffected.

App ``rel-ingress``: two simulated replicas at half speed, two ingress replicas behind the cluster's front
(HAProxy, deploy/ray_env.py), the token channel on (the default). Load: 24 clients streaming 40-token completions back to back for ~8 s. About
2.5 s in, the ingress replica that served the latest response (``x-halffull-ingress``) is killed. Every request
must end one of these ways:

* complete: 200, ``[DONE]``, ``usage.completion_tokens`` == 40 == the tokens of the streamed text (no token lost
  or doubled, however the events batched them);
* failed cleanly, only if it was in flight on the killed ingress (or had no headers yet) when it died: an HTTP
  error status, an error event, or the connection closed before the end of the body (the client sees it at once).

Anything else is lost: a timeout (hang), an incomplete answer from the surviving ingress, a wrong token count.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import pytest

from halffull.deploy.tokenizer import SimTokenizer
from tests.serve_support import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

APP = "rel-ingress"
M = "llama3-8b"
CLIENTS, MAX_TOKENS, DURATION_S, KILL_AT_S = 24, 40, 8.0, 2.5
TOK = SimTokenizer()


@pytest.fixture(scope="module")
def base_url(ray_cluster):
    url = ray_cluster.deploy(APP, {"num_replicas": 2, "ingress_replicas": 2, "speedup": 0.5, "stats_period_s": 0.2})
    yield url
    ray_cluster.delete(APP)


def ingress_actors() -> dict:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#OpenAIIngress#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return {name[len(prefix):]: ray.get_actor(name, namespace="serve") for name in names}


@dataclass
class Outcome:
    sent_at: float
    ended_at: float = 0.0
    ingress: str | None = None
    status: int | None = None
    done: bool = False
    usage_tokens: int | None = None
    text: str = ""
    error: str | None = None  # an error event, an error status or a broken connection
    hang: bool = False

    @property
    def complete(self) -> bool:
        return (self.status == 200 and self.done and self.error is None and self.usage_tokens == MAX_TOKENS
                and len(TOK.encode(self.text)) == MAX_TOKENS)


async def one(client: httpx.AsyncClient, i: int) -> Outcome:
    out = Outcome(sent_at=time.monotonic())
    body = {"model": M, "prompt": f"client request {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            out.status = response.status_code
            out.ingress = response.headers.get("x-halffull-ingress")
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}"
                await response.aread()
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    continue
                data = json.loads(line.removeprefix("data: "))
                if "error" in data:
                    out.error = f"error event {data['error'].get('code')}"
                elif data.get("usage"):
                    out.usage_tokens = data["usage"]["completion_tokens"]
                elif data["choices"][0]["text"]:
                    out.text += data["choices"][0]["text"]
    except httpx.TimeoutException as exc:
        out.hang, out.error = True, f"{type(exc).__name__}"
    except httpx.HTTPError as exc:  # the connection closed before the end of the body
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.ended_at = time.monotonic()
    return out


def test_killing_an_ingress_replica_mid_load(base_url):
    import ray

    wait_until(lambda: len(ingress_actors()) == 2, 60, message="2 ingress replicas")
    killed: dict = {}

    async def main():
        outcomes: list[Outcome] = []
        start = time.monotonic()
        limits = httpx.Limits(max_connections=CLIENTS + 4)
        async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(30.0), limits=limits) as client:

            async def worker(w: int):
                i = 0
                while time.monotonic() - start < DURATION_S:
                    outcomes.append(await one(client, w * 1000 + i))
                    i += 1

            async def killer():
                await asyncio.sleep(KILL_AT_S)
                latest = max((o for o in outcomes if o.ingress), key=lambda o: o.ended_at)
                actor = ingress_actors()[latest.ingress]
                ray.kill(actor, no_restart=True)
                killed.update(ingress=latest.ingress, at=time.monotonic())

            await asyncio.gather(killer(), *(worker(w) for w in range(CLIENTS)))
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(main(), timeout=120))
    victim, at = killed["ingress"], killed["at"]
    in_flight = [o for o in outcomes if o.sent_at < at < o.ended_at]
    failed = [o for o in outcomes if not o.complete]
    print(f"\nkilled ingress {victim}: {len(outcomes)} requests, {len(in_flight)} in flight at the kill, "
          f"{len(failed)} failed: {sorted({o.error for o in failed})}")

    assert not [o for o in outcomes if o.hang]
    survivor = [o for o in outcomes if o.ingress and o.ingress != victim]
    assert survivor and all(o.complete for o in survivor), [o for o in survivor if not o.complete][:3]
    for o in failed:  # only what the dead ingress held, ended at once with an error the client sees
        assert o.error and o.ingress in (victim, None), o
        assert o.sent_at < at + 1.0 < o.ended_at + 1.0 or o.sent_at < at, o
    assert [o for o in in_flight if o.ingress == victim], "nothing was in flight on the killed ingress"
    late = [o for o in outcomes if o.sent_at > at + 3.0]
    assert late and all(o.complete for o in late)
    # Serve replaces the killed ingress replica.
    wait_until(lambda: (a := ingress_actors()) and len(a) == 2 and victim not in a, 90, interval=1.0,
               message="Serve to replace the killed ingress replica")
