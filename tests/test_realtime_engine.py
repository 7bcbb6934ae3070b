"""The real-time simulated engine (replicas/sim/realtime.py): token streams, aborts, speed-up, idling.

No Ray. Each test runs its own event loop with ``asyncio.run`` and closes the engine; teardown checks that no
request and no KV block leaked.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from halffull.replicas.backend import GenerateRequest, RequestOutcome
from halffull.replicas.engine.policies import engine_policy_names
from halffull.replicas.engine.stats import STATS_KEYS
from halffull.replicas.sim.realtime import AsyncSimEngine, SimEngineConfig, pseudo_eos_tokens

pytestmark = pytest.mark.timeout(60)


def engine(**options) -> AsyncSimEngine:
    options.setdefault("speedup", 100.0)
    return AsyncSimEngine.from_config(options)


def request(rid: str, prompt_len: int = 32, max_tokens: int = 8, *, ignore_eos: bool = True, base: int = 300, **kw):
    return GenerateRequest(rid, [base + (i % 97) for i in range(prompt_len)], max_tokens, ignore_eos=ignore_eos, **kw)


async def collect(eng: AsyncSimEngine, req: GenerateRequest, outcome: RequestOutcome | None = None) -> list[int]:
    return [t async for t in eng.generate(req, outcome)]


def assert_clean(eng: AsyncSimEngine) -> None:
    sched = eng.scheduler
    assert sched.num_unfinished == 0 and not sched.waiting and not sched.running
    assert sched.num_free_blocks == sched.num_total_blocks
    sched.pool.check_invariants()
    assert not eng._streams


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


@pytest.mark.parametrize(
    "max_tokens, ignore_eos, expected",
    [(8, True, 8), (1, True, 1), (300, True, 300), (1000, False, None), (3, False, 3)],
    ids=["max-tokens", "one-token", "long", "pseudo-eos", "max-tokens-before-eos"],
)
def test_streams_the_right_number_of_tokens(max_tokens, ignore_eos, expected):
    async def main():
        eng = engine()
        req = request("r", max_tokens=max_tokens, ignore_eos=ignore_eos)
        outcome = RequestOutcome()
        tokens = await collect(eng, req, outcome)
        want = expected or pseudo_eos_tokens(req.prompt_token_ids, 16, 256)
        assert len(tokens) == want == outcome.num_output_tokens
        assert outcome.num_prompt_tokens == 32
        assert outcome.finish_reason == ("length" if len(tokens) == max_tokens else "stop")
        assert all(t in eng.output_vocab for t in tokens)
        assert_clean(eng)
        await eng.close()

    run(main())


def test_tokens_are_deterministic_per_prompt():
    async def main():
        a, b = engine(), engine()
        ta = await collect(a, request("x", max_tokens=20))
        tb = await collect(b, request("y", max_tokens=20))
        tc = await collect(a, request("z", max_tokens=20, base=500))
        assert ta == tb and ta != tc
        await a.close()
        await b.close()

    run(main())


def test_concurrent_requests_each_get_their_tokens():
    async def main():
        eng = engine(speedup=1000.0)
        reqs = [request(f"r{i}", prompt_len=50 + i, max_tokens=5 + i) for i in range(30)]
        results = await asyncio.gather(*(collect(eng, r) for r in reqs))
        assert [len(t) for t in results] == [5 + i for i in range(30)]
        assert eng.estimator.count == 30 and eng.num_finished == 30
        assert_clean(eng)
        await eng.close()

    run(main())


def test_closing_the_stream_aborts_and_frees_blocks():
    async def main():
        eng = engine()
        outcome = RequestOutcome()
        stream = eng.generate(request("long", prompt_len=2000, max_tokens=5000), outcome)
        got = [await stream.__anext__() for _ in range(3)]
        assert len(got) == 3
        assert eng.scheduler.num_free_blocks < eng.scheduler.num_total_blocks  # it holds KV now
        await stream.aclose()
        assert outcome.finish_reason == "abort" and outcome.num_output_tokens == 3
        assert eng.num_aborted == 1
        assert_clean(eng)
        await eng.close()

    run(main())


def test_cancelling_the_consumer_aborts_the_request():
    async def main():
        eng = engine(speedup=1.0)  # slow enough to cancel mid-prefill/decode
        started = asyncio.Event()

        async def consume():
            async for _ in eng.generate(request("c", prompt_len=3000, max_tokens=4000)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_clean(eng)
        await eng.close()

    run(main())


def test_abort_by_id_ends_the_stream():
    async def main():
        eng = engine(speedup=1.0)
        stream = eng.generate(request("a", max_tokens=5000))
        await stream.__anext__()
        assert eng.abort("a") is True
        rest = [t async for t in stream]
        assert len(rest) < 5000
        assert eng.abort("a") is False
        assert_clean(eng)
        await eng.close()

    run(main())


def test_speedup_divides_step_time():
    async def main():
        times = {}
        for speedup in (20.0, 40.0):
            eng = engine(speedup=speedup)
            start = time.perf_counter()
            await collect(eng, request("s", prompt_len=100, max_tokens=40))
            times[speedup] = (eng.busy_time, time.perf_counter() - start)
            await eng.close()
        (busy20, wall20), (busy40, wall40) = times[20.0], times[40.0]
        assert busy20 == pytest.approx(2 * busy40, rel=1e-9)  # same steps, half the duration each
        assert wall20 >= busy20 and wall40 >= busy40  # the engine really sleeps that long
        eng = engine(speedup=math.inf)
        assert len(await collect(eng, request("i", max_tokens=50))) == 50 and eng.busy_time == 0.0
        await eng.close()

    run(main())


def test_speedup_one_is_about_real_time():
    async def main():
        eng = engine(speedup=1.0)
        start = time.perf_counter()
        await collect(eng, request("rt", prompt_len=10, max_tokens=20))
        wall = time.perf_counter() - start
        # ~20 decode steps of Llama-3-8B on an H100 (6-8 ms each, tests/test_latency.py)
        assert 0.1 <= eng.busy_time <= 0.25 and wall >= eng.busy_time
        await eng.close()

    run(main())


def test_idle_loop_waits_instead_of_spinning():
    async def main():
        eng = engine()
        await collect(eng, request("w", max_tokens=3))
        steps = eng.scheduler.num_steps
        await asyncio.sleep(0.1)
        assert eng.scheduler.num_steps == steps  # no step without work
        assert eng._task is not None and not eng._task.done()
        await collect(eng, request("w2", max_tokens=3))  # and it wakes up for new work
        assert eng.scheduler.num_steps > steps
        await eng.close()

    run(main())


def test_stats_have_the_published_keys_and_track_load():
    async def main():
        eng = engine(speedup=1.0)
        stats = eng.stats(now=123.0)
        assert set(STATS_KEYS) <= set(stats) and stats["stats_time"] == 123.0
        assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]
        stream = eng.generate(request("busy", prompt_len=500, max_tokens=1000))
        await stream.__anext__()
        busy = eng.stats()
        assert busy["num_running"] == 1 and busy["num_decode_tokens_remaining"] > 0
        assert busy["num_free_blocks"] < busy["num_total_blocks"]
        await stream.aclose()
        await eng.close()

    run(main())


def test_preemption_under_memory_pressure_still_completes_everything():
    async def main():
        # 24 blocks of 16 tokens: four 100-token prompts growing to 180 tokens cannot all fit.
        eng = engine(speedup=math.inf, num_blocks=24, max_num_seqs=8)
        outcomes = [RequestOutcome() for _ in range(4)]
        results = await asyncio.gather(*(
            collect(eng, request(f"p{i}", prompt_len=100, max_tokens=80, base=300 + 7 * i), outcomes[i])
            for i in range(4)))
        assert [len(t) for t in results] == [80] * 4
        assert eng.scheduler.num_preemptions > 0
        assert sum(o.num_preemptions for o in outcomes) == eng.scheduler.num_preemptions
        assert_clean(eng)
        await eng.close()

    run(main())


@pytest.mark.parametrize(
    "req, message",
    [
        (GenerateRequest("e", [], 4), "at least one token"),
        (GenerateRequest("e", [1, 2], 0), "max_tokens"),
        (GenerateRequest("e", [1] * 8000, 500), "context length 8192"),
    ],
    ids=["empty-prompt", "zero-max-tokens", "too-long"],
)
def test_validate_rejects_requests_that_can_never_run(req, message):
    eng = engine()
    with pytest.raises(ValueError, match=message):
        eng.validate(req)


def test_priority_reaches_the_scheduler():
    async def main():
        eng = engine(engine_policy="priority", speedup=math.inf)
        tokens = await collect(eng, request("p", max_tokens=4, priority=-3))
        assert len(tokens) == 4
        await eng.close()

    run(main())


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown sim engine option"):
        SimEngineConfig.from_dict({"speed": 2})
    with pytest.raises(ValueError, match="speedup"):
        SimEngineConfig.from_dict({"speedup": 0})
    assert SimEngineConfig.from_dict({"speedup": "inf"}).speedup == math.inf


def test_a_crashed_step_loop_fails_streams_and_health():
    async def main():
        eng = engine()

        def broken(*_):
            raise RuntimeError("boom")

        eng.latency.step_time = broken
        with pytest.raises(RuntimeError, match="boom"):
            await collect(eng, request("x"))
        with pytest.raises(RuntimeError, match="step loop failed"):
            eng.check_health()
        await eng.close()

    run(main())


@pytest.mark.parametrize("policy", engine_policy_names())
def test_every_engine_policy_serves_a_burst_under_memory_pressure(policy):
    async def main():
        eng = engine(engine_policy=policy, speedup=math.inf, num_blocks=40, max_num_seqs=8)
        reqs = [request(f"b{i}", prompt_len=60 + 10 * i, max_tokens=40 + i, base=300 + 11 * i) for i in range(10)]
        results = await asyncio.gather(*(collect(eng, r) for r in reqs))
        assert [len(t) for t in results] == [40 + i for i in range(10)]
        assert_clean(eng)
        await eng.close()

    run(main())


@pytest.mark.parametrize(
    "prev, now, dt, expected",
    [
        (None, 10.0, 0.04, 10.04),     # first step after idling: begins now
        (10.0, 10.003, 0.04, 10.04),   # 3 ms late (loop CPU, oversleep): made up, the timeline holds
        (10.0, 10.010, 0.04, 10.04),   # exactly the catch-up bound
        (10.0, 10.5, 0.04, 10.54),     # a stall: the timeline restarts from now
        (10.0, 9.999, 0.04, 10.04),    # woke early: the step still begins at the deadline
    ],
    ids=["after-idle", "small-lag", "bound", "stall", "early"],
)
def test_next_deadline(prev, now, dt, expected):
    from halffull.replicas.sim.realtime import next_deadline

    assert next_deadline(prev, now, dt, max_catchup=0.010) == pytest.approx(expected)
