"""Comparison reports: CSV, PNG plots and Markdown, as pure functions over a list of result rows.

A *row* is a flat dict describing one run (one configuration at one arrival-rate scale on one trace):

    trace, label, rate_scale      required: what the plots and tables are keyed by (``label`` names the
                                  series: a router+engine pair or an ablation variant)
    router, engine_policy, ...    the configuration (see ``CONFIG_COLUMNS``; missing ones are left blank)
    completed, ttft_p99, ...      ``metrics.summarize`` keys (see ``SUMMARY_COLUMNS``)

The offline sweep (``halffull compare``, loadtest/experiments/compare.py) and the live load-test comparison both produce
such rows and call ``write_csv``, ``write_plots`` and ``write_markdown`` here. Nothing in this module runs a
simulation or reads a clock: the same rows give the same files (PNG bytes aside, which matplotlib decides).
"""

from __future__ import annotations

import csv
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from halffull.loadtest.sim.metrics import Slo, saturation_rate_scale

__all__ = [
    "CONFIG_COLUMNS", "SUMMARY_COLUMNS", "WALL_CLOCK_COLUMNS", "RESULT_COLUMNS", "PLOTS",
    "write_csv", "read_csv", "traces_of", "series_of", "slug", "plot_files", "write_plots",
    "markdown_report", "write_markdown", "meets_slo",
]

CONFIG_COLUMNS: tuple[str, ...] = (
    "trace", "label", "router", "engine_policy", "rate_scale", "replicas", "gpu", "model", "tp",
    "stats_period", "num_routers", "router_params", "engine_params", "num_blocks", "max_num_seqs",
    "max_num_batched_tokens", "seed", "limit", "requests",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "completed", "failed", "rejected", "clipped",
    "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99",
    "tpot_mean", "tpot_p50", "tpot_p90", "tpot_p99",
    "e2e_mean", "e2e_p50", "e2e_p90", "e2e_p99",
    "throughput_rps", "output_tokens_per_s", "preemptions_per_request", "goodput_rps", "slo_attainment",
    "prefix_hit_rate", "duration_s", "slo_ttft_s", "slo_tpot_s", "sim_wall_s",
)
# Columns measured on the wall clock: the only ones that may differ between two runs of the same sweep.
WALL_CLOCK_COLUMNS: tuple[str, ...] = ("sim_wall_s",)
RESULT_COLUMNS: tuple[str, ...] = CONFIG_COLUMNS + SUMMARY_COLUMNS

_INT_COLUMNS = {"replicas", "tp", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "num_routers", "seed",
                "limit", "requests", "completed", "failed", "rejected"}
_STR_COLUMNS = {"trace", "label", "router", "engine_policy", "gpu", "model", "router_params", "engine_params"}

# name -> (summary key, y label, title, log y, draw the TTFT SLO line)
PLOTS: "OrderedDict[str, tuple[str, str, str, bool, bool]]" = OrderedDict([
    ("ttft_p99", ("ttft_p99", "p99 TTFT (s, log scale)", "p99 time to first token", True, True)),
    ("ttft_mean", ("ttft_mean", "mean TTFT (s, log scale)", "Mean time to first token", True, True)),
    ("goodput", ("goodput_rps", "goodput (requests/s meeting the SLO)", "Goodput", False, False)),
    ("preemptions", ("preemptions_per_request", "preemptions per request", "Preemptions per request",
                     False, False)),
])


# ---- CSV ---------------------------------------------------------------------------------------------------
def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest exact round trip
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path,
              columns: Sequence[str] = RESULT_COLUMNS) -> Path:
    """One line per row, ``columns`` in order (a row's other keys are appended after them, sorted)."""
    extra = sorted({k for row in rows for k in row} - set(columns))
    header = list(columns) + extra
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(col)) for col in header])
    return path


def _parse(col: str, text: str) -> Any:
    if text == "":
        return None
    if col in _STR_COLUMNS:
        return text
    try:
        return int(text) if col in _INT_COLUMNS else float(text)
    except ValueError:
        return text


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by ``write_csv``, numbers parsed back (blank cells read as None)."""
    with Path(path).open(newline="") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


# ---- grouping ----------------------------------------------------------------------------------------------
def traces_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Traces in first-seen order."""
    return list(OrderedDict.fromkeys(str(r["trace"]) for r in rows))


def series_of(rows: Iterable[Mapping[str, Any]], trace: str) -> "OrderedDict[str, list[Mapping[str, Any]]]":
    """label -> that series' rows on ``trace``, sorted by rate scale; labels in first-seen order."""
    out: OrderedDict[str, list] = OrderedDict()
    for r in rows:
        if str(r["trace"]) == trace:
            out.setdefault(str(r["label"]), []).append(r)
    for label in out:
        out[label].sort(key=lambda r: float(r["rate_scale"]))
    return out


