"""The simulated engine's own CPU per output token: the part of ``bench stream``'s ``replica`` column that is
the engine standing in for a GPU, not the serving path.

    halffull bench engine [--streams 32,128] [--stream-replicas 4] [--tokens 500] [--stream-rounds 3]
                          [--speeds 1,inf] [--ramp-s 1]

Why: in ``bench stream`` every LLM replica runs the simulated engine (replicas/sim/realtime.py) in its own
process. Its step loop (scheduling, KV blocks, a sampled token per running stream, the hand-over to the
stream) costs CPU on every engine step, as a real engine's own per-step work does (vLLM's scheduler and output
processing, in its engine process). At the real step cadence each step carries one token per running stream,
so that cost per token falls as a replica runs more streams: at few streams per replica it is a large part of
what the replicas cost, and of the total.

What runs: the default app's engine (AppConfig defaults = deploy/serve_config.yaml: its GPU, model, engine
policy and output vocabulary) alone in this process, on uvloop as Ray runs an actor's event loop when uvloop is
installed (it is, with Ray Serve). Each phase is one replica's share of a ``bench stream`` phase with the same
flags: ``streams / stream_replicas`` concurrent requests of ``tokens`` output tokens (``ignore_eos``, the same
prompt as ``bench stream``, tokenized by the simulated tokenizer) started evenly over ``ramp_s``, their tokens
handed over from the step loop as the replica's token channel takes them (``TokenStream.deliver_to``).

Reported per (speed, streams), medians over rounds: output tokens/s, engine steps/s, and this process's CPU
(user + system, ``time.process_time``) per output token and per step. What it leaves out: the replica's Ray
worker, Serve's request handling and the token channel (``bench stream`` counts them), and the idle worker.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from halffull.deploy.config import AppConfig
from halffull.deploy.tokenizer import SimTokenizer
from halffull.loadtest.bench.stream import BENCH_PROMPT
from halffull.replicas.backend import GenerateRequest
from halffull.replicas.sim.realtime import AsyncSimEngine


@dataclass
class Phase:
    """One phase's measurements."""

    tokens: int
    steps: int
    seconds: float
    cpu_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_s / max(self.tokens, 1) * 1e3

    @property
    def cpu_ms_per_step(self) -> float:
        return self.cpu_s / max(self.steps, 1) * 1e3


@dataclass
class Row:
    phases: list[Phase] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(p, key) for p in self.phases)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop where it is installed (Ray's choice for actors, ray/_private/async_compat.py), else
    asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def run_phase(engine: AsyncSimEngine, streams: int, tokens: int, ramp_s: float, prompt: list[int],
                    tag: str) -> Phase:
    """``streams`` requests of ``tokens`` tokens on ``engine``, started evenly over ``ramp_s``; CPU and wall
    time from the first start to the last end."""
    received = [0]

    async def one(i: int) -> None:
        await asyncio.sleep(ramp_s * i / streams)
        request = GenerateRequest(f"{tag}-{i}", prompt, tokens, ignore_eos=True)
        stream = engine.submit(request)
        try:
            stream.deliver_to(lambda batch: received.__setitem__(0, received[0] + len(batch)))
            await stream.ended()
        finally:
            stream.close()

    steps0, cpu0, t0 = engine.scheduler.num_steps, time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    phase = Phase(received[0], engine.scheduler.num_steps - steps0, time.perf_counter() - t0,
                  time.process_time() - cpu0)
    if phase.tokens != streams * tokens:
        raise RuntimeError(f"engine bench: {phase.tokens} tokens received, expected {streams} x {tokens}")
    return phase


async def run(per_replica: list[int], tokens: int, rounds: int, speeds: list[float], ramp_s: float,
              progress: Callable[[str], None] = print) -> dict[tuple[float, int], Row]:
    """Rows keyed by (speed, streams per replica); one engine per speed, as a replica keeps its engine."""
    config = AppConfig()
    prompt = SimTokenizer().encode(BENCH_PROMPT)
    rows: dict[tuple[float, int], Row] = {}
    for speed in speeds:
        engine = AsyncSimEngine.from_config(dataclasses.replace(config.engine_config(), speedup=speed))
        try:
            for r in range(rounds):
                for n in per_replica:
                    phase = await run_phase(engine, n, tokens, ramp_s, prompt, f"s{speed}-r{r}-n{n}")
                    rows.setdefault((speed, n), Row()).phases.append(phase)
                    progress(f"round {r + 1} speed {speed:g} {n:4d} streams/replica  {phase.tokens_per_s:8.0f} "
                             f"tok/s  {phase.cpu_ms_per_token:.4f} ms CPU/token  {phase.cpu_ms_per_step:.3f} "
                             f"ms CPU/step")
        finally:
            await engine.close()
    return rows


def report(rows: dict[tuple[float, int], Row], replicas: int) -> str:
    lines = ["medians over rounds; the simulated engine alone, one replica's share; CPU of this process",
             f"{'speed':>6} {'streams':>8} {'per replica':>12} {'tok/s':>9} {'steps/s':>8} "
             f"{'ms CPU/token':>13} {'ms CPU/step':>12}"]
    for (speed, n), row in sorted(rows.items()):
        steps_per_s = statistics.median(p.steps / p.seconds for p in row.phases)
        lines.append(f"{speed:>6g} {n * replicas:>8d} {n:>12d} {row.median('tokens_per_s'):>9.0f} "
                     f"{steps_per_s:>8.0f} {row.median('cpu_ms_per_token'):>13.4f} "
                     f"{row.median('cpu_ms_per_step'):>12.3f}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    """``halffull bench engine``: takes ``bench stream``'s flags, so one command line serves both."""
    replicas = args.stream_replicas
    bad = [n for n in args.streams if n % replicas]
    if bad or replicas < 1:
        print(f"halffull bench engine: --streams ({', '.join(map(str, bad))}) must divide evenly over "
              f"--stream-replicas {replicas}")
        return 2
    speeds = [float(s) for s in args.speeds.split(",") if s]
    per_replica = [n // replicas for n in args.streams]
    runner = asyncio.Runner(loop_factory=event_loop_factory())
    with runner:
        rows = runner.run(run(per_replica, args.tokens, args.stream_rounds, speeds, args.ramp_s))
    print()
    print(report(rows, replicas))
    return 0


def main(argv: list[str] | None = None) -> int:
    from halffull.loadtest.bench import stream

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stream.add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
