"""loadtest/live/locustfile.py: a short headless open-loop replay against the default app, and its refusals.

The replay runs locust as CI would, in a subprocess (``python -m locust -f loadtest/live/locustfile.py --headless``),
against the default app (deploy/app.py defaults: 4 simulated H100 replicas, sal + larry, real time) on the
session's loopback Ray cluster, and checks the end-of-run JSON, locust's CSV and that no locust process is
left behind.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from halffull.deploy import ray_env

# Never import halffull.loadtest.live.locustfile here: importing locust monkey-patches the whole process with gevent.
LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "live" / "locustfile.py"
NUM_REQUESTS = 40


def locust(*args: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def locust_processes(marker: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or ())
        if "locust" in cmdline and marker in cmdline:
            out.append(proc)
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", "http://192.0.2.1:8000"], "is not a loopback address"),
        (["--host", "https://127.0.0.1:8000"], "must be an http:// URL"),
        (["--host", "http://127.0.0.1:9", "--speedup", "0"], "--speedup must be a positive"),
    ],
    ids=["remote-host", "https", "bad-speedup"],
)
def test_refuses_before_sending_anything(args, message):
    result = locust(*args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_refuses_a_web_ui_off_loopback():
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--web-host", "0.0.0.0", "--host",
           "http://127.0.0.1:9"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--web-host '0.0.0.0' is not loopback" in result.stderr


@pytest.fixture(scope="module")
def default_app(ray_cluster):
    url = ray_cluster.deploy("locust", {})  # the default app
    yield url
    ray_cluster.delete("locust")


@pytest.mark.ray
@pytest.mark.timeout(150)
def test_headless_replay_against_the_default_app(default_app, tmp_path):
    out = tmp_path / "replay"
    result = locust("--host", default_app, "--trace", "azure_conv", "--limit", str(NUM_REQUESTS),
                    "--rate-scale", "4", "--json-out", f"{out}.json", "--records-out", f"{out}_records.csv",
                    "--csv", str(out), "--run-time", "55s", "--only-summary", timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not locust_processes(str(tmp_path)), "a locust process outlived the run"

    summary = json.loads(Path(f"{out}.json").read_text())
    simulate_keys = {"clipped", "completed", "config", "duration_s", "e2e_mean", "e2e_p50", "e2e_p90", "e2e_p99",
                     "failed", "goodput_rps", "output_tokens_per_s", "per_replica", "preemptions_per_request",
                     "prefix_hit_rate", "rate_scale", "rejected", "sim_requests_per_s", "sim_wall_s",
                     "slo_attainment", "slo_tpot_s", "slo_ttft_s", "throughput_rps", "tpot_mean", "tpot_p50",
                     "tpot_p90", "tpot_p99", "trace", "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99"}
    assert simulate_keys <= set(summary)
    assert summary["completed"] == NUM_REQUESTS and summary["failed"] == 0
    assert 0 < summary["ttft_p50"] <= summary["ttft_p99"] and summary["tpot_mean"] > 0
    replay = summary["replay"]
    assert replay["sent"] == NUM_REQUESTS and replay["token_mismatches"] == {"prompt_tokens": 0, "output_tokens": 0}
    assert sum(r["requests"] for r in summary["per_replica"]) == NUM_REQUESTS
    assert summary["prefix_hit_rate"] < 0.05  # Azure prompts are unique text: (next to) nothing cached

    with open(f"{out}_stats.csv") as f:
        stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    for kind in ("TTFT", "TPOT", "E2E"):
        row = stats[(kind, "/v1/completions (model ms)")]
        assert int(row["Request Count"]) == NUM_REQUESTS and int(row["Failure Count"]) == 0
    assert int(stats[("POST", "/v1/completions")]["Request Count"]) == NUM_REQUESTS

    with open(f"{out}_records.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == NUM_REQUESTS and not any(r["error"] for r in records)


@pytest.mark.ray
@pytest.mark.timeout(150)
def test_web_ui_replay_started_from_the_ui(default_app, tmp_path):
    """The people's way: locust with its web UI on loopback, started with the UI's own /swarm call."""
    import time

    import httpx

    port = ray_env.free_port()
    out = tmp_path / "webui.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", default_app, "--web-port", str(port),
           "--trace", "azure_conv", "--limit", "12", "--rate-scale", "4", "--json-out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ui = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(ui, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the web UI did not come up"
                time.sleep(0.5)
        listening = [c for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
        started = httpx.post(f"{ui}/swarm", data={"user_count": 1, "spawn_rate": 1, "host": default_app}, timeout=10)
        assert started.json()["success"]
        deadline = time.monotonic() + 90
        while not out.exists():  # written when the replay ends; the UI then shows "stopped"
            assert time.monotonic() < deadline, "the replay did not finish"
            time.sleep(0.5)
        stats = httpx.get(f"{ui}/stats/requests", timeout=10).json()
        counts = {(s["method"], s["name"]): s["num_requests"] for s in stats["stats"]}
        assert counts[("TTFT", "/v1/completions (model ms)")] == 12 and counts[("POST", "/v1/completions")] == 12
        summary = json.loads(out.read_text())
        assert summary["completed"] == 12 and summary["failed"] == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert not locust_processes(str(tmp_path))
