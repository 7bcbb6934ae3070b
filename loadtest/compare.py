"""``halffull compare``: sweep routers x engine policies x rate scales (x traces) on the offline simulator.

Each run is one ``ClusterSim.run`` (what ``simulate()`` does) of one configuration at one arrival-rate scale on
one trace, in a process pool (``--jobs``); the simulator is deterministic for a seed, and rows are collected in
plan order, so the results do not depend on the number of jobs (only ``sim_wall_s`` does). Output (``--out``):
``results.csv`` (one row per run), per-trace PNG plots and ``report.md`` (writers in loadtest/report.py).

Experiments and presets
-----------------------
A sweep is a list of *experiments*; an experiment is a dict::

    {
        "label": "sal (no decode work)",     # series name in plots and tables (default: "<router>+<engine>",
                                             #   plus any router/engine params)
        "trace": "azure_conv",               # builtin trace name or a path
        "rate_scales": [1, 2, 4, 8],         # one run per scale
        "config": {"router": "sal",          # ClusterConfig overrides, applied (dataclasses.replace) over the
                   "router_params": {"use_decode_work": False}},  # base config from the cluster flags
        "limit": 2000,                       # optional: first N requests (the --limit flag wins when given)
        "start_s": 0.0, "duration_s": None,  # optional: trace window (original timeline)
    }

``PRESETS`` maps a name to a list of experiments (``--preset NAME``); ``grid()`` builds the usual
traces x routers x engine policies product, so a preset reads e.g. ``grid(...) + [ablation, ...]``. A preset
sets only what it varies: the cluster flags (``--replicas``, ``--gpu``, ``--stats-period`` ...) give the base
config, and ``--rate-scales`` / ``--limit``, when given, replace the preset's for every experiment. Two
experiments on one trace must not share a label (they would be one series).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from halffull.loadtest import report
from halffull.loadtest.cluster_sim import ClusterConfig, ClusterSim, load_trace_for
from halffull.loadtest.metrics import Slo, saturation_rate_scale
from halffull.loadtest.traces import load_trace

__all__ = ["PRESETS", "DEFAULT_ROUTERS", "DEFAULT_ENGINE_POLICIES", "DEFAULT_RATE_SCALES", "EXPERIMENT_KEYS",
           "Run", "grid", "default_label", "plan", "run_one", "run_sweep", "write_outputs", "git_commit",
           "cmd_compare", "register"]

DEFAULT_ROUTERS: tuple[str, ...] = ("round_robin", "pow2", "least_requests", "sal")
DEFAULT_ENGINE_POLICIES: tuple[str, ...] = ("fcfs",)
DEFAULT_RATE_SCALES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
EXPERIMENT_KEYS = frozenset({"label", "trace", "rate_scales", "config", "limit", "start_s", "duration_s"})
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ClusterConfig))


def grid(traces: Iterable[str], routers: Iterable[str], engine_policies: Iterable[str],
         rate_scales: Iterable[float], *, limit: int | None = None, start_s: float = 0.0,
         duration_s: float | None = None, label_suffix: str = "", **config: Any) -> list[dict[str, Any]]:
    """traces x routers x engine policies as experiments; ``config`` are ClusterConfig overrides shared by all
    (e.g. ``stats_period_s=2.0``), ``label_suffix`` tells such a variant apart (e.g. ``" (stats 2 s)"``)."""
    out = []
    for trace in traces:
        for router in routers:
            for engine in engine_policies:
                out.append({
                    "label": f"{router}+{engine}{label_suffix}", "trace": trace, "rate_scales": list(rate_scales),
                    "config": {"router": router, "engine_policy": engine, **copy.deepcopy(config)},
                    "limit": limit, "start_s": start_s, "duration_s": duration_s,
                })
    return out


# name -> experiments. ``quick``: a smoke run (well under a minute on two cores).
PRESETS: dict[str, list[dict[str, Any]]] = {
    "quick": grid(["azure_conv"], ["pow2", "sal"], ["fcfs"], [4, 12, 24], limit=1500),
}


def default_label(cfg: ClusterConfig) -> str:
    label = f"{cfg.router}+{cfg.engine_policy}"
    params = [f"{k}={v}" for k, v in sorted(cfg.router_params.items())]
    params += [f"{k}={v}" for k, v in sorted(cfg.engine_params.items())]
    return label + (f" ({', '.join(params)})" if params else "")


@dataclass(frozen=True)
class Run:
    """One job: one configuration at one rate scale on one trace (picklable; sent to a worker)."""

    index: int
    trace: str
    label: str
    rate_scale: float
    config: ClusterConfig
    slo: Slo
    limit: int | None = None
    start_s: float = 0.0
    duration_s: float | None = None


def _rate_scales(values: Any, where: str) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{where}: rate_scales must be a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < float(v) < float("inf")):
            raise ValueError(f"{where}: rate scales must be positive numbers, got {v!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: duplicate rate scales in {values!r}")
    return out


def plan(experiments: Sequence[Mapping[str, Any]], base: ClusterConfig, *, slo: Slo = Slo(),
         rate_scales: Sequence[float] | None = None, limit: int | None = None) -> list[Run]:
    """Experiments -> runs (in order: experiment, then rate scale), every configuration checked up front.

    ``rate_scales`` / ``limit`` (the CLI flags), when given, replace every experiment's own. Raises ValueError
    (unknown key, router, engine policy, parameter, GPU or model; duplicate series) or FileNotFoundError.
    """
    if not experiments:
        raise ValueError("nothing to compare: no experiments")
    runs: list[Run] = []
    seen: set[tuple[str, str, float]] = set()
    checked: set[str] = set()
    for n, exp in enumerate(experiments):
        where = f"experiment {n} ({exp.get('label', '?')!r})" if isinstance(exp, Mapping) else f"experiment {n}"
        if not isinstance(exp, Mapping):
            raise ValueError(f"{where}: must be a dict, got {type(exp).__name__}")
        unknown = sorted(set(exp) - EXPERIMENT_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; valid: {sorted(EXPERIMENT_KEYS)}")
        if not exp.get("trace"):
            raise ValueError(f"{where}: needs a 'trace'")
        overrides = dict(exp.get("config") or {})
        bad = sorted(set(overrides) - _CONFIG_FIELDS)
        if bad:
            raise ValueError(f"{where}: unknown ClusterConfig fields {bad}; valid: {sorted(_CONFIG_FIELDS)}")
        cfg = dataclasses.replace(base, **copy.deepcopy(overrides))
        key = repr(sorted(dataclasses.asdict(cfg).items()))
        if key not in checked:  # unknown router / engine policy / params / GPU / model fail here, not in a worker
            ClusterSim(cfg, slo=slo)
            checked.add(key)
        label = str(exp.get("label") or default_label(cfg))
        scales = _rate_scales(list(rate_scales) if rate_scales else exp.get("rate_scales"), where)
        exp_limit = limit if limit is not None else exp.get("limit")
        for scale in scales:
            ident = (str(exp["trace"]), label, scale)
            if ident in seen:
                raise ValueError(f"{where}: label {label!r} at rate scale {scale:g} on {exp['trace']!r} twice; "
                                 "give each experiment on a trace its own label")
            seen.add(ident)
            runs.append(Run(len(runs), str(exp["trace"]), label, scale, cfg, slo, exp_limit,
                            float(exp.get("start_s") or 0.0), exp.get("duration_s")))
    for trace, lim, start, dur in dict.fromkeys((r.trace, r.limit, r.start_s, r.duration_s) for r in runs):
        if not load_trace(trace, limit=lim, start_s=start, duration_s=dur):  # also: missing file, bad args
            raise ValueError(f"trace {trace!r} has no requests in the selected window")
    return runs


def run_one(run: Run) -> dict[str, Any]:
    """One simulation; the result row (config columns + summary). Runs in a worker process."""
    trace = load_trace_for(run.config, run.trace, rate_scale=run.rate_scale, limit=run.limit,
                           start_s=run.start_s, duration_s=run.duration_s)
    sim = ClusterSim(run.config, slo=run.slo)
    result = sim.run(trace)
    cfg = run.config
    row: dict[str, Any] = {
        "trace": run.trace, "label": run.label, "router": cfg.router, "engine_policy": cfg.engine_policy,
        "rate_scale": run.rate_scale, "replicas": cfg.num_replicas, "gpu": cfg.gpu, "model": cfg.model,
        "tp": sim.latency.tp, "stats_period": cfg.stats_period_s, "num_routers": cfg.num_routers,
        "router_params": json.dumps(cfg.router_params, sort_keys=True),
        "engine_params": json.dumps(cfg.engine_params, sort_keys=True),
        "seed": cfg.seed, "limit": run.limit, "requests": len(trace),
    }
    sched = getattr(sim, "sched_config", None)  # the engine limits the replicas ran with (defaults resolved)
    for key in ("num_blocks", "max_num_seqs", "max_num_batched_tokens"):
        row[key] = getattr(sched, key, None) if sched is not None else getattr(cfg, key, None)
    for key in report.SUMMARY_COLUMNS:
        row[key] = result.summary.get(key)
    return row


def run_sweep(runs: Sequence[Run], *, jobs: int | None = None,
              progress: Callable[[int, int, Run], None] | None = None) -> list[dict[str, Any]]:
    """All runs, ``jobs`` at a time (None: one per CPU; 1: in this process); rows in ``runs`` order."""
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    rows: dict[int, dict[str, Any]] = {}
    workers = min(jobs, len(runs))
    if workers <= 1:
        for run in runs:
            rows[run.index] = run_one(run)
            if progress:
                progress(len(rows), len(runs), run)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        try:
            pending = {pool.submit(run_one, run): run for run in runs}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    run = pending.pop(fut)
                    rows[run.index] = fut.result()  # a worker's exception surfaces here
                    if progress:
                        progress(len(rows), len(runs), run)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [rows[run.index] for run in runs]


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the checkout this package lives in; "unknown" outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _title_note(rows: Sequence[Mapping[str, Any]]) -> str:
    fleets = {(r["replicas"], r["gpu"], r["model"]) for r in rows}
    if len(fleets) != 1:
        return ""
    replicas, gpu, model = next(iter(fleets))
    return f"{replicas} × {gpu} {model}"


def write_outputs(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, *, slo: Slo, command: str,
                  commit: str | None = None, notes: Sequence[str] = ()) -> dict[str, Any]:
    """results.csv, the PNGs and report.md under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = report.write_csv(rows, out_dir / "results.csv")
    plots = report.write_plots(rows, out_dir, slo=slo, title_note=_title_note(rows))
    md_path = report.write_markdown(rows, out_dir / "report.md", slo=slo, title="halffull compare: offline simulator",
                                    commit=commit if commit is not None else git_commit(), command=command,
                                    notes=notes, plots=plots)
    return {"csv": csv_path, "plots": plots, "report": md_path}


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
    return _rate_scales(out, "--rate-scales")


