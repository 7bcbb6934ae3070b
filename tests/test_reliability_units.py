"""Reliability pieces without a Ray cluster: the engine's waiting-queue limit and stream ownership, the
ingress's re-send / deadline logic (``_Run``) on fake response streams, error mapping, API-key handling, the
max_tokens cap.

The Ray-backed fault tests are tests/test_reliability_{faults,overload,cancel,guard,http_fuzz}.py.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import math

import pytest
import ray.exceptions
from ray.serve.exceptions import BackPressureError

from halffull.deploy.auth import (
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    api_key_digests,
    bearer_token,
    key_allowed,
    key_digest,
    load_api_keys,
)
from halffull.deploy.protocol.errors import ApiError
from halffull.deploy.run import Run as _Run
from halffull.deploy.run import classify as _classify
from halffull.deploy.serving import resolve_max_tokens
from halffull.replicas.backend import GenerateRequest, RequestOutcome
from halffull.replicas.sim.realtime import AsyncSimEngine, EngineDeadError, EngineOverloadedError

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def request(rid: str, prompt_len: int = 64, max_tokens: int = 50) -> GenerateRequest:
    return GenerateRequest(rid, [300 + (i % 97) for i in range(prompt_len)], max_tokens, ignore_eos=True)


def assert_idle(eng: AsyncSimEngine) -> None:
    occ = eng.occupancy()
    assert occ["num_unfinished"] == occ["num_streams"] == occ["num_running"] == occ["num_waiting"] == 0
    assert occ["num_free_blocks"] == occ["num_total_blocks"]
    eng.scheduler.pool.check_invariants()


# ---- engine: waiting-queue limit, stream ownership -------------------------------------------------------
def test_submit_refuses_beyond_the_waiting_limit_and_recovers():
    async def main():
        # One sequence runs at a time, two may wait: the fourth submit is refused, synchronously.
        eng = AsyncSimEngine.from_config({"speedup": 1.0, "max_num_seqs": 1, "max_waiting_requests": 2})
        streams = [eng.submit(request("r0", max_tokens=2000))]
        await asyncio.sleep(0.05)  # the step loop admitted it
        streams += [eng.submit(request(f"r{i}", max_tokens=2000)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        assert eng.occupancy()["num_running"] == 1 and eng.occupancy()["num_waiting"] == 2
        with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
            eng.submit(request("r3"))
        assert eng.num_rejected == 1 and "r3" not in eng.scheduler.requests
        for s in streams:
            s.close()
        assert_idle(eng)
        assert len([t async for t in eng.submit(request("after", max_tokens=3))]) == 3  # serves again
        assert_idle(eng)
        await eng.close()

    run(main())


def test_a_submitted_stream_never_iterated_releases_its_blocks():
    async def main():
        eng = AsyncSimEngine.from_config({"speedup": 1.0})
        closed = eng.submit(request("closed", prompt_len=500))
        await asyncio.sleep(0.05)
        assert eng.occupancy()["num_free_blocks"] < eng.occupancy()["num_total_blocks"]
        await closed.aclose()
        outcome = RequestOutcome()
        eng.submit(request("dropped", prompt_len=500), outcome)  # no reference kept: collected at once
        gc.collect()
        assert outcome.finish_reason == "abort"
        assert_idle(eng)
        await eng.close()

    run(main())


def test_generate_keeps_its_lazy_contract():
    async def main():
        eng = AsyncSimEngine.from_config({"speedup": math.inf})
        gen = eng.generate(request("lazy", max_tokens=4))
        assert eng.occupancy()["num_unfinished"] == 0  # enters the scheduler on the first __anext__
        assert len([t async for t in gen]) == 4
        assert_idle(eng)
        await eng.close()

    run(main())


def test_a_dead_engine_refuses_submits():
    async def main():
        eng = AsyncSimEngine.from_config({"speedup": 100.0})
        eng._error = RuntimeError("boom")
        with pytest.raises(EngineDeadError):
            eng.submit(request("x"))
        await eng.close()

    run(main())


# ---- the ingress's re-sends and deadline (_Run) on fake response streams ----------------------------------
class FakeStream:
    """A Serve response stream: items (exceptions are raised), optional delay per item, cancel()."""

    def __init__(self, items, delay: float = 0.0):
        self.items = list(items)
        self.delay = delay
        self.cancelled = False

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


START = {"event": "start", "replica": "A"}
END = {"event": "end", "finish_reason": "length", "num_prompt_tokens": 3}
DIED = ray.exceptions.ActorDiedError


def make_run(*attempts, max_retries=2, timeout=None):
    sent, retries = [], []

    def call(attempt):
        sent.append(_Run.attempt_id("cmpl-x", attempt))
        return attempts[attempt]

    async def build():
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return _Run(call, "cmpl-x", 0.0, max_retries=max_retries, deadline=deadline, on_retry=retries.append)

    return build, sent, retries


@pytest.mark.parametrize(
    "first, expect_retry",
    [(DIED(), True), (ray.exceptions.ActorUnavailableError("gone", None), True), (EngineDeadError("x"), True),
     (ValueError("too long"), False), (BackPressureError(1, 1, 429, 1.0), False)],
    ids=["actor-died", "actor-unavailable", "engine-dead", "bad-request", "backpressure"],
)
def test_start_resends_only_on_replica_failure(first, expect_retry):
    attempts = [FakeStream([first]), FakeStream([{"event": "start", "replica": "B"}, [7], END])]
    build, sent, retries = make_run(*attempts)

    async def main():
        r = await build()
        if not expect_retry:
            with pytest.raises(type(first)):
                await r.start()
            return
        await r.start()
        assert r.replica == "B" and await r.collect() == [7]
        assert sent == ["cmpl-x", "cmpl-x-retry1"] and len(retries) == 1

    run(main())


def test_a_non_streaming_request_is_resent_before_its_first_token_only():
    async def main():
        build, _, _ = make_run(FakeStream([START, DIED()]), FakeStream([{"event": "start", "replica": "B"}, [5, 6], END]))
        r = await build()
        await r.start()
        assert await r.collect() == [5, 6] and r.attempt == 1 and r.replica == "B" and r.end == END

        attempts = [FakeStream([START, [1, 2], DIED()]), FakeStream([START, [5], END])]
        build, sent, _ = make_run(*attempts)
        r = await build()
        await r.start()
        with pytest.raises(DIED):  # it had generated: a 503, not a silent re-run
            await r.collect()
        assert len(sent) == 1 and r.replica == "A"

    run(main())


def test_a_stream_is_resent_before_its_first_token_only():
    async def main():
        build, _, _ = make_run(FakeStream([START, DIED()]), FakeStream([START, [9, 10], [11], END]))
        r = await build()
        await r.start()
        assert [b async for b in r.batches()] == [[9, 10], [11]] and r.num_tokens == 3 and r.attempt == 1

        build, _, _ = make_run(FakeStream([START, [1, 2], DIED()]), FakeStream([START, [9], END]))
        r = await build()
        await r.start()
        got = []
        with pytest.raises(DIED):
            async for b in r.batches():
                got.append(b)
        # the client saw tokens: the stream is cut, not re-sent; nothing lost, nothing counted twice
        assert got == [[1, 2]] and r.attempt == 0 and r.num_tokens == 2

    run(main())


def test_resends_are_bounded():
    build, sent, _ = make_run(FakeStream([DIED()]), FakeStream([DIED()]), FakeStream([DIED()]), max_retries=2)

    async def main():
        r = await build()
        with pytest.raises(DIED):
            await r.start()
        assert len(sent) == 3

    run(main())


def test_the_deadline_ends_every_wait():
    build, _, _ = make_run(FakeStream([START, [1], [2], [3]], delay=0.2), timeout=0.3)

    async def main():
        r = await build()
        await r.start()
        with pytest.raises(TimeoutError):
            await r.collect()
        r.cancel()

    run(main())


# ---- error mapping -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc, status, code, retry_after",
    [
        (BackPressureError(5, 5, 429, 2.0), 429, "overloaded", "3"),
        (EngineOverloadedError("the engine's waiting queue is full (2 >= 2 requests)"), 429, "overloaded", "3"),
        (TimeoutError(), 504, "timeout", None),
        (DIED(), 503, "replica_unavailable", "3"),
        (EngineDeadError("x"), 503, "replica_unavailable", "3"),
    ],
    ids=["backpressure", "engine-full", "timeout", "replica-died", "engine-dead"],
)
def test_overload_and_failure_map_to_retryable_statuses(exc, status, code, retry_after):
    err = _classify(exc, retry_after_s=2.5)
    assert (err.status, err.code) == (status, code)
    assert err.headers.get("retry-after") == retry_after
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


# ---- max_tokens cap ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, cap, expected",
    [({}, None, 8092), ({}, 64, 64), ({"max_tokens": 64}, 64, 64), ({"max_tokens": 65}, 64, ApiError),
     ({}, 10_000, 8092)],
    ids=["default-rest", "default-capped", "at-cap", "over-cap", "cap-above-context"],
)
def test_max_output_tokens_caps_and_defaults(body, cap, expected):
    if expected is ApiError:
        with pytest.raises(ApiError, match="at most 64") as info:
            resolve_max_tokens(body, 100, 8192, chat=False, max_output_tokens=cap)
        assert info.value.status == 400 and info.value.param == "max_tokens"
    else:
        assert resolve_max_tokens(body, 100, 8192, chat=False, max_output_tokens=cap) == expected


# ---- API keys ----------------------------------------------------------------------------------------------
def test_keys_from_the_variable_and_the_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# halffull keys\nfile-key-1\n\n  file-key-2  \n")
    assert load_api_keys({}) == []
    assert load_api_keys({API_KEYS_ENV: " a , b,, "}) == ["a", "b"]
    assert load_api_keys({API_KEYS_FILE_ENV: str(path)}) == ["file-key-1", "file-key-2"]
    assert load_api_keys({API_KEYS_ENV: "a", API_KEYS_FILE_ENV: str(path)}) == ["a", "file-key-1", "file-key-2"]


@pytest.mark.parametrize(
    "environ, message",
    [({API_KEYS_ENV: " , "}, "holds no key"), ({API_KEYS_FILE_ENV: "/nonexistent/halffull-keys"}, "cannot read"),
     ({API_KEYS_FILE_ENV: "EMPTY"}, "holds no key")],
    ids=["empty-variable", "missing-file", "empty-file"],
)
def test_a_configured_but_empty_key_source_fails_closed(environ, message, tmp_path):
    if environ.get(API_KEYS_FILE_ENV) == "EMPTY":
        (tmp_path / "empty").write_text("# nothing\n")
        environ = {API_KEYS_FILE_ENV: str(tmp_path / "empty")}
    with pytest.raises(ValueError, match=message):
        load_api_keys(environ)


@pytest.mark.parametrize(
    "header, token",
    [(None, None), (b"", None), (b"Bearer k1", b"k1"), (b"bearer   k1 ", b"k1"), (b"Basic k1", None),
     (b"Bearer", None), (b"k1", None)],
    ids=["none", "empty", "bearer", "lowercase-spaces", "basic", "no-token", "bare-key"],
)
def test_bearer_token_parsing(header, token):
    assert bearer_token(header) == token


def test_key_check_is_constant_time_over_every_key(monkeypatch):
    digests = tuple(api_key_digests({API_KEYS_ENV: "k1,k2,k3"}))
    assert key_allowed(b"k2", digests) and key_allowed(b"k3", digests)
    assert not key_allowed(b"k4", digests) and not key_allowed(None, digests) and not key_allowed(b"", digests)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    key_allowed(b"k1", digests)  # matches the first key, and still compares against all three
    assert calls == [(32, 32)] * 3
    assert key_digest("k1") == key_digest(b"k1")


def test_an_overloaded_replica_is_a_429_without_a_resend():
    build, sent, _ = make_run(FakeStream([{"event": "overloaded", "message": "the engine's waiting queue is full"}]),
                              FakeStream([START, 1, END]))

    async def main():
        r = await build()
        with pytest.raises(EngineOverloadedError) as info:
            await r.start()
        assert len(sent) == 1
        err = _classify(info.value, retry_after_s=1.0)
        assert (err.status, err.code, err.headers["retry-after"]) == (429, "overloaded", "1")

    run(main())
