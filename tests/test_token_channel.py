"""The token channel without Ray: the replica's TokenChannel (replicas/channel.py) and the ingress's
ChannelClient (deploy/channel.py) over a real loopback TCP connection in one event loop."""

from __future__ import annotations

import asyncio

import pytest

import halffull.deploy.channel as ingress_channel
from halffull.deploy.channel import ChannelClient, ChannelError, RunTokens
from halffull.replicas.channel import MAX_FRAME_BYTES, FrameDecoder, TokenChannel, encode_frame
from tests.helpers import drain_batches

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def drain(tokens: RunTokens) -> list[int]:
    return [token for batch in await drain_batches(tokens) for token in batch]


@pytest.mark.parametrize("chunks", [[b"all"], [b"byte"], [b"split-header"]], ids=["whole", "bytewise", "split"])
def test_frame_decoder_reassembles_frames(chunks):
    frames = [{"a": [1, 2, 3]}, {"b": [4]}, {}]
    data = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    if chunks == [b"byte"]:
        pieces = [data[i:i + 1] for i in range(len(data))]
    elif chunks == [b"split-header"]:
        pieces = [data[:2], data[2:7], data[7:]]
    else:
        pieces = [data]
    out = [f for piece in pieces for f in decoder.feed(piece)]
    assert out == frames


def test_frame_decoder_refuses_an_oversized_frame():
    with pytest.raises(ValueError):
        FrameDecoder().feed((MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"{}")


def test_one_frame_per_interval_carries_every_stream_and_an_idle_sink_sends_at_once():
    async def main():
        server = TokenChannel(interval_s=0.5)
        address = await server.start("127.0.0.1")
        client = ChannelClient()
        a, b = client.register("a"), client.register("b")
        sink = server.sink(client.sink_id)
        await client.attach(address, a)
        await client.attach(address, b)
        while sink.transport is None:  # the hello frame names the sink
            await asyncio.sleep(0.001)
        loop = asyncio.get_running_loop()
        sink.push("a", [1])
        sink.push("b", [10])
        t0 = loop.time()
        first = [await a.next_batch(), await b.next_batch()]
        first_latency = loop.time() - t0
        frames_after_first = sink.num_frames
        # later tokens of both streams within one interval: one frame
        sink.push("a", [2])
        sink.push("b", [11, 12])
        sink.push("a", [3])
        second = [await a.next_batch(), await b.next_batch()]
        frames = sink.num_frames - frames_after_first
        sink.finish("a")
        a.end(3)
        b.end(3)
        rest = [await drain(a), await drain(b)]
        server.close()
        client.close()
        return first, first_latency, frames_after_first, second, frames, rest

    first, first_latency, frames_first, second, frames, rest = run(main())
    assert first == [[1], [10]] and frames_first == 1 and first_latency < 0.25  # not held for the interval
    assert second == [[2, 3], [11, 12]] and frames == 1
    assert rest == [[], []]


def test_tokens_pushed_before_the_ingress_connects_wait_for_it():
    async def main():
        server = TokenChannel(interval_s=0.0)
        address = await server.start("127.0.0.1")
        client = ChannelClient()
        server.sink(client.sink_id).push("r", [5, 6])
        tokens = client.register("r")
        await client.attach(address, tokens)
        tokens.end(2)
        got = await drain(tokens)
        server.close()
        client.close()
        return got

    assert run(main()) == [5, 6]


def test_a_broken_connection_fails_its_runs_and_a_missing_tail_never_hangs(monkeypatch):
    monkeypatch.setattr(ingress_channel, "END_GRACE_S", 0.1)

    async def main():
        server = TokenChannel(interval_s=0.0)
        address = await server.start("127.0.0.1")
        client = ChannelClient()
        tokens, late = client.register("r"), client.register("late")
        await client.attach(address, tokens)
        sink = server.sink(client.sink_id)
        while sink.transport is None:
            await asyncio.sleep(0.001)
        server.close()  # the replica process went away
        with pytest.raises(ChannelError):
            await tokens.next_batch()
        late.end(3)  # the end event counts 3 tokens that never come
        with pytest.raises(ChannelError, match="never arrived"):
            await late.next_batch()
        client.close()

    run(main())


def test_unregistered_requests_are_dropped_and_forgotten():
    async def main():
        server = TokenChannel(interval_s=0.0)
        address = await server.start("127.0.0.1")
        client = ChannelClient()
        tokens = client.register("gone")
        await client.attach(address, tokens)
        client.unregister("gone")
        sink = server.sink(client.sink_id)
        while sink.transport is None:
            await asyncio.sleep(0.001)
        sink.push("gone", [1, 2])
        await asyncio.sleep(0.02)
        server.close()
        client.close()
        return client.runs, tokens.tokens

    runs, buffered = run(main())
    assert runs == {} and buffered == []


def test_the_first_batch_from_the_serve_stream_is_read_alone_and_channel_tokens_that_overtake_it_wait():
    async def main():
        tokens = RunTokens("r", first_on_stream=True)
        tokens.push([2, 3])  # the channel overtook the Serve stream
        reader = asyncio.ensure_future(tokens.next_batch())
        await asyncio.sleep(0.01)
        waited = not reader.done()
        tokens.push_first([1])
        first = await reader
        tokens.push([4])
        second = await tokens.next_batch()
        tokens.end(4)
        return waited, first, second, await drain(tokens)

    waited, first, second, rest = run(main())
    assert waited and first == [1] and second == [2, 3, 4] and rest == []


@pytest.mark.parametrize("pushes, expected, batches", [
    ([("first", [7])], 1, [[7]]),
    ([("first", [7, 8]), ("channel", [9])], 3, [[7, 8], [9]]),
    ([("channel", [9]), ("first", [7, 8])], 3, [[7, 8], [9]]),
    ([], 0, []),  # no output token: the end alone ends the run
], ids=["one", "in-order", "overtaken", "empty"])
def test_first_on_stream_batches(pushes, expected, batches):
    async def main():
        tokens = RunTokens("r", first_on_stream=True)
        for source, ids in pushes:
            (tokens.push_first if source == "first" else tokens.push)(ids)
        tokens.end(expected)
        return await drain_batches(tokens)

    assert run(main()) == batches


@pytest.mark.parametrize("pushes, expected, batches", [
    ([("start", None), ("channel", [7])], 1, [[7]]),
    ([("start", None), ("channel", [7]), ("channel", [8, 9])], 3, [[7], [8, 9]]),
    ([("channel", [7]), ("start", None), ("channel", [8])], 2, [[7], [8]]),  # its frame overtook the start
    ([("start", None)], 0, []),  # no output token
], ids=["one", "first-frame-alone", "overtook-the-start", "empty"])
def test_first_on_channel_batches(pushes, expected, batches):
    """The start event says "first": "channel": the first channel frame is the first batch, read alone."""
    async def main():
        tokens = RunTokens("r", first_on_stream=True)
        out = []
        for source, ids in pushes:
            if source == "start":
                tokens.first_on_channel()
            else:
                tokens.push(ids)
                if tokens.first or (tokens.first == () and tokens.tokens):  # read what is readable, as it comes
                    out.append(await tokens.next_batch())
        tokens.end(expected)
        return out + await drain_batches(tokens)

    assert run(main()) == batches
