"""The paper experiment: every baseline against SAL and LARRY, with ablations, and the targets of issue 5.

``halffull compare --preset paper --out docs/results`` runs the matrix below on the offline simulator and
writes the usual report plus a "Targets" section computed here:

* reference load (per trace): the lowest rate scale at which pow2 + fcfs (Ray Serve's default router in front
  of vLLM's default scheduler) breaks the SLO (p99 TTFT > 2 s);
* at that load, sal + larry against pow2 + fcfs: p99 and mean TTFT, preemptions per request, throughput, TPOT
  p99; and the saturation load (highest rate scale meeting the SLO) of each;
* Mooncake (prefix-heavy): sal's mean TTFT against prefix_aware's and pow2's (all with fcfs);
* one replica: larry against fcfs (preemptions per request and mean TTFT).

Rate-scale grids bracket each trace's knee on 4 H100 Llama-3-8B replicas, finely around it (the reference
load is the first grid point past the knee, so a coarse grid would put it deep in overload); 16-replica runs
use about 4x the rate to load each replica alike. Request limits keep one run to seconds.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from halffull.loadtest.experiments.sweep import grid
from halffull.loadtest.sim.metrics import Slo, saturation_rate_scale

ROUTERS = ["round_robin", "random", "pow2", "least_requests", "prefix_aware", "sal"]
SCALES = {
    "azure_conv": [8, 10, 12, 13, 14, 14.5, 15, 15.5, 16],
    "azure_code": [0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4],
    "mooncake_conv": [2, 3, 4, 4.5, 5, 5.5, 6],
}
SCALES_16 = [32, 40, 48, 52, 56, 60]
LIMITS = {"azure_conv": 6000, "azure_code": 4000, "mooncake_conv": 3000}
BASE, PROPOSED = "pow2+fcfs", "sal+larry"


def _main_matrix() -> list[dict[str, Any]]:
    exps = []
    for trace, scales in SCALES.items():
        exps += grid([trace], ROUTERS, ["fcfs"], scales, limit=LIMITS[trace])
        exps += grid([trace], ["pow2", "sal"], ["no_preempt", "larry"], scales, limit=LIMITS[trace])
    return exps


def _fleet_variants() -> list[dict[str, Any]]:
    scales16 = SCALES_16
    exps = grid(["azure_conv"], ["pow2", "sal"], ["fcfs", "larry"], scales16, limit=4 * LIMITS["azure_conv"],
                label_suffix=" [16 replicas]", num_replicas=16)
    exps += grid(["azure_conv"], ["pow2", "sal"], ["fcfs", "larry"], [4, 5, 6, 7, 8], limit=LIMITS["azure_conv"],
                 label_suffix=" [A100]", gpu="a100")
    exps += grid(["azure_conv"], ["pow2"], ["fcfs", "larry"], [2, 2.5, 3, 3.5, 4], limit=2000,
                 label_suffix=" [1 replica]", num_replicas=1)
    return exps


def _ablations() -> list[dict[str, Any]]:
    conv, lim = SCALES["azure_conv"], LIMITS["azure_conv"]
    exps = []
    for element in ("pressure_order", "growth_reserve", "least_progress_victim"):
        exps += grid(["azure_conv"], ["sal"], ["larry"], conv, limit=lim, label_suffix=f" (no {element})",
                     engine_params={element: False})
    exps += grid(["azure_conv"], ["sal"], ["larry"], conv, limit=lim, label_suffix=" (no decode work)",
                 router_params={"use_decode_work": False})
    for period in (0.0, 2.0):
        exps += grid(["azure_conv"], ["sal"], ["larry"], conv, limit=lim, label_suffix=f" (stats {period:g} s)",
                     stats_period_s=period)
    exps += grid(["azure_conv"], ["sal"], ["larry"], conv, limit=lim, label_suffix=" (4 routers)", num_routers=4)
    exps += grid(["mooncake_conv"], ["sal"], ["fcfs"], SCALES["mooncake_conv"], limit=LIMITS["mooncake_conv"],
                 label_suffix=" (no prefix credit)", router_params={"use_prefix_credit": False})
    return exps


def experiments() -> list[dict[str, Any]]:
    return _main_matrix() + _fleet_variants() + _ablations()


# ---- targets ---------------------------------------------------------------------------------------------
def _series(rows: Sequence[Mapping[str, Any]], trace: str, label: str) -> dict[float, Mapping[str, Any]]:
    return {float(r["rate_scale"]): r for r in rows if r["trace"] == trace and r["label"] == label}


def reference_load(rows, trace: str, slo: Slo, label: str = BASE) -> float | None:
    """Lowest rate scale at which ``label`` breaks the SLO (p99 TTFT)."""
    for scale, row in sorted(_series(rows, trace, label).items()):
        if float(row["ttft_p99"]) > slo.ttft_s:
            return scale
    return None


def _ratio(a: Any, b: Any) -> float | None:
    a, b = float(a), float(b)
    if b == 0:
        return None if a != 0 else 1.0
    return a / b


def _saturation(rows, trace, label, slo) -> float | None:
    return saturation_rate_scale([(s, r) for s, r in _series(rows, trace, label).items()], slo)


def target_rows(rows: Sequence[Mapping[str, Any]], slo: Slo = Slo()) -> list[dict[str, Any]]:
    """One dict per target: name, measured ratio (or None), goal text, met (bool or None), where."""
    out: list[dict[str, Any]] = []

    def add(name, value, goal, ok, where):
        out.append({"target": name, "measured": value, "goal": goal, "met": ok, "where": where})

    for trace in ("azure_conv", "azure_code"):
        ref = reference_load(rows, trace, slo)
        base, prop = _series(rows, trace, BASE), _series(rows, trace, PROPOSED)
        if ref is None or ref not in prop:
            add(f"{trace}: reference load", None, "pow2+fcfs breaks the SLO inside the grid", False, "grid too low")
            continue
        b, p = base[ref], prop[ref]
        where = f"{trace} x{ref:g}"
        checks = [
            ("p99 TTFT", _ratio(p["ttft_p99"], b["ttft_p99"]), "<= 0.5x", lambda r: r <= 0.5),
            ("mean TTFT", _ratio(p["ttft_mean"], b["ttft_mean"]), "<= 0.5x", lambda r: r <= 0.5),
            # 0 / 0 preemptions: nothing to reduce, the target does not apply (n/a), it is not missed.
            ("preemptions/request", None if float(b["preemptions_per_request"]) == 0 else
             _ratio(p["preemptions_per_request"], b["preemptions_per_request"]), "<= 0.33x", lambda r: r <= 0.33),
            ("throughput", _ratio(p["throughput_rps"], b["throughput_rps"]), ">= 1.0x", lambda r: r >= 0.999),
            ("TPOT p99", _ratio(p["tpot_p99"], b["tpot_p99"]), "<= 1.10x", lambda r: r <= 1.10),
        ]
        for name, value, goal, test in checks:
            add(f"{trace}: sal+larry vs pow2+fcfs, {name}", value, goal, None if value is None else test(value), where)
        sb, sp = _saturation(rows, trace, BASE, slo), _saturation(rows, trace, PROPOSED, slo)
        value = None if not sb or sp is None else sp / sb
        add(f"{trace}: saturation load", value, ">= 1.25x", None if value is None else value >= 1.25,
            f"{trace}: pow2+fcfs x{sb}, sal+larry x{sp}")

    trace = "mooncake_conv"
    ref = reference_load(rows, trace, slo)
    if ref is not None:
        sal, pa, p2 = (_series(rows, trace, lab).get(ref) for lab in ("sal+fcfs", "prefix_aware+fcfs", "pow2+fcfs"))
        if sal and pa and p2:
            where = f"{trace} x{ref:g}"
            r1 = _ratio(sal["ttft_mean"], pa["ttft_mean"])
            r2 = _ratio(sal["ttft_mean"], p2["ttft_mean"])
            add(f"{trace}: sal vs prefix_aware, mean TTFT", r1, "<= 1.0x", r1 is not None and r1 <= 1.0, where)
            add(f"{trace}: sal vs pow2, mean TTFT", r2, "<= 0.5x", r2 is not None and r2 <= 0.5, where)
    else:
        add(f"{trace}: reference load", None, "pow2+fcfs breaks the SLO inside the grid", False, "grid too low")

    fc, la = (_series(rows, "azure_conv", f"pow2+{e} [1 replica]") for e in ("fcfs", "larry"))
    loaded = [s for s in sorted(fc) if float(fc[s]["preemptions_per_request"]) > 0 and s in la]
    if loaded:
        s = loaded[0]
        where = f"azure_conv, 1 replica, x{s:g} (lowest load with fcfs preemptions)"
        r1 = _ratio(la[s]["preemptions_per_request"], fc[s]["preemptions_per_request"])
        r2 = _ratio(la[s]["ttft_mean"], fc[s]["ttft_mean"])
        add("1 replica: larry vs fcfs, preemptions/request", r1, "<= 0.33x", r1 is not None and r1 <= 0.33, where)
        add("1 replica: larry vs fcfs, mean TTFT", r2, "<= 1.0x", r2 is not None and r2 <= 1.0, where)
    else:
        add("1 replica: larry vs fcfs", None, "fcfs preempts somewhere in the grid", False, "no fcfs preemptions")
    return out


def targets_markdown(rows: Sequence[Mapping[str, Any]], slo: Slo = Slo()) -> str:
    lines = ["## Targets (issue 5)", "",
             f"Reference load: the lowest rate scale at which {BASE} breaks the SLO (p99 TTFT > {slo.ttft_s:g} s).",
             "Ratios are proposed / baseline, measured side by side in this run.", "",
             "| target | measured | goal | met | where |", "|:---|---:|:---|:---|:---|"]
    for t in target_rows(rows, slo):
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}x"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} | {t['where']} |")
    return "\n".join(lines) + "\n"


# ---- findings: the ablations at the reference load, and the log of policy changes ------------------------
CHANGES = """\
Policy changes made while measuring (each kept only because the matrix improved; the definitions in the
module docstrings are the current ones):

