"""``halffull compare`` (loadtest/experiments/compare.py, sweep.py) and its writers (loadtest/experiments/report.py),
on a tiny sweep."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from halffull.loadtest.experiments import compare, report, sweep
from halffull.loadtest.cli import main
from halffull.loadtest.sim.cluster import ClusterConfig
from halffull.loadtest.sim.metrics import Slo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["compare", "--trace", "azure_conv", "--routers", "pow2,sal", "--engine-policies", "fcfs",
        "--rate-scales", "2,4", "--replicas", "2", "--limit", "200", "--quiet"]


def _sweep(out: Path, jobs: int) -> Path:
    assert main([*TINY, "--jobs", str(jobs), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sweep2(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory.mktemp("jobs2"), 2)


@pytest.fixture(scope="module")
def sweep1(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory.mktemp("jobs1"), 1)


def _rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_csv_has_one_row_per_run_and_every_column(sweep2):
    header, rows = _rows(sweep2)
    assert header[: len(report.RESULT_COLUMNS)] == list(report.RESULT_COLUMNS)
    for col in ("trace", "router", "engine_policy", "rate_scale", "replicas", "gpu", "model", "stats_period",
                "num_routers", "label", "completed", "failed", "ttft_p99", "tpot_mean", "e2e_p90",
                "throughput_rps", "output_tokens_per_s", "preemptions_per_request", "goodput_rps",
                "slo_attainment", "prefix_hit_rate", "sim_wall_s"):
        assert col in header
    # plan order: router, then rate scale
    assert [(r["router"], float(r["rate_scale"])) for r in rows] == [("pow2", 2.0), ("pow2", 4.0),
                                                                     ("sal", 2.0), ("sal", 4.0)]
    for r in rows:
        assert (r["trace"], r["engine_policy"], r["replicas"], r["gpu"]) == ("azure_conv", "fcfs", "2", "h100")
        assert r["label"] == f"{r['router']}+fcfs"
        assert int(r["requests"]) == 200 == int(r["completed"]) + int(r["failed"])
        assert float(r["goodput_rps"]) > 0 and float(r["ttft_p99"]) > 0


def test_pngs_are_written_per_trace(sweep2):
    for name in report.PLOTS:
        png = sweep2 / f"azure_conv_{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        assert png.stat().st_size > 5000


def test_report_has_tables_links_commit_and_command(sweep2):
    md = (sweep2 / "report.md").read_text()
    assert "- commit: `" in md
    assert "halffull compare" in md and "--routers pow2,sal" in md and "--limit 200" in md
    assert "## azure_conv" in md
    assert "| router + engine | 2× | 4× |" in md
    lines = md.splitlines()
    table_rows = [line for line in lines if line.startswith("| pow2+fcfs |") or line.startswith("| sal+fcfs |")]
    assert len(table_rows) == 4  # main table + saturation table, two series each
    assert any(" / " in row for row in table_rows)  # p99 TTFT / goodput cells
    assert "saturation rate scale" in md
    for name in report.PLOTS:
        assert f"(azure_conv_{name}.png)" in md


def test_results_do_not_depend_on_jobs(sweep1, sweep2):
    h1, rows1 = _rows(sweep1)
    h2, rows2 = _rows(sweep2)
    assert h1 == h2
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in report.WALL_CLOCK_COLUMNS} for r in rows]

    assert strip(rows1) == strip(rows2)


@pytest.mark.parametrize("extra, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--routers", "pow2,nope"], "unknown policy 'nope'"),
    (["--engine-policies", "nope"], "unknown engine policy 'nope'"),
    (["--rate-scales", "2,x"], "not a number"),
    (["--preset", "quick", "--routers", "sal"], "cannot be combined with --preset"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_input_is_a_clean_error(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["compare", "--limit", "50", "--rate-scales", "2", "--quiet", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # checked before anything runs


def test_every_preset_plans_and_quick_is_small():
    base = ClusterConfig()
    for name, experiments in compare.PRESETS.items():
        runs = sweep.plan(experiments, base)
        assert runs, name
    quick = sweep.plan(compare.PRESETS["quick"], base)
    assert len({r.config.router for r in quick}) == 2 and len({r.config.engine_policy for r in quick}) == 1
    assert len({r.rate_scale for r in quick}) == 3 and all(r.limit and r.limit <= 2000 for r in quick)


def test_preset_format_expresses_ablations():
    exps = sweep.grid(["azure_conv"], ["sal"], ["fcfs"], [2, 4], limit=100) + [
        {"label": "sal (no decode work)", "trace": "azure_conv", "rate_scales": [2, 4], "limit": 100,
         "config": {"router": "sal", "router_params": {"use_decode_work": False}}},
        {"label": "sal (stats 2 s)", "trace": "azure_conv", "rate_scales": [2], "limit": 100,
         "config": {"router": "sal", "stats_period_s": 2.0}},
    ]
    runs = sweep.plan(exps, ClusterConfig(num_replicas=2))
    assert [(r.label, r.rate_scale) for r in runs] == [
        ("sal+fcfs", 2.0), ("sal+fcfs", 4.0), ("sal (no decode work)", 2.0), ("sal (no decode work)", 4.0),
        ("sal (stats 2 s)", 2.0)]
    assert runs[2].config.router_params == {"use_decode_work": False} and runs[2].config.num_replicas == 2
    assert runs[4].config.stats_period_s == 2.0
    # CLI --rate-scales / --limit replace the experiments' own
    runs = sweep.plan(exps, ClusterConfig(), rate_scales=[8], limit=10)
    assert {(r.rate_scale, r.limit) for r in runs} == {(8.0, 10)}


@pytest.mark.parametrize("exp, message", [
    ({"trace": "azure_conv", "rate_scales": [1], "config": {"routr": "sal"}}, "unknown ClusterConfig fields"),
    ({"trace": "azure_conv", "rate_scales": [1], "colour": "red"}, "unknown keys"),
    ({"trace": "azure_conv", "rate_scales": []}, "rate_scales"),
    ({"rate_scales": [1]}, "needs a 'trace'"),
    ({"trace": "azure_conv", "rate_scales": [1], "config": {"router": "sal", "router_params": {"nope": 1}}},
     "unknown params"),
])
def test_plan_rejects_bad_experiments(exp, message):
    with pytest.raises(ValueError, match=message):
        sweep.plan([exp], ClusterConfig())


def test_plan_rejects_duplicate_series():
    exp = {"trace": "azure_conv", "rate_scales": [1], "limit": 10, "config": {"router": "sal"}}
    with pytest.raises(ValueError, match="twice"):
        sweep.plan([exp, dict(exp)], ClusterConfig())


def test_report_writers_are_pure_over_rows(tmp_path, sweep2):
    rows = report.read_csv(sweep2 / "results.csv")
    assert rows[0]["completed"] + rows[0]["failed"] == 200 and isinstance(rows[0]["ttft_p99"], float)
    # a hole in the matrix and a point missing the SLO render, and the CSV round-trips exactly
    rows = rows[:3]
    rows[2] = dict(rows[2], ttft_p99=9.5)
    report.write_csv(rows, tmp_path / "r.csv")
    assert report.read_csv(tmp_path / "r.csv") == rows
    md = report.markdown_report(rows, slo=Slo(2.0, 0.1), commit="abc1234", command="x")
    assert "| sal+fcfs | 9.50 s / " in md and "✗" in md and "| – |" in md
    assert "< 2×" in md  # sal misses at its lowest (only) scale
