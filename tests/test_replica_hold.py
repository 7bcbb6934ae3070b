"""``hold``: a non-streaming request without stop strings gets its first batch at once and every later token in
one piece at the end, on the Serve stream and on the token channel alike (replicas/deployment.py); the ingress
asks for it only where nobody reads the text before the end (deploy/serving.py). Without Ray: the replica class
itself, the simulated engine, a real loopback token channel."""

from __future__ import annotations

import asyncio

import pytest

import halffull.replicas.deployment as deployment
from halffull.deploy.channel import ChannelClient
from halffull.deploy.protocol.chat import ChatCompletionRequest
from halffull.deploy.protocol.completions import CompletionRequest
from halffull.deploy.serving import GenerationServing
from halffull.replicas.channel import TokenChannel
from halffull.replicas.deployment import held
from tests.helpers import drain_batches

pytestmark = pytest.mark.timeout(60)

NUM_TOKENS = 40


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def make_replica(monkeypatch, interval_ms: float):
    """The LLMReplica class outside Serve: no gRPC rebinding (no Serve replica here), channel on loopback."""
    monkeypatch.setattr(deployment, "bind_replica_grpc_to_node_ip", lambda: None)
    replica = deployment.LLMReplica.func_or_class(backend="sim", engine={"speedup": 10.0},  # ~1 ms steps
                                                  stream_interval_ms=interval_ms)
    replica.channel, replica._channel_host = TokenChannel(interval_ms / 1000), "127.0.0.1"
    return replica


def first_batch_ok(batch, reference) -> bool:
    """The first batch: what the engine had produced when the replica read it (one token, a few more when the
    replica lagged on a loaded machine), a prefix of the answer and never the whole of it."""
    return isinstance(batch, list) and 1 <= len(batch) < NUM_TOKENS and batch == reference[:len(batch)]


def request(rid: str, **extra):
    return {"request_id": rid, "prompt_token_ids": list(range(300, 332)), "max_tokens": NUM_TOKENS,
            "ignore_eos": True, **extra}


async def serve_stream(replica, client: ChannelClient, tokens, req: dict) -> list:
    """Run ``req`` on ``replica`` and hand its Serve stream to ``tokens`` as the ingress does (deploy/run.py:
    attach on the start event, the first batch where it says, the end event's count); the stream's items."""
    items = []
    async for item in replica.generate(req):
        items.append(item)
        if isinstance(item, list):
            tokens.push_first(item)
        elif item["event"] == "start":
            if item.get("first") == "channel":
                tokens.first_on_channel()
            await client.attach(item["channel"], tokens)
        elif item["event"] == "end":
            tokens.end(item["num_output_tokens"])
    return items


async def reference_tokens(replica) -> list[int]:
    items = [item async for item in replica.generate(request("ref"))]
    return [t for item in items if isinstance(item, list) for t in item]


@pytest.mark.parametrize("hold, max_items", [(True, 2), (False, NUM_TOKENS)], ids=["hold", "paced"])
def test_serve_stream_path(monkeypatch, hold, max_items):
    async def main():
        replica = make_replica(monkeypatch, interval_ms=0.0)
        items = [item async for item in replica.generate(request("r", hold=hold))]
        return items, await reference_tokens(replica)

    items, reference = run(main())
    assert items[0]["event"] == "start" and items[-1]["event"] == "end"
    batches = items[1:-1]
    assert [t for b in batches for t in b] == reference and len(reference) == NUM_TOKENS
    assert first_batch_ok(batches[0], reference)  # never held back
    assert items[-1]["num_output_tokens"] == NUM_TOKENS
    assert len(batches) <= max_items
    if not hold:
        assert len(batches) > 2  # one item per ~1 ms step at interval 0: what hold saves


