"""``halffull loadtest compare`` (loadtest/live/compare.py): the live-vs-simulator mapping, the agreement figures,
and one small live comparison (two routers, locust headless, ``--with-sim``) on the session's loopback Ray cluster."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math

import psutil
import pytest

from halffull.loadtest.live import compare as live
from halffull.loadtest.sim.cluster import ClusterConfig, ClusterSim
from halffull.loadtest.sim.metrics import RequestRecord


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="halffull")
    live.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["loadtest", "compare", *argv])


# ---- configuration mapping (no Ray) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "speedup, stats_period, wall_period",
    [(1.0, 0.5, 0.5), (2.0, 0.5, 0.25), (10.0, 0.5, live.MIN_WALL_STATS_PERIOD_S), (4.0, 0.0, 0.1)],
    ids=["real-time", "2x", "floored", "perfect-info"],
)
def test_app_args_match_the_simulator(speedup, stats_period, wall_period):
    from halffull.deploy.app import AppConfig

    cfg = ClusterConfig(num_replicas=3, router="pow2", engine_policy="larry", engine_params={"tau": 0.2}, gpu="a10g",
                        stats_period_s=stats_period, num_routers=2, seed=7)
    args = live.app_args(cfg, speedup)
    sched = ClusterSim(cfg).sched_config
    assert args["engine"] == {"num_blocks": sched.num_blocks, "block_size": sched.block_size,
                              "max_num_batched_tokens": sched.max_num_batched_tokens,
                              "max_num_seqs": sched.max_num_seqs}
    assert args["stats_period_s"] == pytest.approx(wall_period)
    assert args["engine_params"] == {"tau": pytest.approx(0.2 / speedup), "max_wait_s": pytest.approx(5.0 / speedup)} \
        if speedup != 1.0 else {"tau": 0.2}
    assert (args["num_replicas"], args["router"], args["router_seed"], args["ingress_replicas"]) == (3, "pow2", 7, 2)
    assert args["prefix_block_size"] == cfg.prefix_block_size and args["speedup"] == speedup
    AppConfig.from_args(args)  # the app accepts every key


def test_engine_params_other_than_larry_pass_through():
    assert live.wall_engine_params("fcfs", {"x": 1}, 5.0) == {"x": 1}


@pytest.mark.parametrize(
    "a, b, tau",
    [("abc", "abc", 1.0), ("abc", "cba", -1.0), ("abc", "bac", 1 / 3), ("ab", "ba", -1.0), ("a", "a", 1.0)],
    ids=["same", "reversed", "one-swap", "pair-swapped", "single"],
)
def test_kendall_tau(a, b, tau):
    assert live.kendall_tau(list(a), list(b)) == pytest.approx(tau)


def _rec(rid: str, ttft: float) -> RequestRecord:
    return RequestRecord(rid, 0.0, ttft, ttft + 1.0, 10, 5)


def test_agreement_ratios_and_target():
    rows = [
        {"label": "x", "rate_scale": 1.0, "source": "live", "ttft_mean": 0.110, "ttft_p99": 0.5, "tpot_mean": 0.02},
        {"label": "x [offline]", "rate_scale": 1.0, "source": "offline", "ttft_mean": 0.100, "ttft_p99": 0.4,
         "tpot_mean": 0.02},
        {"label": "y", "rate_scale": 1.0, "source": "live", "ttft_mean": 0.300, "ttft_p99": 0.9, "tpot_mean": 0.03},
        {"label": "y [offline]", "rate_scale": 1.0, "source": "offline", "ttft_mean": 0.200, "ttft_p99": 0.8,
         "tpot_mean": 0.02},
    ]
    delta = live.matched_ttft_delta_ms([_rec("a", 0.2), _rec("b", 0.5)], [_rec("a", 0.1), _rec("b", 0.2)])
    assert delta == pytest.approx(200.0)  # median of +100 ms and +300 ms
    agree = {a["label"]: a for a in live.agreement(rows, {("x", 1.0): delta}, {})}
    assert agree["x"]["ttft_ratio"] == pytest.approx(1.1) and agree["x"]["within_target"]
    assert agree["y"]["ttft_ratio"] == pytest.approx(1.5) and not agree["y"]["within_target"]
    assert agree["y"]["tpot_ratio"] == pytest.approx(1.5) and agree["x"]["ttft_delta_median_ms"] == delta
    text = live.agreement_markdown(list(agree.values()), rows, 0.5)
    assert "live x < y; offline x < y: the same" in text


# ---- a small live comparison ----------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_live_compare_two_routers_with_sim(ray_cluster, tmp_path):
    args = parse(["--trace", "azure_conv", "--routers", "round_robin,sal", "--replicas", "2", "--limit", "16",
                  "--rate-scales", "2", "--speedup", "2", "--with-sim", "--drain-timeout", "30", "--quiet",
                  "--out", str(tmp_path)])
    log = io.StringIO()
    result = live.run_compare(args, cluster=ray_cluster, command="halffull loadtest compare (test)", stream=log)

    rows = result["rows"]
    by = {(r["label"], r["source"]): r for r in rows}
    assert set(by) == {("round_robin+fcfs", "live"), ("sal+fcfs", "live"),
                       ("round_robin+fcfs [offline]", "offline"), ("sal+fcfs [offline]", "offline")}
    for (label, source), row in by.items():
        assert row["completed"] == 16 and row["failed"] == 0, (label, source, log.getvalue()[-2000:])
        assert row["ttft_mean"] > 0 and row["tpot_mean"] > 0 and row["requests"] == 16
    for label in ("round_robin+fcfs", "sal+fcfs"):
        assert by[(label, "live")]["token_mismatches"] == 0
        assert math.isfinite(by[(label, "live")]["probe_ttft_overhead_ms"])
        assert by[(label, "live")]["host_foreign_cores_mean"] >= 0 and by[(label, "live")]["attempts"] == 1

    assert len(result["agreement"]) == 2
    for a in result["agreement"]:
        assert a["ttft_ratio"] > 0 and a["tpot_ratio"] > 0 and a["ttft_delta_median_ms"] is not None
    assert json.loads((tmp_path / "agreement.json").read_text()) == json.loads(json.dumps(result["agreement"]))

    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["source"] for r in csv_rows} == {"live", "offline"} and len(csv_rows) == 4
    report = (tmp_path / "report.md").read_text()
    assert "# halffull loadtest compare: live Ray Serve" in report and "## Sim vs live agreement" in report
    assert "Ranking by mean TTFT at 2×" in report
    pngs = [p for files in result["plots"].values() for p in files.values()]
    assert len(pngs) >= 4 and all(p.exists() for p in pngs)
    assert (tmp_path / "runs" / "00_locust.log").exists() and (tmp_path / "runs" / "01_records.csv").exists()
    assert ray_cluster.apps == []  # both apps deleted
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "locust" in " ".join(p.info["cmdline"] or ())
                 and str(tmp_path) in " ".join(p.info["cmdline"] or ())]
    assert not leftovers


def test_cli_parses_the_documented_command():
    args = parse(["--trace", "azure_conv", "--routers", "round_robin,pow2,prefix_aware,sal", "--engine-policies",
                  "fcfs", "--replicas", "4", "--gpu", "a10g", "--rate-scales", "0.6,0.8", "--limit", "240",
                  "--speedup", "1", "--with-sim", "--out", "out/live"])
    assert args.func is live.cmd_compare and args.with_sim and args.rate_scales == "0.6,0.8"
    runs = live.plan_runs(ClusterConfig(gpu="a10g"), ["round_robin", "sal"], ["fcfs"], [0.6, 0.8])
    assert [(r.label, r.rate_scale) for r in runs] == [("round_robin+fcfs", 0.6), ("round_robin+fcfs", 0.8),
                                                        ("sal+fcfs", 0.6), ("sal+fcfs", 0.8)]
    assert all(dataclasses.replace(r.config, router="x").gpu == "a10g" for r in runs)


def test_robust_pairs_are_those_whose_seed_ranges_are_disjoint():
    def row(label, lo, hi):
        return {"label": label, "offline_ttft_mean_seeds_min": lo, "offline_ttft_mean_seeds_max": hi}

    agree = [row("sal", 0.40, 0.41), row("rr", 0.417, 0.417), row("pow2", 0.48, 0.57), row("prefix", 0.47, 0.53)]
    assert sorted(live.robust_pairs(agree)) == [("rr", "pow2"), ("rr", "prefix"), ("sal", "pow2"),
                                                ("sal", "prefix"), ("sal", "rr")]
    assert live.robust_pairs([{"label": "x"}]) == []  # no seed ranges: nothing to judge
