"""Soak: replay a production trace at moderate load against the default app for a long time, and check that
nothing is lost, latency does not drift and no Ray / Serve process grows.

    python -m halffull.loadtest.live.soak [--duration 1200] [--window 300] [--trace azure_conv] [--rate-scale 0.5]
                            [--stream-fraction 1.0] [--max-in-flight 512] [--sample-every 10]
                            [--app-arg KEY=VALUE ...] [--json PATH]

A benchmark script, not a CI test (20 minutes by default; ``--duration 180`` for a short check).

Setup (loopback only): a fresh local Ray cluster (4 logical CPUs, 127.0.0.1, no dashboard) and Serve's HTTP
proxy on a free 127.0.0.1 port; the default app of ``deploy/serve_config.yaml`` (four simulated H100 replicas
of Llama-3-8B at real speed, ``sal`` + ``larry``; ``--app-arg`` overrides any argument, e.g.
``--app-arg speedup=2``). Everything is stopped at the end (``serve.shutdown``, ``ray.shutdown``), and the script
checks that no process of the cluster is left.

Load: open loop, from the trace (``loadtest/sim/traces.py``; ``--rate-scale`` X makes arrivals X times faster, so
the default 0.25 is a quarter of the trace's mean rate: ~1.4 requests/s of Azure conversation, ~300 output
tokens/s, which kept the whole cluster at about 1 core of a shared 2-core machine; 0.5 took it to ~1.5). ``--arrivals poisson``
(default) keeps the load stationary — Poisson arrivals at that mean rate, each request's sizes drawn from the
trace (seeded) — so the first and last windows see the same load and a TTFT drift is the system's;
``--arrivals trace`` replays the recorded arrivals from the start, repeated to fill ``--duration``. Each
request sends a token-id prompt of the trace's length (distinct per request) with
``max_tokens`` = the trace's output length and ``ignore_eos``. ``--stream-fraction`` of them stream (TTFT is
measured on those, at the client, arrival to first token). In flight is capped at ``--max-in-flight``:
a request that finds the cap reached is not sent and counted as ``shed`` (a shed request makes the run invalid,
not lossy — lower the rate).

Each request ends as one of:
  complete   200 and the whole answer (a stream ends with its finish_reason and [DONE])
  rejected   429 with an OpenAI error body (overload; the run should have none at moderate load)
  error      another 4xx/5xx with an OpenAI error body, or a stream cut by an error event
  lost       anything else: timeout (``--request-timeout``), dropped connection, malformed answer

Reported (PASS/FAIL each; the exit status is 1 if any fails):
  requests lost == 0 (and no error, no shed request)
  p99 TTFT of the first ``--window`` seconds vs the last: within 20 %
  RSS growth of every Ray / Serve process (every descendant of this script: gcs_server, raylet, the Serve
  controller, proxy, ingress and LLM replicas, workers): < 10 %, from its median over the first three
  samples after ``--warmup`` seconds to its median over the last three
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from halffull.deploy import ray_env
from halffull.loadtest.bench.serve import cluster_cpu_seconds
from halffull.loadtest.sim.metrics import percentile
from halffull.loadtest.sim.traces import BUILTIN_TRACES, load_trace

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"
TTFT_DRIFT_LIMIT = 0.20
RSS_GROWTH_LIMIT = 0.10
TOKEN_BASE, TOKEN_SPAN = 300, 50_000  # prompt token ids (the simulated tokenizer accepts any id < 2**40)


# ---- the load ----------------------------------------------------------------------------------------------
@dataclass
class Result:
    index: int
    sent_at: float  # seconds since the start of the replay
    stream: bool
    kind: str = "lost"
    status: int | None = None
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    detail: str = ""


def schedule(args) -> list[tuple[float, int, int]]:
    """(arrival s, prompt tokens, output tokens) for the whole run (see ``--arrivals``)."""
    trace = load_trace(args.trace, rate_scale=args.rate_scale, max_total_tokens=args.max_model_len)
    if len(trace) < 2:
        raise SystemExit(f"trace {args.trace!r} has fewer than 2 requests")
    span = trace[-1].arrival_s * len(trace) / (len(trace) - 1)  # one mean gap after the last request
    out: list[tuple[float, int, int]] = []
    if args.arrivals == "poisson":
        # Stationary: the trace's mean rate, its requests' sizes drawn at random. The first and last windows
        # then see the same load, so a TTFT drift is the system's, not the trace's.
        rng = random.Random(args.seed)
        rate, t = len(trace) / span, 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= args.duration:
                return out
            r = rng.choice(trace)
            out.append((t, r.num_prompt_tokens, r.num_output_tokens))
    offset = 0.0
    while offset < args.duration:  # the trace as recorded, repeated to fill the duration
        for r in trace:
            t = offset + r.arrival_s
            if t >= args.duration:
                break
            out.append((t, r.num_prompt_tokens, r.num_output_tokens))
        offset += span
    return out


async def one(client, model: str, index: int, sent_at: float, prompt_tokens: int, output_tokens: int,
              stream: bool) -> Result:
    import httpx

    result = Result(index, sent_at, stream)
    rng = random.Random(index)
    body = {"model": model, "prompt": [TOKEN_BASE + rng.randrange(TOKEN_SPAN) for _ in range(prompt_tokens)],
            "max_tokens": output_tokens, "ignore_eos": True, "stream": stream}
    if stream:  # an event may carry several tokens: count them from the usage chunk
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200 or not stream:
                payload = json.loads(await response.aread())
                if response.status_code == 200:
                    if payload["choices"][0]["finish_reason"] and payload["usage"]["completion_tokens"] == output_tokens:
                        result.kind, result.tokens = "complete", output_tokens
                    else:
                        result.detail = f"short answer: {payload['usage']}"
                elif set(payload.get("error", {})) == {"message", "type", "param", "code"}:
                    result.kind = "rejected" if response.status_code == 429 else "error"
                    result.detail = f"{response.status_code} {payload['error']['code']}"
                else:
                    result.detail = f"{response.status_code} without an OpenAI error body"
                result.e2e = time.perf_counter() - start
                return result
            finish, done, error = None, False, None
            async for line in response.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                data = json.loads(line.removeprefix("data: "))
                if "error" in data:
                    error = data["error"]
                elif data.get("usage"):
                    result.tokens = data["usage"]["completion_tokens"]
                elif data["choices"][0]["finish_reason"]:
                    finish = data["choices"][0]["finish_reason"]
                elif data["choices"][0]["text"] and result.ttft is None:
                    result.ttft = time.perf_counter() - start
            result.e2e = time.perf_counter() - start
            if done and error is not None:
                result.kind, result.detail = "error", f"stream error {error.get('code')}"
            elif done and finish and result.tokens == output_tokens:
                result.kind = "complete"
            else:
                result.detail = f"stream ended early: done={done} finish={finish} tokens={result.tokens}/{output_tokens}"
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        result.detail = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def replay(url: str, model: str, plan, args, on_tick) -> tuple[list[Result], int]:
    import httpx

    results: list[Result] = []
    shed = 0
    in_flight = 0
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=64)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        tasks: set[asyncio.Task] = set()
        t0 = time.perf_counter()
        next_tick = 0.0

        async def run(i, at, prompt, output, stream):
            nonlocal in_flight
            try:
                results.append(await one(client, model, i, at, prompt, output, stream))
            finally:
                in_flight -= 1

        for i, (at, prompt, output) in enumerate(plan):
            while True:
                now = time.perf_counter() - t0
                if now >= next_tick:
                    on_tick(now, in_flight, len(results))
                    next_tick += args.sample_every
                delay = min(at - now, next_tick - now)
                if delay <= 0 and at <= now:
                    break
                await asyncio.sleep(max(delay, 0))
            if in_flight >= args.max_in_flight:
                shed += 1
                continue
            in_flight += 1
            task = asyncio.create_task(run(i, at, prompt, output, rng.random() < args.stream_fraction))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:  # drain, still sampling
            await asyncio.wait(tasks, timeout=args.sample_every)
            on_tick(time.perf_counter() - t0, in_flight, len(results))
    return results, shed


# ---- process memory -----------------------------------------------------------------------------------------
def cluster_processes() -> dict[int, str]:
    """pid -> name of every process of this script's Ray cluster (its descendants)."""
    import psutil

    out = {}
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = proc.cmdline()
            name = cmd[0] if cmd else proc.name()
            if name.startswith("ray::"):  # proctitle: ray::<actor class or task>[.<running method>]
                name = name.split()[0].split(".")[0]
            else:
                script = next((os.path.basename(a) for a in cmd[1:] if a.endswith(".py")), "")
                name = " ".join(filter(None, (os.path.basename(name), script)))
            out[proc.pid] = name
        except psutil.Error:
            pass
    return out


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def rss_of(pids) -> dict[int, int]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