1. LARRY aging: ``tau`` 0.5 -> 0.05 s/block, ``max_wait_s`` 30 -> 5 s. With the slow aging, large requests
   waited tens of seconds under pressure and p99 TTFT rose above fcfs's (Azure conv x16: 1.16x). Faster aging
   trades a little mean TTFT for the tail that the SLO is written on.
2. LARRY admission checks ``m_r`` = blocks for the whole prompt after hits, as DESIGN.md specifies, not just
   the first chunk. Checking the chunk admitted long prompts that could not grow into their memory, then
   preempted them (Mooncake x5: 0.245 -> 0.001 preemptions/request).
3. SAL loads are net of prefix-cache hits on both sides: replicas publish waiting prompt tokens minus the hits
   admission would find, and routers record their deltas as the uncached prompt (``uncached_prompt_tokens``).
4. SAL ``prefix_credit_weight`` = 8: a cached prompt token is worth 8 queued tokens. With weight 1 SAL minimised
   the request's own finish time and, under load, moved conversations off the replica holding their prefix;
   the recompute then delayed everyone behind it (Mooncake x5 mean TTFT 1.98 s vs prefix_aware 0.81 s;
   weights 2/4/8/16 gave 1.19/0.96/0.76/0.71 s).
5. SAL ``decode_weight`` = 0.5 (fixed) instead of each replica's marginal decode cost (about 2 prefill
   tokens per decode token at large batches). The ablation "no decode work" beat the default at the
   reference load; 0.5 was best or near-best on both traces (Azure conv x15 p99 TTFT 0.48 vs 0.65 s;
   Mooncake x5 2.5 vs 3.8 s; TPOT p99 lower too): TTFT is set by the prefill queue, which decode work slows
   less than it costs in throughput.