@pytest.mark.parametrize("hold", [True, False], ids=["hold", "per-step"])
def test_token_channel_path(monkeypatch, hold):
    async def main():
        replica = make_replica(monkeypatch, interval_ms=0.0)
        client = ChannelClient()
        tokens = client.register("r", first_on_stream=True)
        items = await serve_stream(replica, client, tokens, request("r", sink=client.sink_id, hold=hold))
        first, end = items[1], items[-1]  # the first connection to this replica: the first batch on the stream
        got = [t for batch in await drain_batches(tokens) for t in batch]
        frames = replica.channel.sink(client.sink_id).num_frames
        reference = await reference_tokens(replica)
        replica.channel.close()
        client.close()
        return first, end, got, frames, reference

    first, end, got, frames, reference = run(main())
    assert got == reference and first_batch_ok(first, reference) and end["num_output_tokens"] == NUM_TOKENS
    if hold:
        assert frames == 1  # every token after the first in one frame
    else:
        assert frames > 2


@pytest.mark.parametrize("steps, want", [
    ([[1]], [[1]]),
    ([[1], [2], [3, 4], [5]], [[1], [2, 3, 4, 5]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
    ([], []),
], ids=["one-token", "rest-in-one", "first-batch-kept-whole", "empty"])
def test_held(steps, want):
    async def source():
        for step in steps:
            await asyncio.sleep(0)
            yield list(step)

    async def main():
        firsts = []
        out = [b async for b in held(source(), on_first=lambda: firsts.append(1))]
        return out, firsts

    out, firsts = run(main())
    assert out == want and len(firsts) == (1 if steps else 0)


class FakeHandle:
    """Records the request dicts the ingress sends (``llm.remote``)."""

    def __init__(self):
        self.sent = []

    def remote(self, request, routing=None):
        self.sent.append(request)
        return None


@pytest.mark.parametrize("body, want_hold", [
    (CompletionRequest(model="m", prompt="hi", stream=False), True),
    (CompletionRequest(model="m", prompt="hi", stream=True), False),
    (CompletionRequest(model="m", prompt="hi", stream=False, stop=["."]), False),  # stop strings: read as it comes
    (ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]), True),
    (ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True), False),
], ids=["completion", "completion-streamed", "completion-stop", "chat", "chat-streamed"])
def test_the_ingress_asks_for_hold_only_where_nobody_reads_before_the_end(body, want_hold):
    llm = FakeHandle()
    serving = GenerationServing(llm, None, model="m", max_model_len=100, backend="sim", prefix_block_size=64,
                                max_output_tokens=None, replica_retries=0, request_timeout_s=None, retry_after_s=1.0,
                                metrics=None, channel=ChannelClient())

    async def main():
        serving._run(body, [1, 2, 3], 10, "cmpl-x", 0.0)._call(0)

    run(main())
    assert llm.sent[0].get("hold", False) is want_hold and llm.sent[0]["sink"]


@pytest.mark.parametrize("hold", [False, True], ids=["streamed", "hold"])
def test_with_its_connection_up_the_first_batch_comes_on_the_channel_at_once(monkeypatch, hold):
    """A second request of the same ingress: its connection is up, so the start event says "first": "channel",
    nothing but events comes on the Serve stream, and the first channel frame holds the first token alone."""
    async def main():
        replica = make_replica(monkeypatch, interval_ms=20.0)
        client = ChannelClient()
        out = {}
        for rid in ("a", "b"):
            tokens = client.register(rid, first_on_stream=True)
            reader = asyncio.ensure_future(drain_batches(tokens))  # each batch as it comes, as the ingress
            items = await serve_stream(replica, client, tokens, request(rid, sink=client.sink_id, hold=hold))
            out[rid] = items, await reader
        reference = await reference_tokens(replica)
        replica.channel.close()
        client.close()
        return out, reference

    out, reference = run(main())
    items_a, reads_a = out["a"]
    items_b, reads_b = out["b"]
    assert "first" not in items_a[0] and first_batch_ok(items_a[1], reference)  # no connection yet: Serve stream
    assert items_b[0].get("first") == "channel"
    assert all(isinstance(item, dict) for item in items_b)  # no token on the Serve stream
    assert first_batch_ok(reads_b[0], reference)  # read alone, not held to the end
    assert [t for r in reads_b for t in r] == reference and [t for r in reads_a for t in r] == reference
