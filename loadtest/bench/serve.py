"""End-to-end overhead of halffull's Ray Serve router: requests/s through the full HTTP path.

    python -m halffull.loadtest.bench.serve [--router sal] [--replicas 2] [--concurrency 16] [--requests 250]
                                   [--rounds 8] [--max-tokens 4] [--phase-timeout 60] [--skip-micro]

Setup (loopback only): a fresh local Ray cluster (4 logical CPUs, 127.0.0.1) and Serve's HTTP proxy on a free
127.0.0.1 port; two apps deployed side by side, identical except for the LLMReplica router:

    halffull   request_router_class halffull.router.serve_router:HalffullRequestRouter, policy ``--router``
    default    Ray Serve's PowerOfTwoChoicesRequestRouter (app argument router: ray_default)

Replicas are simulated with an infinite speed-up (steps take no time), so what is measured is the serving
path: proxy -> ingress (validation, tokenization, prefix hashes) -> router -> replica -> streamed tokens back.

Load: closed loop, ``--concurrency`` clients each sending non-streaming completions (``--max-tokens`` tokens,
ignore_eos) back to back. Each round measures both apps back to back, in alternating order (halffull first
on even rounds), ``--requests`` requests per app per round after a warm-up, bounded by ``--phase-timeout``
seconds. Reported per app: requests/s (median over rounds), latency p50/p99, and the server CPU time per
request (CPU seconds of every process of this Ray cluster, the load generator excluded, over the phase /
requests; unlike wall-clock rates it is barely affected by other load on the machine). The verdict:

    ratio = median over rounds of (halffull req/s / default req/s in the same round)     target >= 0.95
    cpu ratio = median over rounds of (default CPU per request / halffull CPU per request)  (>= 1: cheaper)

Everything is stopped at the end (serve.shutdown, ray.shutdown).

Before that (unless ``--skip-micro``): the adapter's own cost, microseconds per ``choose_replicas`` call
(request conversion + snapshots + policy) with fake replicas, for every policy at 4/16/64 replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time

from halffull.deploy import ray_env
from halffull.router.registry import POLICY_NAMES

BENCH_APPS = ("halffull", "default")


# ---- adapter microbenchmark (no Ray cluster) ------------------------------------------------------------
def adapter_micro(calls: int = 2000) -> list[tuple[str, int, float]]:
    """(policy, replicas, µs per choose_replicas call)."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from halffull.router.serve_router import HalffullRequestRouter, routing_kwarg

    dep = DeploymentID(name="LLMReplica", app_name="bench")

    class Replica:
        def __init__(self, i: int):
            self.replica_id = ReplicaID(f"replica-{i}", dep)
            self.routing_stats = dict(
                num_running=i % 40, num_waiting=i % 5, num_waiting_prompt_tokens=(i * 997) % 20000,
                num_decode_tokens_remaining=float((i * 131) % 30000), num_free_blocks=(i * 37) % 2048,
                num_total_blocks=2048, block_size=16, decode_cost_ratio=1.5, num_preemptions=0,
                stats_time=time.time() - 0.1)
            self.max_ongoing_requests = 512

    async def run() -> list[tuple[str, int, float]]:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one "policy ..." line per router otherwise
        out = []
        prompt = list(range(300, 300 + 1500))
        for policy in POLICY_NAMES:
            for n in (4, 16, 64):
                router = HalffullRequestRouter(deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN)
                router.initialize_state(policy=policy, seed=0)
                replicas = [Replica(i) for i in range(n)]
                requests = [
                    PendingRequest(args=[{}], kwargs={"routing": routing_kwarg(f"r{k}", prompt[: 200 + 50 * k], 128,
                                                                               prefix_block_size=64)},
                                   metadata=RequestMetadata(request_id=f"r{k}", internal_request_id=f"i{k}"))
                    for k in range(20)
                ]
                for pr in requests[:5]:  # warm the prefix index a little
                    router.on_request_routed(pr, replicas[0].replica_id, None)
                start = time.perf_counter()
                for k in range(calls):
                    await router.choose_replicas(replicas, requests[k % 20])
                out.append((policy, n, (time.perf_counter() - start) / calls * 1e6))
        return out

    return asyncio.run(run())