6. The engine now makes vLLM 0.32's decisions exactly (free-queue order, full-sequence admission gate; found
   by the parity harness, replicas/vllm/parity.py), which changed the fcfs baseline itself.
"""

ABLATION_LABELS = [
    "pow2+fcfs", "sal+fcfs", "pow2+larry", "sal+larry", "sal+larry (no pressure_order)",
    "sal+larry (no growth_reserve)", "sal+larry (no least_progress_victim)", "sal+larry (no decode work)",
    "sal+larry (stats 0 s)", "sal+larry (stats 2 s)", "sal+larry (4 routers)",
]


def ablation_markdown(rows: Sequence[Mapping[str, Any]], slo: Slo = Slo(), trace: str = "azure_conv") -> str:
    ref = reference_load(rows, trace, slo)
    if ref is None:
        return ""
    lines = [f"## Ablations at the reference load ({trace} x{ref:g})", "",
             "| configuration | p99 TTFT | mean TTFT | TPOT p99 | preemptions/req | throughput | saturation |",
             "|:---|---:|---:|---:|---:|---:|---:|"]
    for label in ABLATION_LABELS:
        row = _series(rows, trace, label).get(ref)
        if row is None:
            continue
        sat = _saturation(rows, trace, label, slo)
        lines.append(f"| {label} | {float(row['ttft_p99']):.2f} s | {float(row['ttft_mean']):.3f} s | "
                     f"{1e3 * float(row['tpot_p99']):.0f} ms | {float(row['preemptions_per_request']):.3f} | "
                     f"{float(row['throughput_rps']):.1f}/s | {'none' if sat is None else f'x{sat:g}'} |")
    return "\n".join(lines) + "\n"


def findings_markdown(rows: Sequence[Mapping[str, Any]], slo: Slo = Slo()) -> str:
    return ablation_markdown(rows, slo) + "\n## Changes made to the policies\n\n" + CHANGES


def rewrite_report(out_dir: str) -> None:
    """Recompute the Targets and findings sections of ``out_dir/report.md`` from its results.csv."""
    from pathlib import Path

    from halffull.loadtest.experiments.report import read_csv

    path = Path(out_dir) / "report.md"
    rows = read_csv(Path(out_dir) / "results.csv")
    text = path.read_text()
    head = text.split("\n## Targets (issue 5)")[0].rstrip("\n")
    path.write_text(head + "\n\n" + targets_markdown(rows) + "\n" + findings_markdown(rows))


if __name__ == "__main__":
    import sys

    rewrite_report(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
