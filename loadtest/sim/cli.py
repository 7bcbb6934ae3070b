"""The simulator's command line: the cluster flags every simulator-backed command shares, the ``ClusterConfig``
they build, and ``halffull simulate`` (replay a trace on simulated replicas in virtual time).

``add_cluster_args`` / ``cluster_config`` / ``load_args_trace`` are also used by ``halffull compare``
(loadtest/experiments/compare.py) and ``halffull loadtest compare`` (loadtest/live/compare.py), so a flag means
the same everywhere.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from halffull.loadtest.progress import Progress
from halffull.loadtest.sim.cluster import PEER_DELAY_S, STATS_DELAY_S, ClusterConfig, ClusterSim, config_dict, load_trace_for
from halffull.loadtest.sim.metrics import Slo, format_table
from halffull.replicas.sim.profile_model import STEP_MODELS


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as YAML scalars (numbers, true/false, null)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: expected key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="azure_conv", help="azure_code | azure_conv | mooncake_conv | PATH (.csv/.jsonl)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--router", default="sal", help="round_robin | random | pow2 | least_requests | prefix_aware | sal")
    p.add_argument("--router-param", action="append", metavar="K=V", help="router parameter (repeatable)")
    p.add_argument("--engine-policy", default="fcfs", help="fcfs | priority | no_preempt | larry")
    p.add_argument("--engine-param", action="append", metavar="K=V", help="engine policy parameter (repeatable)")
    p.add_argument("--gpu", default="h100", help="h100 | a100 | h200 | a10g | l4")
    p.add_argument("--model", default="llama3-8b", help="llama3-8b | llama3-70b")
    p.add_argument("--tp", type=int, default=None, help="tensor parallel degree (default: the profile's)")
    p.add_argument("--num-blocks", type=int, default=None, help="override KV blocks per replica")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's for the GPU (1024 on H100)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's for the GPU (8192 on H100)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="arrivals X times faster than the trace")
    p.add_argument("--limit", type=int, default=None, help="first N requests")
    p.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace")
    p.add_argument("--duration", type=float, default=None, help="window length in seconds")
    p.add_argument("--stats-period", type=float, default=0.5, help="seconds between replica stats (0 = perfect information)")
    p.add_argument("--stats-delay", type=float, default=STATS_DELAY_S,
                   help=f"seconds from a stats refresh to the routers seeing it (default {STATS_DELAY_S})")
    p.add_argument("--num-routers", type=int, default=1, help="router instances, each with its own local view")
    p.add_argument("--peer-delay", type=float, default=PEER_DELAY_S,
                   help=f"seconds from a routing decision to the other routers seeing its booking (default {PEER_DELAY_S})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--no-jump", action="store_true", help="step one token at a time (reference mode)")
    p.add_argument("--step-model", default="calibrated", metavar="|".join(STEP_MODELS),
                   help="calibrated (default): the per-operator model where the GPU has a calibration; roofline: "
                        "the whole-step roofline, as before the calibration")


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        num_replicas=args.replicas, router=args.router, router_params=parse_params(args.router_param),
        engine_policy=args.engine_policy, engine_params=parse_params(args.engine_param), gpu=args.gpu,
        model=args.model, tp=args.tp, block_size=args.block_size, num_blocks=args.num_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        stats_period_s=args.stats_period, stats_delay_s=args.stats_delay, num_routers=args.num_routers,
        peer_delay_s=args.peer_delay, seed=args.seed, jump=not args.no_jump, step_model=args.step_model,
    )


def load_args_trace(args: argparse.Namespace, cfg: ClusterConfig):
    return load_trace_for(cfg, args.trace, rate_scale=args.rate_scale, limit=args.limit, start_s=args.start,
                          duration_s=args.duration)


def cmd_simulate(args: argparse.Namespace) -> int:
    cfg = cluster_config(args)
    sim = ClusterSim(cfg, slo=Slo(args.slo_ttft, args.slo_tpot))
    trace = load_args_trace(args, cfg)
    bar = Progress(len(trace), "simulate", enabled=not args.quiet)
    result = sim.run(trace, progress=lambda done, total: bar.update(done))
    bar.update(len(trace))
    bar.close()
    s = result.summary
    print(f"{args.trace}: {len(trace)} requests, rate x{args.rate_scale}, {cfg.num_replicas} x {sim.latency.describe()}")
    print(f"router {cfg.router}, engine {cfg.engine_policy}, stats period {cfg.stats_period_s}s "
          f"(delivered {cfg.stats_delay_s}s later), {cfg.num_routers} router(s)")
    print(format_table(s))
    print(f"clipped to the model's context: {s['clipped']}, rejected: {s['rejected']}   simulated {s['sim_requests_per_s']:.0f} requests/s in {s['sim_wall_s']:.2f}s wall")
    for row in result.per_replica:
        print(f"  {row['replica']}: {row['requests']} requests, {row['preemptions']} preemptions, busy {row['busy_s']:.1f}s")
    if args.json:
        out = dict(s)
        out["config"] = config_dict(cfg)
        out["trace"] = args.trace
        out["rate_scale"] = args.rate_scale
        out["per_replica"] = result.per_replica
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``simulate`` to ``halffull``'s subcommands (called by loadtest/cli.py)."""
    p = subparsers.add_parser("simulate", help="replay a trace on simulated replicas in virtual time")
    add_cluster_args(p)
    p.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)
    return p