# ---- end to end -------------------------------------------------------------------------------------------
def cluster_cpu_seconds() -> float:
    """CPU seconds used so far by this driver's Ray cluster (every descendant process, not the driver)."""
    import psutil

    total = 0.0
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def closed_loop(url: str, model: str, requests: int, concurrency: int, max_tokens: int, timeout: float):
    """(completed, seconds, latencies) of ``requests`` completions sent by ``concurrency`` clients."""
    import httpx

    latencies: list[float] = []
    remaining = requests
    deadline = time.monotonic() + timeout
    body = {"model": model, "prompt": "benchmark prompt with a few words in it", "max_tokens": max_tokens,
            "ignore_eos": True}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker():
            nonlocal remaining
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                t0 = time.perf_counter()
                response = await client.post("/v1/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies), time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Phase = tuple  # (completed, seconds, latencies, server CPU seconds)


def end_to_end(args) -> dict[str, list[Phase]]:
    ray_env.apply()  # loopback listeners, the gRPC proxy hop (deploy/ray_env.py)
    import ray
    from ray import serve

    from halffull.deploy.app import RAY_DEFAULT_ROUTER, build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    results: dict[str, list[Phase]] = {name: [] for name in BENCH_APPS}
    try:
        port = ray_env.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"num_replicas": args.replicas, "speedup": "inf", "stats_period_s": 0.5}
        routers = {"halffull": args.router, "default": RAY_DEFAULT_ROUTER}
        urls = {}
        for name in BENCH_APPS:
            serve.run(build_app({**common, "router": routers[name]}), name=f"bench-{name}", route_prefix=f"/{name}")
            urls[name] = f"http://127.0.0.1:{port}/{name}"
        print(f"deployed: {args.replicas} simulated replicas per app, speed-up inf; "
              f"halffull router = {args.router}, default = Ray's PowerOfTwoChoicesRequestRouter", flush=True)
        for name in BENCH_APPS:  # warm-up
            asyncio.run(closed_loop(urls[name], "llama3-8b", 100, args.concurrency, args.max_tokens, args.phase_timeout))
        for r in range(args.rounds):
            order = BENCH_APPS if r % 2 == 0 else BENCH_APPS[::-1]
            for name in order:
                cpu0 = cluster_cpu_seconds()
                done, seconds, lat = asyncio.run(closed_loop(urls[name], "llama3-8b", args.requests, args.concurrency,
                                                             args.max_tokens, args.phase_timeout))
                cpu = cluster_cpu_seconds() - cpu0
                results[name].append((done, seconds, lat, cpu))
                print(f"round {r + 1} {name:9s} {done:5d} requests in {seconds:6.2f} s = {done / seconds:7.1f} req/s"
                      f"  p50 {percentile(lat, 0.5) * 1e3:6.1f} ms  p99 {percentile(lat, 0.99) * 1e3:6.1f} ms"
                      f"  server CPU {cpu / done * 1e3:5.2f} ms/request", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", default="sal", choices=POLICY_NAMES)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=250, help="per app per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--phase-timeout", type=float, default=60.0, help="seconds, per app per round")
    parser.add_argument("--skip-micro", action="store_true")
    args = parser.parse_args(argv)

    if not args.skip_micro:
        print("adapter microbenchmark: µs per choose_replicas (conversion + snapshots + policy), fake replicas")
        rows = adapter_micro()
        for policy in POLICY_NAMES:
            cells = "  ".join(f"{n:3d} replicas {us:7.1f}" for p, n, us in rows if p == policy)
            print(f"  {policy:15s} {cells}")
        print(flush=True)

    results = end_to_end(args)
    print()
    for name in BENCH_APPS:
        rounds = results[name]
        lat = [x for phase in rounds for x in phase[2]]
        rps = statistics.median(done / seconds for done, seconds, _, _ in rounds)
        cpu = statistics.median(c / done for done, _, _, c in rounds)
        print(f"{name:9s} median {rps:7.1f} req/s   p50 {percentile(lat, 0.5) * 1e3:6.1f} ms   "
              f"p99 {percentile(lat, 0.99) * 1e3:6.1f} ms   server CPU {cpu * 1e3:5.2f} ms/request")
    pairs = list(zip(results["halffull"], results["default"]))
    ratio = statistics.median((h[0] / h[1]) / (d[0] / d[1]) for h, d in pairs)
    cpu_ratio = statistics.median((d[3] / d[0]) / (h[3] / h[0]) for h, d in pairs)
    print(f"ratio halffull/default = {ratio:.3f} req/s (target >= 0.95); "
          f"CPU per request default/halffull = {cpu_ratio:.3f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``halffull bench serve``: ``main`` with its defaults (loadtest/bench/cli.py)."""
    main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