def _scales(rows: Iterable[Mapping[str, Any]]) -> list[float]:
    return sorted({float(r["rate_scale"]) for r in rows})


def slug(name: str) -> str:
    """A file-name-safe form of a trace name or path (``/data/my trace.csv`` -> ``my_trace``)."""
    stem = Path(str(name)).name
    stem = re.sub(r"\.(csv|jsonl?)$", "", stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "trace"


def _fmt_scale(x: float) -> str:
    return f"{float(x):g}"


def meets_slo(row: Mapping[str, Any], slo: Slo) -> bool:
    """Whether one point meets the saturation criterion (p99 TTFT within the SLO, next to no failures)."""
    return saturation_rate_scale([(float(row["rate_scale"]), row)], slo) is not None


# ---- plots -------------------------------------------------------------------------------------------------
def plot_files(trace: str) -> dict[str, str]:
    """Plot name -> PNG file name (relative to the output directory) for ``trace``."""
    return {name: f"{slug(trace)}_{name}.png" for name in PLOTS}


def panel_of(label: str) -> str:
    """Which figure a series goes in: "" (the main fleet), a bracketed variant ("16 replicas", "A100"), or
    "ablations" for labels with a parenthesised change."""
    m = re.search(r"\[(.+?)\]", label)
    if m:
        return m.group(1)
    return "ablations" if "(" in label else ""


def panels(series: "OrderedDict[str, list]") -> "OrderedDict[str, OrderedDict[str, list]]":
    """Series split into figures; an ablation panel also shows the configuration being ablated."""
    out: OrderedDict[str, OrderedDict[str, list]] = OrderedDict()
    for label, srows in series.items():
        out.setdefault(panel_of(label), OrderedDict())[label] = srows
    ablations = out.get("ablations")
    if ablations is not None:
        bases = OrderedDict((b, series[b]) for b in dict.fromkeys(lab.split(" (")[0] for lab in ablations)
                            if b in series)
        out["ablations"] = OrderedDict(list(bases.items()) + list(ablations.items()))
    return out


def write_plots(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, *, slo: Slo = Slo(),
                title_note: str = "") -> dict[str, dict[str, Path]]:
    """Figures per trace and panel (``panels``): trace -> plot name -> PNG path. The main panel keeps the
    ``plot_files`` names; other panels are named "<plot> [<panel>]". ``title_note`` goes under each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for trace in traces_of(rows):
        written[trace] = {}
        for panel, series in panels(series_of(rows, trace)).items():
            files = plot_files(trace) if not panel else {
                name: f"{slug(trace)}_{slug(panel)}_{name}.png" for name in PLOTS}
            for name, path in _panel_figures(plt, series, files, out_dir, trace, panel, slo, title_note).items():
                written[trace][name if not panel else f"{name} [{panel}]"] = path
    return written


def _panel_figures(plt, series, files, out_dir, trace, panel, slo, title_note) -> dict[str, Path]:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    markers = "osD^v<>pPX*h"
    scales = _scales(r for rs in series.values() for r in rs)
    written: dict[str, Path] = {}
    for name, (key, ylabel, title, log_y, slo_line) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
        for i, (label, srows) in enumerate(series.items()):
            xs = [float(r["rate_scale"]) for r in srows]
            ys = [float(r.get(key) or 0.0) for r in srows]
            if log_y:
                ys = [max(y, 1e-3) for y in ys]  # a log axis cannot show 0
            ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.8, markersize=6, label=label,
                    color=f"C{i % 10}")
        if slo_line:
            ax.axhline(slo.ttft_s, color="black", linestyle="--", linewidth=1.2,
                       label=f"SLO: TTFT = {slo.ttft_s:g} s")
        if log_y:
            ax.set_yscale("log")
            # Plain decimals (0.2, 0.5, 1, 2) instead of 2×10⁻¹: ticks at 1-2-5 per decade.
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.set_xticks(scales)
        ax.set_xticklabels([f"{_fmt_scale(x)}×" for x in scales], rotation=45, ha="right")
        ax.set_xlabel("arrival rate scale (× the trace's rate)")
        ax.set_ylabel(ylabel)
        sub = f"{trace}" + (f" [{panel}]" if panel else "") + (f" — {title_note}" if title_note else "")
        if key == "goodput_rps":
            sub += f" — SLO: TTFT ≤ {slo.ttft_s:g} s, TPOT ≤ {slo.tpot_s * 1e3:g} ms"
        ax.set_title(f"{title} vs load\n{sub}", fontsize=11)
        ax.grid(True, which="major", alpha=0.35)
        if log_y:
            ax.grid(True, which="minor", alpha=0.12)
        # Outside the axes: with many series an inside legend hides the data.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.85)
        fig.tight_layout()
        path = out_dir / files[name]
        fig.savefig(path)
        plt.close(fig)
        written[name] = path
    return written


# ---- Markdown ----------------------------------------------------------------------------------------------
def _fmt_s(x: Any) -> str:
    if x is None:
        return "–"
    x = float(x)
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.0f} ms"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def markdown_report(rows: Sequence[Mapping[str, Any]], *, slo: Slo = Slo(), title: str = "Scheduling comparison",
                    commit: str = "unknown", command: str = "", notes: Sequence[str] = (),
                    plots: Mapping[str, Mapping[str, str | Path]] | None = None) -> str:
    """The report: header (commit, command, notes), then per trace a p99 TTFT / goodput table (rows = series,
    columns = rate scales), a saturation table and the plots (``plots``: trace -> name -> path, made relative
    to the report's directory by the caller; default: ``plot_files`` names)."""
    lines = [f"# {title}", "", f"- commit: `{commit}`"]
    if command:
        lines.append(f"- command: `{command}`")
    lines.append(f"- SLO: TTFT ≤ {slo.ttft_s:g} s and TPOT ≤ {slo.tpot_s * 1e3:g} ms per request (goodput); "
                 f"saturation = highest rate scale whose p99 TTFT ≤ {slo.ttft_s:g} s, walking up from the "
                 "lowest and stopping at the first miss")
    lines += [f"- {note}" for note in notes]
    lines.append("")
    for trace in traces_of(rows):
        series = series_of(rows, trace)
        scales = _scales(r for rs in series.values() for r in rs)
        lines += [f"## {trace}", "",
                  "p99 TTFT / goodput (requests/s meeting the SLO); ✗ = p99 TTFT misses the SLO "
                  "(or over 1 % of requests failed).", ""]
        header = ["router + engine"] + [f"{_fmt_scale(x)}×" for x in scales]
        body = []
        for label, srows in series.items():
            by_scale = {float(r["rate_scale"]): r for r in srows}
            cells = [label]
            for x in scales:
                r = by_scale.get(x)
                if r is None:
                    cells.append("–")
                    continue
                mark = "" if meets_slo(r, slo) else " ✗"
                cells.append(f"{_fmt_s(r.get('ttft_p99'))} / {float(r.get('goodput_rps') or 0.0):.2f}{mark}")
            body.append(cells)
        lines += _md_table(header, body, [":---"] + ["---:"] * len(scales))
        lines += ["", f"Saturation (p99 TTFT ≤ {slo.ttft_s:g} s):", ""]
        sat_body = []
        for label, srows in series.items():
            sat = saturation_rate_scale([(float(r["rate_scale"]), r) for r in srows], slo)
            if sat is None:
                sat_text = f"< {_fmt_scale(min(float(r['rate_scale']) for r in srows))}×"
            elif sat == max(float(r["rate_scale"]) for r in srows):
                sat_text = f"≥ {_fmt_scale(sat)}×"
            else:
                sat_text = f"{_fmt_scale(sat)}×"
            best = max(srows, key=lambda r: float(r.get("goodput_rps") or 0.0))
            sat_body.append([label, sat_text, f"{float(best.get('goodput_rps') or 0.0):.2f} "
                                              f"(at {_fmt_scale(best['rate_scale'])}×)"])
        lines += _md_table(["router + engine", "saturation rate scale", "peak goodput (req/s)"], sat_body,
                           [":---", "---:", "---:"])
        files = (plots or {}).get(trace) or plot_files(trace)
        lines += ["", "Plots: " + " · ".join(f"[{name}]({Path(p).as_posix()})" for name, p in files.items()), ""]
        for name, p in files.items():
            lines.append(f"![{trace} {name}]({Path(p).as_posix()})")
        lines.append("")
    return "\n".join(lines)


def write_markdown(rows: Sequence[Mapping[str, Any]], path: str | Path, **kw) -> Path:
    """``markdown_report(rows, **kw)`` written to ``path``; plot paths are made relative to its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plots = kw.pop("plots", None)
    if plots is not None:
        base = path.parent.resolve()
        plots = {t: {n: _relative(p, base) for n, p in files.items()} for t, files in plots.items()}
    path.write_text(markdown_report(rows, plots=plots, **kw))
    return path


def _relative(p: str | Path, base: Path) -> str:
    p = Path(p)
    try:
        return p.resolve().relative_to(base).as_posix()
    except ValueError:
        return p.as_posix()