def _load_presets() -> None:
    # The paper matrix lives with its target analysis (loadtest/paper.py), which builds on grid() above.
    if "paper" not in PRESETS:
        from halffull.loadtest import paper

        PRESETS["paper"] = paper.experiments()


def experiments_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.preset is not None:
        _load_presets()
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
    from halffull.loadtest.cli import cluster_config
    from halffull.loadtest.progress import Progress

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
        f"fleet: {base.num_replicas} replicas, {base.gpu} {base.model}, stats period {base.stats_period_s:g} s, "
        f"{base.num_routers} router(s), seed {base.seed} (experiments may override)",
        "requests per run: " + ", ".join(f"{t}: {'/'.join(map(str, n))}" for t, n in requests.items()),
        f"{len(runs)} simulations, {sum(r['sim_wall_s'] for r in rows):.1f} s of simulation in {wall:.1f} s wall",
    ]
    out = write_outputs(rows, args.out, slo=slo, command=_command_line(args), notes=notes)
    if args.preset == "paper":
        from halffull.loadtest import paper

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
    """Add ``compare`` to ``halffull``'s subcommands (called by loadtest/cli.py)."""
    from halffull.loadtest.cli import add_cluster_args

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
                   help=f"a named experiment matrix from loadtest/compare.py PRESETS ({', '.join(sorted(PRESETS))})")
    p.add_argument("--jobs", type=int, default=None, help="parallel simulations (default: one per CPU)")
    p.add_argument("--out", default="out/compare", help="output directory (default out/compare)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare, router="sal", engine_policy="fcfs", rate_scale=1.0, _compare_parser=p)
    return p
