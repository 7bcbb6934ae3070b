"""Batched token delivery, without Ray: the simulated engine's batches (replicas/sim/realtime.py), the replica's
pacing (replicas/deployment.py ``paced``) and the ingress's text per batch with exact ``usage``
(deploy/serving.py ``_Output`` over deploy/run.py ``Run``)."""

from __future__ import annotations

import asyncio

import pytest

from halffull.deploy.protocol.completions import CompletionRequest
from halffull.deploy.run import Run
from halffull.deploy.serving import _Output
from halffull.deploy.tokenizer import SimTokenizer
from halffull.replicas.backend import GenerateRequest, RequestOutcome
from halffull.replicas.deployment import paced
from halffull.replicas.sim.realtime import AsyncSimEngine

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def request(rid: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(rid, list(range(300, 332)), max_tokens, ignore_eos=True)


# ---- the simulated engine -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lag_s, max_batch_at_least", [(0.0, 1), (0.05, 3)], ids=["keeps-up", "lags"])
def test_engine_batches_hold_every_token_once_and_coalesce_when_the_consumer_lags(lag_s, max_batch_at_least):
    async def main():
        eng = AsyncSimEngine.from_config({"speedup": 10.0})  # ~1 ms steps
        outcome = RequestOutcome()
        stream = eng.submit(request("r", 40), outcome)
        batches = []
        async for batch in stream.batches():
            batches.append(batch)
            await asyncio.sleep(lag_s)
        reference = [t async for t in eng.generate(request("ref", 40))]  # same prompt: same tokens
        await eng.close()
        return batches, outcome, reference

    batches, outcome, reference = run(main())
    assert [t for b in batches for t in b] == reference and len(reference) == 40
    assert outcome.num_output_tokens == 40 and outcome.finish_reason == "length"
    assert len(batches[0]) == 1  # the first token alone: the prefill step samples one
    assert max(len(b) for b in batches) >= max_batch_at_least
    if lag_s == 0.0:
        assert all(len(b) == 1 for b in batches)  # one step, one token, one batch


def test_closing_a_batch_stream_aborts_the_request_and_frees_its_blocks():
    async def main():
        eng = AsyncSimEngine.from_config({"speedup": 10.0})
        stream = eng.submit(request("r", 1000))
        batches = stream.batches()
        await batches.__anext__()
        await batches.aclose()
        await asyncio.sleep(0.01)
        occupancy = eng.occupancy()
        await eng.close()
        return occupancy

    occ = run(main())
    assert occ["num_unfinished"] == 0 and occ["num_streams"] == 0 and occ["num_aborted"] == 1
    assert occ["num_free_blocks"] == occ["num_total_blocks"]


# ---- the replica's pacing ---------------------------------------------------------------------------------------
class Source:
    """A batch source fed by a producer task: ``take`` hands over everything produced so far (as the engine)."""

    def __init__(self, outcome: RequestOutcome):
        self.tokens, self.ended, self.outcome = [], False, outcome
        self.event = asyncio.Event()

    def put(self, token: int) -> None:
        self.tokens.append(token)
        self.event.set()

    def end(self) -> None:
        self.ended = True
        self.outcome.finish_reason = "length"
        self.event.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[int]:
        while not self.tokens:
            if self.ended:
                raise StopAsyncIteration
            self.event.clear()
            await self.event.wait()
        out, self.tokens = self.tokens, []
        return out


@pytest.mark.parametrize(
    "interval_ms, step_ms, num_tokens, max_items",
    [(0, 2, 30, 30), (20, 2, 30, 10), (20, 30, 5, 5)],
    ids=["no-interval-one-item-per-step", "interval-coalesces", "slow-steps-not-delayed"],
)
def test_paced_sends_the_first_token_at_once_and_coalesces_the_rest(interval_ms, step_ms, num_tokens, max_items):
    async def main():
        outcome = RequestOutcome()
        source = Source(outcome)
        loop = asyncio.get_running_loop()
        produced, received = {}, []

        async def produce():
            for t in range(num_tokens):
                await asyncio.sleep(step_ms / 1000)
                produced[t] = loop.time()
                source.put(t)
            source.end()

        task = loop.create_task(produce())
        firsts = []
        async for batch in paced(source, outcome, interval_ms / 1000, on_first=lambda: firsts.append(loop.time())):
            received.append((loop.time(), batch))
        await task
        return produced, received, firsts

    produced, received, firsts = run(main())
    tokens = [t for _, b in received for t in b]
    assert tokens == list(range(num_tokens))  # nothing lost, nothing twice, in order
    assert received[0][1] == [0] and received[0][0] - produced[0] < 0.005  # the first token is never held back
    assert len(firsts) == 1
    assert len(received) <= max_items
    # no token waits more than the interval plus one step (and scheduling slack)
    worst = max(at - produced[t] for at, b in received for t in b)
    assert worst < (interval_ms + step_ms) / 1000 + 0.015


# ---- the ingress: text per batch, usage exact ----------------------------------------------------------------
class FakeStream:
    def __init__(self, items):
        self.items = list(items)

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.items = []


def output_of(batches, **body):
    tok = SimTokenizer()
    ids = [[t for t in b] for b in batches]
    items = [{"event": "start", "replica": "A"}, *ids, {"event": "end", "finish_reason": "length",
                                                        "num_prompt_tokens": 3}]
    stream = FakeStream(items)
    r = Run(lambda attempt: stream, "cmpl-x", 0.0)
    body = CompletionRequest(model="m", prompt="x", **body)
    return tok, r, _Output(tok, body, r)


@pytest.mark.parametrize(
    "words, batch_sizes, stop, want_text, want_tokens, want_pieces",
    [
        (["a", "b", "c", "d"], [1, 3], None, "a b c d", 4, 2),
        (["a", "b", "c", "d"], [1, 1, 1, 1], None, "a b c d", 4, 4),
        (["a", "b", "c", "d", "e"], [1, 4], ["c"], "a b ", 3, 2),
        (["a", "c", "d"], [3], ["c"], "a ", 2, 1),
    ],
    ids=["one-event-per-batch", "one-token-batches", "stop-inside-a-batch", "stop-in-the-first-batch"],
)
def test_text_per_batch_and_usage_counts_tokens_not_events(words, batch_sizes, stop, want_text, want_tokens,
                                                          want_pieces):
    tok = SimTokenizer()
    ids = tok.encode(" ".join(words))
    assert len(ids) == len(words)  # one token per word in the simulated tokenizer's vocabulary
    batches, at = [], 0
    for n in batch_sizes:
        batches.append(ids[at:at + n])
        at += n

    async def main():
        _, r, out = output_of(batches, stop=stop)
        await r.start()
        pieces = [p async for p in out.texts()]
        return pieces, r

    pieces, r = run(main())
    assert "".join(pieces) == want_text and len(pieces) == want_pieces
    assert r.usage()["completion_tokens"] == want_tokens


def test_deliver_to_hands_every_token_over_from_the_step_loop():
    async def main():
        eng = AsyncSimEngine.from_config({"speedup": 10.0})
        outcome = RequestOutcome()
        stream = eng.submit(request("r", 30), outcome)
        first = await stream.next_batch()  # some read the usual way first: nothing lost in between
        got = []
        stream.deliver_to(got.append)
        await stream.ended()
        reference = [t async for t in eng.generate(request("ref", 30))]
        await eng.close()
        return first, got, outcome, reference

    first, got, outcome, reference = run(main())
    assert first + [t for b in got for t in b] == reference and len(reference) == 30
    assert outcome.num_output_tokens == 30 and outcome.finish_reason == "length"
    assert all(len(b) >= 1 for b in got)


def test_cancelling_ended_aborts_the_request():
    async def main():
        eng = AsyncSimEngine.from_config({"speedup": 10.0})
        stream = eng.submit(request("r", 1000))
        stream.deliver_to(lambda tokens: None)
        waiter = asyncio.ensure_future(stream.ended())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        occ = eng.occupancy()
        await eng.close()
        return occ

    occ = run(main())
    assert occ["num_unfinished"] == 0 and occ["num_free_blocks"] == occ["num_total_blocks"]
