"""``halffull bench sim``: simulated requests per wall-clock second of the offline cluster simulator (issue
target: >= 20,000 on the Azure conversation trace, 4 H100 replicas, fcfs, sal), with the jump over identical
decode steps on, and the step-by-step reference on a slice, in the same run (it checks that both give the same
per-request results).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from halffull.loadtest.sim.cluster import ClusterConfig, load_trace_for, simulate
from halffull.replicas.sim.profile_model import STEP_MODELS


def bench_sim(trace_name: str = "azure_conv", replicas: int = 4, router: str = "sal", engine: str = "fcfs",
              repeats: int = 3, reference_limit: int = 2000, step_model: str = "calibrated") -> dict:
    cfg = ClusterConfig(num_replicas=replicas, router=router, engine_policy=engine, step_model=step_model)
    trace = load_trace_for(cfg, trace_name)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = simulate(trace, cfg)
        rates.append(len(trace) / (time.perf_counter() - start))
    head = trace[:reference_limit]
    jump_rate, step_rate, runs = [], [], []
    for jump, sink in ((True, jump_rate), (False, step_rate)):
        ref_cfg = dataclasses.replace(cfg, jump=jump)
        start = time.perf_counter()
        runs.append(simulate(head, ref_cfg).records)
        sink.append(len(head) / (time.perf_counter() - start))
    same, worst = compare_records(*runs)
    return {
        "trace": trace_name, "requests": len(trace), "replicas": replicas, "router": router, "engine": engine,
        "step_model": step_model,
        "sim_requests_per_s_median": statistics.median(rates), "sim_requests_per_s_runs": rates,
        "slice": len(head), "slice_jump_requests_per_s": jump_rate[0], "slice_step_requests_per_s": step_rate[0],
        "completed": result.summary["completed"],
        "slice_same_decisions": same, "slice_max_relative_time_difference": worst,
    }


def compare_records(a: list, b: list) -> tuple[bool, float]:
    """(same decisions: replica, output tokens, preemptions, prefix hits of every request; the largest relative
    difference of a first-token or finish time) between two simulations of one trace."""
    same = len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b):
        same &= ((x.request_id, x.replica, x.num_output_tokens, x.num_preemptions, x.num_cached_prompt_tokens)
                 == (y.request_id, y.replica, y.num_output_tokens, y.num_preemptions, y.num_cached_prompt_tokens))
        for p, q in ((x.first_token_s, y.first_token_s), (x.finish_s, y.finish_s)):
            if p != q:
                worst = max(worst, abs(p - q) / max(abs(p), abs(q)))
    return same, worst


def cmd_bench(args: argparse.Namespace) -> int:
    r = bench_sim(args.trace, args.replicas, args.router, args.engine_policy, args.repeats, args.reference_limit,
                  args.step_model)
    print(f"offline simulator, {r['trace']} ({r['requests']} requests), {r['replicas']} x H100 llama3-8b "
          f"({r['step_model']} step model), router {r['router']}, engine {r['engine']}")
    runs = ", ".join(f"{x:,.0f}" for x in r["sim_requests_per_s_runs"])
    print(f"  simulated requests/s (jump, median of {len(r['sim_requests_per_s_runs'])}): "
          f"{r['sim_requests_per_s_median']:,.0f}   [{runs}]")
    print(f"  first {r['slice']} requests, same run: jump {r['slice_jump_requests_per_s']:,.0f}/s vs "
          f"step-by-step {r['slice_step_requests_per_s']:,.0f}/s "
          f"({r['slice_jump_requests_per_s'] / r['slice_step_requests_per_s']:.1f}x); same per-request "
          f"results: {'yes' if r['slice_same_decisions'] else 'NO'} (times within "
          f"{r['slice_max_relative_time_difference']:.0e} relative)")
    print("  target: >= 20,000 requests/s")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This benchmark's flags, on the shared ``bench`` parser (loadtest/bench/cli.py)."""
    p.add_argument("--trace", default="azure_conv")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--router", default="sal")
    p.add_argument("--engine-policy", default="fcfs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference-limit", type=int, default=2000, help="slice for the step-by-step comparison")
    p.add_argument("--step-model", default="calibrated", metavar="|".join(STEP_MODELS),
                   help="roofline: the step model before the calibration, for its cost side by side")
