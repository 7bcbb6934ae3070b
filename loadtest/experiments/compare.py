"""``halffull compare``: sweep routers x engine policies x rate scales (x traces) on the offline simulator.

The sweep itself (experiments, runs, the process pool, the writers) is loadtest/experiments/sweep.py; this module
is its command line and the named experiment matrices. Output (``--out``): ``results.csv`` (one row per run),
per-trace PNG plots and ``report.md``; with ``--preset paper`` also the paper's targets and findings
(loadtest/experiments/paper.py).

``PRESETS`` maps a name to a list of experiments (``--preset NAME``; format in sweep.py). A preset sets only what
it varies: the cluster flags (``--replicas``, ``--gpu``, ``--stats-period`` ...) give the base config, and
``--rate-scales`` / ``--limit``, when given, replace the preset's for every experiment.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from halffull.loadtest.experiments import paper, report
from halffull.loadtest.experiments.sweep import grid, plan, run_sweep, validate_rate_scales, write_outputs
from halffull.loadtest.progress import Progress
from halffull.loadtest.sim.cli import add_cluster_args, cluster_config
from halffull.loadtest.sim.metrics import Slo, saturation_rate_scale

__all__ = ["PRESETS", "DEFAULT_ROUTERS", "DEFAULT_ENGINE_POLICIES", "DEFAULT_RATE_SCALES", "experiments_from_args",
           "cmd_compare", "register"]

DEFAULT_ROUTERS: tuple[str, ...] = ("round_robin", "pow2", "least_requests", "sal")
DEFAULT_ENGINE_POLICIES: tuple[str, ...] = ("fcfs",)
DEFAULT_RATE_SCALES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)

# name -> experiments. ``quick``: a smoke run (well under a minute on two cores); ``paper``: the paper matrix
# (loadtest/experiments/paper.py, with its target analysis).
PRESETS: dict[str, list[dict[str, Any]]] = {
    "quick": grid(["azure_conv"], ["pow2", "sal"], ["fcfs"], [4, 12, 24], limit=1500),
    "paper": paper.experiments(),
}


# ---- CLI ---------------------------------------------------------------------------------------------------
def _split(values: Iterable[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for v in values for item in v.split(",") if item.strip()]


def _parse_scales(text: str | None) -> list[float] | None:
    if text is None:
        return None
    out = []
    for item in _split(text):
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f"--rate-scales: not a number: {item!r}") from None
    return validate_rate_scales(out, "--rate-scales")


def experiments_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}; valid: {', '.join(sorted(PRESETS))}")
        given = [flag for flag, value in (("--trace", args.trace), ("--routers", args.routers),
                                          ("--engine-policies", args.engine_policies)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --preset (the preset names them)")
        return copy.deepcopy(PRESETS[args.preset])
    traces = _split(args.trace) or ["azure_conv"]
    routers = _split(args.routers) or list(DEFAULT_ROUTERS)
    engines = _split(args.engine_policies) or list(DEFAULT_ENGINE_POLICIES)
    exps = []
    for trace in traces:
        for router in routers:
            for engine in engines:
                exps.append({"trace": trace, "rate_scales": list(DEFAULT_RATE_SCALES),
                             "config": {"router": router, "engine_policy": engine}})
    return exps


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed when run from the ``halffull`` script; otherwise an equivalent one."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog == "halffull" or sys.argv[0].endswith(os.path.join("loadtest", "cli.py")):
        return shlex.join(["halffull", *sys.argv[1:]])
    parser: argparse.ArgumentParser | None = getattr(args, "_compare_parser", None)
    words = ["halffull", "compare"]
    for action in parser._actions if parser else ():
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        opt = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(opt)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                words += [opt, str(v)]
        else:
            words += [opt, str(value)]
    return shlex.join(words)


def cmd_compare(args: argparse.Namespace) -> int:
    slo = Slo(args.slo_ttft, args.slo_tpot)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    experiments = experiments_from_args(args)
    base = cluster_config(args)
    runs = plan(experiments, base, slo=slo, rate_scales=_parse_scales(args.rate_scales), limit=args.limit)
    jobs = args.jobs or os.cpu_count() or 1
    labels = list(dict.fromkeys(r.label for r in runs))
    traces = list(dict.fromkeys(r.trace for r in runs))
    print(f"compare: {len(runs)} runs ({len(labels)} configurations x {len(traces)} trace(s) x rate scales), "
          f"{min(jobs, len(runs))} at a time -> {args.out}", file=sys.stderr)
    bar = Progress(len(runs), "compare", enabled=not args.quiet)
    start = time.monotonic()
    bar.update(0)
    rows = run_sweep(runs, jobs=jobs, progress=lambda done, total, run: bar.update(
        done, f"{run.trace} {run.label} x{run.rate_scale:g}"))
    bar.close()
    wall = time.monotonic() - start
    requests = {t: sorted({r["requests"] for r in rows if r["trace"] == t}) for t in traces}
    notes = [
        f"fleet: {base.num_replicas} replicas, {base.gpu} {base.model} ({base.step_model} step model), "
        f"stats period {base.stats_period_s:g} s, "
        f"{base.num_routers} router(s), seed {base.seed} (experiments may override)",
        "requests per run: " + ", ".join(f"{t}: {'/'.join(map(str, n))}" for t, n in requests.items()),
        f"{len(runs)} simulations, {sum(r['sim_wall_s'] for r in rows):.1f} s of simulation in {wall:.1f} s wall",
    ]
    out = write_outputs(rows, args.out, slo=slo, command=_command_line(args), notes=notes)
    if args.preset == "paper":
        with open(out["report"], "a") as f:
            f.write("\n" + paper.targets_markdown(rows, slo) + "\n" + paper.findings_markdown(rows, slo))
    for trace in traces:
        for label, srows in report.series_of(rows, trace).items():
            sat = saturation_rate_scale([(r["rate_scale"], r) for r in srows], slo)
            print(f"  {trace:14} {label:28} saturation {'none' if sat is None else f'x{sat:g}'}")
    print(f"wrote {out['csv']}, {out['report']} and {sum(len(p) for p in out['plots'].values())} plots "
          f"in {wall:.1f} s")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``compare`` to ``halffull``'s subcommands (loadtest/cli.py)."""
    p = subparsers.add_parser(
        "compare", conflict_handler="resolve",
        help="sweep routers x engine policies x rate scales on the simulator; CSV, plots, report.md",
        description="Sweep routers x engine policies x rate scales (x traces) on the offline simulator, in "
                    "parallel; write results.csv, PNG plots and report.md. Cluster flags set the base config.")
    add_cluster_args(p)
    # The sweep's axes replace the single-valued flags of the same names (old spellings kept as aliases).
    p.add_argument("--trace", action="append", default=None,
                   help="trace to sweep: azure_code | azure_conv | mooncake_conv | PATH (repeatable or "
                        "comma-separated; default azure_conv)")
    p.add_argument("--routers", "--router", dest="routers", default=None,
                   help=f"comma-separated routers (default {','.join(DEFAULT_ROUTERS)})")
    p.add_argument("--engine-policies", "--engine-policy", dest="engine_policies", default=None,
                   help=f"comma-separated engine policies (default {','.join(DEFAULT_ENGINE_POLICIES)})")
    p.add_argument("--rate-scales", "--rate-scale", dest="rate_scales", default=None,
                   help="comma-separated arrival-rate scales (default "
                        f"{','.join(f'{x:g}' for x in DEFAULT_RATE_SCALES)}; with --preset: replaces the preset's)")
    p.add_argument("--preset", default=None,
                   help="a named experiment matrix from loadtest/experiments/compare.py PRESETS "
                        f"({', '.join(sorted(PRESETS))})")
    p.add_argument("--jobs", type=int, default=None, help="parallel simulations (default: one per CPU)")
    p.add_argument("--out", default="out/compare", help="output directory (default out/compare)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare, router="sal", engine_policy="fcfs", rate_scale=1.0, _compare_parser=p)
    return p