@dataclass
class MemoryLog:
    names: dict[int, str] = field(default_factory=dict)
    samples: list[tuple[float, dict[int, int]]] = field(default_factory=list)

    def sample(self, t: float) -> None:
        self.names.update(cluster_processes())
        self.samples.append((t, rss_of(self.names)))

    def growth(self, warmup: float) -> list[tuple[str, int, float, float, float]]:
        """(name, pid, baseline MB, final MB, growth) per process alive from warm-up to the end."""
        after = [(t, s) for t, s in self.samples if t >= warmup]
        if len(after) < 2:
            after = self.samples
        rows = []
        for pid, name in sorted(self.names.items(), key=lambda kv: kv[1]):
            series = [s[pid] for _, s in after if pid in s]
            if len(series) < 2 or pid not in after[-1][1]:
                continue  # a short-lived worker
            k = min(3, len(series) // 2) or 1
            base, final = statistics.median(series[:k]), statistics.median(series[-k:])
            rows.append((name, pid, base / 1e6, final / 1e6, (final - base) / base if base else 0.0))
        return rows


# ---- the run -----------------------------------------------------------------------------------------------
def default_app_args() -> dict:
    return dict(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])


def parse_app_args(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--app-arg needs KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def window_p99(results: list[Result], lo: float, hi: float) -> tuple[float | None, int]:
    ttfts = [r.ttft for r in results if r.ttft is not None and lo <= r.sent_at < hi]
    return (percentile(ttfts, 99) if ttfts else None), len(ttfts)


def run(args) -> int:
    ray_env.apply()  # Ray's listeners on 127.0.0.1 (DESIGN.md §9), the gRPC proxy hop
    # Ray starts its workers at nice 15; the load generator (this process) runs at 0 and would starve the server
    # it measures on a small machine. Same priority for both.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    from halffull.deploy.app import AppConfig, build_app

    app_args = {**default_app_args(), **parse_app_args(args.app_arg)}
    config = AppConfig.from_args(app_args)
    args.max_model_len = config.max_model_len()
    plan = schedule(args)
    window = min(args.window, args.duration / 3)
    warmup = min(args.warmup, args.duration / 4)
    print(f"soak: {args.duration:.0f} s of {args.trace} ({args.arrivals} arrivals) at rate scale {args.rate_scale} "
          f"({len(plan)} requests, {len(plan) / args.duration:.2f} req/s), stream fraction {args.stream_fraction}; "
          f"windows of {window:.0f} s; app args {app_args}", flush=True)

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR", namespace="halffull-soak")
    memory = MemoryLog()
    try:
        port = ray_env.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args), name="soak", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        print(f"deployed at {url}", flush=True)
        start = time.perf_counter()

        def tick(t: float, in_flight: int, done: int) -> None:
            memory.sample(t)
            total = sum(memory.samples[-1][1].values()) / 1e6
            print(f"  t={t:7.1f} s  in flight {in_flight:4d}  finished {done:6d}  cluster RSS {total:8.1f} MB",
                  flush=True)

        cpu0, own0 = cluster_cpu_seconds(), _own_cpu_seconds()
        results, shed = asyncio.run(replay(url, config.model_name(), plan, args, tick))
        elapsed = time.perf_counter() - start
        server_cores = (cluster_cpu_seconds() - cpu0) / elapsed
        client_cores = (_own_cpu_seconds() - own0) / elapsed
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    time.sleep(2)
    leftover = {pid: name for pid, name in memory.names.items() if rss_of([pid])}

    kinds: dict[str, int] = {}
    for r in results:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    lost = kinds.get("lost", 0)
    first_p99, n_first = window_p99(results, 0.0, window)
    last_p99, n_last = window_p99(results, args.duration - window, args.duration)
    drift = (last_p99 - first_p99) / first_p99 if first_p99 and last_p99 is not None else None
    growth = memory.growth(warmup)
    worst = max(growth, key=lambda row: row[4]) if growth else None
    checks = {
        "requests lost == 0": lost == 0,
        "no errors, rejections or shed requests": not (kinds.get("error") or kinds.get("rejected") or shed),
        f"p99 TTFT drift within {TTFT_DRIFT_LIMIT:.0%}": drift is not None and abs(drift) <= TTFT_DRIFT_LIMIT,
        f"RSS growth of every process < {RSS_GROWTH_LIMIT:.0%}": bool(growth) and worst[4] < RSS_GROWTH_LIMIT,
        "no cluster process left running": not leftover,
    }

    print(f"\nreplayed {len(results)} requests in {elapsed:.0f} s (planned {len(plan)}, shed {shed}): {kinds}")
    print(f"CPU: the Ray cluster used {server_cores:.2f} cores on average, this load generator {client_cores:.2f} "
          f"(of {os.cpu_count()}; the machine's 1-minute load average at the end: {os.getloadavg()[0]:.1f})")
    for r in [r for r in results if r.kind in ("lost", "error")][:5]:
        print(f"  request {r.index} at {r.sent_at:.1f} s: {r.kind} {r.detail}")
    e2e = [r.e2e for r in results if r.kind == "complete" and r.e2e is not None]
    if e2e:
        print(f"E2E p50 {percentile(e2e, 50):.2f} s, p99 {percentile(e2e, 99):.2f} s")
    print(f"p99 TTFT: first {window:.0f} s {fmt_s(first_p99)} ({n_first} streams), last {window:.0f} s "
          f"{fmt_s(last_p99)} ({n_last} streams), drift {'n/a' if drift is None else f'{drift:+.1%}'}")
    print(f"RSS per process (baseline = median of the first 3 samples after {warmup:.0f} s, final = of the last 3):")
    for name, pid, base, final, g in growth:
        print(f"  {name[:60]:60s} pid {pid:7d}  {base:8.1f} -> {final:8.1f} MB  {g:+6.1%}")
    if leftover:
        print(f"left running: {leftover}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "duration_s": args.duration, "trace": args.trace, "arrivals": args.arrivals, "rate_scale": args.rate_scale,
            "app_args": app_args,
            "planned": len(plan), "shed": shed, "outcomes": kinds, "lost": lost,
            "server_cores": server_cores, "client_cores": client_cores,
            "ttft_p99_first_s": first_p99, "ttft_p99_last_s": last_p99, "ttft_drift": drift, "window_s": window,
            "rss": [{"process": n, "pid": p, "baseline_mb": b, "final_mb": f, "growth": g} for n, p, b, f, g in growth],
            "checks": checks,
        }, indent=2))
    return 0 if all(checks.values()) else 1


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1e3:.0f} ms"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of replay (default 20 min)")
    parser.add_argument("--window", type=float, default=300.0, help="seconds compared at start and end "
                        "(at most a third of the duration)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline "
                        "(at most a quarter of the duration)")
    parser.add_argument("--trace", default="azure_conv", help=f"{', '.join(BUILTIN_TRACES)} or a trace file")
    parser.add_argument("--rate-scale", type=float, default=0.25, help="arrival-rate multiplier of the trace")
    parser.add_argument("--arrivals", choices=("poisson", "trace"), default="poisson",
                        help="poisson: the trace's mean rate and its request sizes at random (stationary, default); "
                             "trace: the recorded arrivals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-fraction", type=float, default=1.0)
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if not (args.duration > 0 and args.rate_scale > 0 and 0 <= args.stream_fraction <= 1 and args.max_in_flight > 0):
        parser.error("need duration > 0, rate-scale > 0, 0 <= stream-fraction <= 1, max-in-flight > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
