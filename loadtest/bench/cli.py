"""``halffull bench NAME``: benchmarks that print figures (speed targets live here, not in timed unit tests).

  bench sim     simulated requests per wall-clock second of the offline cluster simulator (issue target:
                >= 20,000 on the Azure conversation trace, 4 H100 replicas, fcfs, sal), with the jump over
                identical decode steps on, and the step-by-step reference on a slice, in the same run
  bench router  microseconds per policy.choose() call at 4/16/64/256 replicas (target < 50 us at 64)
  bench serve   requests/s through the full HTTP path with instant simulated replicas, halffull's router vs
                Ray's default, same run (target ratio >= 0.95); starts a local loopback-only Ray cluster
  bench stream  tokens/s and server CPU per output token per process (ingress, proxy, replica, controller),
                N concurrent streams x T tokens, streamed and not, real-cadence and instant replicas,
                halffull's router and Ray's default in the same run (targets: <= 0.1 ms per streamed token,
                <= 0.05 non-streamed, TTFT-out median < 1 ms at 32 streams); loopback-only Ray cluster
  bench engine  the simulated engine alone, one replica's share of bench stream's phases (same flags): tokens/s
                and its CPU per token and per step, the part of bench stream's replica column that stands in
                for the GPU engine's own work

A benchmark is a module with ``cmd_bench(args) -> exit status`` and, if it takes flags, ``add_arguments(parser)``
(they go on the one ``bench`` parser, so every benchmark accepts every flag); adding one is one line in
``BENCHES``.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from halffull.loadtest.bench import engine, router, serve, sim, stream

BENCHES: dict[str, ModuleType] = {
    "sim": sim,
    "router": router,
    "serve": serve,
    "stream": stream,
    "engine": engine,
}


def cmd_bench(args: argparse.Namespace) -> int:
    return BENCHES[args.what].cmd_bench(args)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to ``halffull``'s subcommands (called by loadtest/cli.py)."""
    p = subparsers.add_parser("bench", help="benchmarks that print figures")
    p.add_argument("what", choices=list(BENCHES))
    for module in BENCHES.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p
