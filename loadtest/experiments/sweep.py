"""The offline sweep: experiments -> runs -> rows -> results.csv, plots and report.md.

A run is one ``ClusterSim.run`` (what ``simulate()`` does) of one configuration at one arrival-rate scale on one
trace; ``run_sweep`` runs them in a process pool (``jobs``). The simulator is deterministic for a seed, and rows
are collected in plan order, so the results do not depend on the number of jobs (only ``sim_wall_s`` does).
Writers in loadtest/experiments/report.py. ``halffull compare`` (loadtest/experiments/compare.py) is its
command line; the paper matrix (loadtest/experiments/paper.py) is a list of experiments built with ``grid``.

Experiments
-----------
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

``grid()`` builds the usual traces x routers x engine policies product, so a preset reads e.g.
``grid(...) + [ablation, ...]``. Two experiments on one trace must not share a label (they would be one series).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from halffull.loadtest.experiments import report
from halffull.loadtest.sim.cluster import ClusterConfig, ClusterSim, load_trace_for
from halffull.loadtest.sim.metrics import Slo
from halffull.loadtest.sim.traces import load_trace

__all__ = ["EXPERIMENT_KEYS", "Run", "grid", "default_label", "validate_rate_scales", "plan", "run_one",
           "run_sweep", "write_outputs", "git_commit"]

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


def validate_rate_scales(values: Any, where: str) -> list[float]:
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
        scales = validate_rate_scales(list(rate_scales) if rate_scales else exp.get("rate_scales"), where)
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
