"""halffull bench engine (loadtest/bench/engine.py) on tiny phases: every token is counted, the steps agree
with the cadence (one token per running stream per step), and the command checks its flags. Its CPU figures
are measurements (the README quotes them); only their shape is checked here."""

from __future__ import annotations

import argparse
import asyncio
import math

import pytest

from halffull.loadtest.bench import engine as bench
from halffull.loadtest.bench import stream


def run(per_replica, tokens=20, rounds=2, speeds=(50.0,), ramp_s=0.0):
    lines: list[str] = []
    runner = asyncio.Runner(loop_factory=bench.event_loop_factory())
    with runner:
        rows = runner.run(bench.run(list(per_replica), tokens, rounds, list(speeds), ramp_s, lines.append))
    return rows, lines


@pytest.mark.parametrize("speed", [50.0, math.inf])
def test_every_phase_counts_every_token_and_at_least_one_step_per_token(speed):
    rows, lines = run((1, 4), speeds=(speed,))
    assert set(rows) == {(speed, 1), (speed, 4)}
    assert len(lines) == 4  # one progress line per phase
    for (_, n), row in rows.items():
        assert len(row.phases) == 2
        for phase in row.phases:
            assert phase.tokens == n * 20
            # a step gives each running stream one token; the first step of a stream is its prefill
            assert 20 <= phase.steps <= n * 21
            assert phase.seconds > 0 and phase.cpu_s >= 0


def test_streams_started_together_share_their_steps():
    rows, _ = run((8,), tokens=30, rounds=1)
    (phase,) = rows[(50.0, 8)].phases
    # 8 streams started at once decode in the same steps: far fewer steps than tokens
    assert phase.steps <= 2 * 30


def test_the_report_has_one_row_per_phase_kind_and_names_the_cluster_streams():
    rows, _ = run((1, 2), rounds=1)
    table = bench.report(rows, replicas=4).splitlines()
    assert len(table) == 2 + 2
    assert table[2].split()[:3] == ["50", "4", "1"] and table[3].split()[:3] == ["50", "8", "2"]


def args(argv):
    parser = argparse.ArgumentParser()
    stream.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv", [
    ["--streams", "6", "--stream-replicas", "4"],
    ["--streams", "8,5", "--stream-replicas", "2"],
])
def test_streams_must_divide_over_the_replicas(argv, capsys):
    assert bench.cmd_bench(args(argv)) == 2
    assert "must divide evenly" in capsys.readouterr().out


def test_the_command_prints_the_table(capsys):
    status = bench.cmd_bench(args(["--streams", "4", "--stream-replicas", "2", "--tokens", "10",
                                   "--stream-rounds", "1", "--speeds", "inf", "--ramp-s", "0"]))
    assert status == 0
    out = capsys.readouterr().out
    assert "ms CPU/token" in out and out.strip().splitlines()[-1].split()[:3] == ["inf", "4", "2"]
