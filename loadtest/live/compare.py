"""``halffull loadtest compare``: the live policy comparison on Ray Serve, and its agreement with the simulator.

    halffull loadtest compare --trace azure_conv --routers round_robin,pow2,prefix_aware,sal \\
        --engine-policies fcfs --gpu a10g --rate-scales 0.7 --limit 240 --speedup 1 --with-sim --out out/live

For every router x engine policy x rate scale (a *run*), one at a time:

1. deploy ``halffull.deploy.app:build_app`` on a local, loopback-only Ray cluster started here (Ray and Serve's HTTP
   proxy on 127.0.0.1; or the cluster a caller passes, as the tests do), configured from the very
   ``ClusterConfig`` the simulator runs (below);
2. replay the trace slice with locust, headless, in a subprocess
   (``python -m locust -f loadtest/live/locustfile.py --headless -u 1 ...``): open loop, prompts synthesized to the
   exact token counts, per-request records and the summary JSON under ``--out``/runs/, its log beside them;
3. probe the service once it is idle: ``PROBE_REQUESTS`` sequential small requests (``PROBE_PROMPT_TOKENS``
   prompt tokens, ``PROBE_OUTPUT_TOKENS`` out) give the fixed cost of the HTTP + Ray path and the step loop's
   timing error, against the simulator's prediction for the same requests;
4. delete the app: the next run starts with fresh replicas, empty KV caches and fresh router state.

Then ``results.csv``, PNG plots and ``report.md`` with the writers of ``halffull compare``
(loadtest/experiments/report.py). ``--with-sim`` also runs the same slice through the offline simulator
(loadtest/sim/cluster.py) with the same configuration, as series ``"<label> [offline]"`` (their own plot panel,
see report.panels), and appends the sim-vs-live agreement: per-policy live/offline ratios of mean TTFT and TPOT
(also with the measured idle path cost taken out), the per-request median TTFT difference, the ranking of the
policies on both sides (and which orderings the simulator gives under every router seed: only those are the
policies', not a random draw's), the simulator's sensitivity to stats staleness (stats period 0, P and 2P) and
the measured causes of the gaps.

Shared hosts: the live numbers need the CPU the service asks for. Every run records how many cores the rest of
the host used meanwhile (``HostSampler``); ``--max-foreign-cpu C`` waits for a quiet host before each run and
re-runs (``--retries``) a run during which other processes used more than C cores.

Model time and wall time (``--speedup S``, the app's ``speedup``):
  * the replicas' modelled step durations are divided by S, the trace's arrival times too (locust
    ``--speedup``), and measured latencies are multiplied by S: every number reported is model time;
  * ``--stats-period P`` is in model seconds, as in ``halffull simulate``; the app gets ``P / S`` wall seconds,
    at least ``MIN_WALL_STATS_PERIOD_S`` (Serve's controller polls replicas' stats from a 0.1 s loop);
  * LARRY's ``tau`` and ``max_wait_s`` are wall seconds in the real-time engine: the app gets them divided by S.

The same configuration on both sides: replicas, router (+ params, seed), engine policy (+ params), GPU / model /
TP, KV blocks and block size, ``max_num_batched_tokens`` and ``max_num_seqs`` (vLLM's defaults for the GPU, as
the simulator resolves them; the app's own defaults differ), the router's prefix block size (the simulator's
512, the trace's hash granularity) and the number of routers (``--num-routers`` = ingress replicas: Serve runs
one router per process holding a handle). What cannot be the same is what the agreement measures: the live
routers see replica stats up to one period plus a control-loop tick and a long-poll push old (the simulator:
exactly one period, refreshed at once), every request pays the HTTP + Ray path, and the replicas' step loops
share a few CPU cores with everything else (event-loop jitter).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from halffull.deploy import ray_env
from halffull.loadtest.experiments import report
from halffull.loadtest.sim.metrics import RequestRecord, Slo

__all__ = ["LiveRun", "LocalServe", "app_args", "wall_engine_params", "plan_runs", "run_compare", "agreement",
           "robust_pairs", "agreement_markdown", "register", "main"]

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
MIN_WALL_STATS_PERIOD_S = 0.1
PROBE_REQUESTS = 3
PROBE_PROMPT_TOKENS = 16
PROBE_OUTPUT_TOKENS = 32
TTFT_AGREEMENT_TARGET = 0.15  # |live / offline - 1| of mean TTFT, at moderate load
SEED_SPREAD = 4  # offline runs with router seeds seed .. seed+3: how much of a ranking is luck of the draw
OFFLINE_SUFFIX = " [offline]"
_PROGRESS_RE = re.compile(r"replay progress: done=(\d+) total=(\d+) sent=(\d+) failed=(\d+) late=(\d+)")


# ---- the local cluster -------------------------------------------------------------------------------------
def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


class LocalServe:
    """A local Ray cluster + Serve proxy on 127.0.0.1 for the duration of a ``with`` block.

    Same interface as the tests' ``ServeCluster`` (tests/serve_support.py): ``http``, ``deploy(name, args)``
    (returns the app's base URL), ``delete(name)``. Exiting runs ``serve.shutdown()`` and ``ray.shutdown()``,
    which stop every process it started.
    """

    def __init__(self, num_cpus: int = 4):
        self.num_cpus = num_cpus
        self.http = ""
        self._previous_sigterm = None

    def __enter__(self) -> "LocalServe":
        # Ray's own listeners on 127.0.0.1 (DESIGN.md §9). Ray reads the variable once, when it is first imported
        # (ray._private.ray_constants), and something may have imported it already (halffull.deploy.app does): set both.
        ray_env.apply()  # for the processes Ray starts (and the gRPC proxy hop)
        import ray
        import ray._private.ray_constants as ray_constants
        from ray import serve

        ray_constants.ENABLE_RAY_CLUSTER = False  # for this driver

        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level="ERROR", namespace="halffull-loadtest")
        # After ray.init, which installs its own: SIGTERM unwinds like Ctrl-C, so __exit__ stops the cluster
        # (and run_locust locust's process group) instead of leaving Ray's agents behind.
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            port = ray_env.free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        except BaseException:
            ray.shutdown()
            raise
        self.http = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    def deploy(self, name: str, args: Mapping[str, Any]) -> str:
        from ray import serve

        from halffull.deploy.app import build_app

        serve.run(build_app(dict(args)), name=name, route_prefix=f"/{name}")
        return f"{self.http}/{name}"

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)


def non_loopback_listeners() -> tuple[int, list[str]]:
    """(listening TCP sockets of this process and its descendants, those not on a loopback address)."""
    import ipaddress

    import psutil

    me = psutil.Process()
    total, bad = 0, []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.Error, OSError):
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN or not c.laddr:
                continue
            total += 1
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is loopback too
            if not ip.is_loopback:
                bad.append(f"{proc.name()}[{proc.pid}] {c.laddr.ip}:{c.laddr.port}")
    return total, bad


# ---- plan ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveRun:
    index: int
    label: str
    rate_scale: float
    config: Any  # ClusterConfig


def plan_runs(base, routers: Sequence[str], engine_policies: Sequence[str],
              rate_scales: Sequence[float]) -> list[LiveRun]:
    """router x engine policy x rate scale, in that nesting (each config's scales back to back)."""
    from halffull.loadtest.experiments.sweep import default_label

    runs = []
    for router in routers:
        for engine in engine_policies:
            cfg = dataclasses.replace(base, router=router, engine_policy=engine)
            for scale in rate_scales:
                runs.append(LiveRun(len(runs), default_label(cfg), float(scale), cfg))
    return runs


def wall_engine_params(policy: str, params: Mapping[str, Any], speedup: float) -> dict[str, Any]:
    """Engine params for the real-time engine at ``speedup``: LARRY's time constants are wall seconds there."""
    out = dict(params)
    if policy == "larry" and speedup != 1.0:
        from halffull.replicas.engine.larry import LarryParams

        defaults = LarryParams()
        for key in ("tau", "max_wait_s"):
            out[key] = float(out.get(key, getattr(defaults, key))) / speedup
    return out


def engine_limits(cfg) -> dict[str, int]:
    """The engine limits the simulator resolves for ``cfg`` (vLLM's defaults for the GPU unless given)."""
    from halffull.loadtest.sim.cluster import ClusterSim

    sched = ClusterSim(cfg).sched_config
    return {"num_blocks": sched.num_blocks, "block_size": sched.block_size,
            "max_num_batched_tokens": sched.max_num_batched_tokens, "max_num_seqs": sched.max_num_seqs}


def wall_stats_period(stats_period_s: float, speedup: float) -> float:
    return max(stats_period_s / speedup, MIN_WALL_STATS_PERIOD_S)


def app_args(cfg, speedup: float) -> dict[str, Any]:
    """halffull.deploy.app arguments equivalent to the simulator's ``cfg`` at ``speedup`` (see the module docstring)."""
    engine: dict[str, Any] = engine_limits(cfg)
    if cfg.tp is not None:
        engine["tp"] = cfg.tp
    return {
        "num_replicas": cfg.num_replicas, "router": cfg.router, "router_params": dict(cfg.router_params),
        "router_seed": cfg.seed, "stats_period_s": wall_stats_period(cfg.stats_period_s, speedup),
        "engine_policy": cfg.engine_policy,
        "engine_params": wall_engine_params(cfg.engine_policy, cfg.engine_params, speedup),
        "gpu": cfg.gpu, "model": cfg.model, "speedup": speedup, "engine": engine,
        "prefix_block_size": cfg.prefix_block_size, "ingress_replicas": cfg.num_routers,
        "max_ongoing_requests": max(512, 2 * engine["max_num_seqs"]),
    }


# ---- one live run --------------------------------------------------------------------------------------
@dataclass
class Slice:
    trace: str
    limit: int | None
    start_s: float
    duration_s: float | None
    seed: int


def _load_slice(cfg, sl: Slice, rate_scale: float):
    from halffull.loadtest.sim.cluster import load_trace_for

    return load_trace_for(cfg, sl.trace, rate_scale=rate_scale, limit=sl.limit, start_s=sl.start_s,
                          duration_s=sl.duration_s)


def locust_command(url: str, run: LiveRun, sl: Slice, speedup: float, run_dir: Path, *, drain_timeout: float,
                   run_time_s: float, late_ms: float) -> list[str]:
    stem = run_dir / f"{run.index:02d}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-r", "1",
           "--host", url, "--trace", sl.trace, "--rate-scale", repr(run.rate_scale), "--seed", str(sl.seed),
           "--speedup", repr(speedup), "--start", repr(sl.start_s), "--drain-timeout", repr(drain_timeout),
           "--late-ms", repr(late_ms), "--json-out", f"{stem}_summary.json", "--records-out",
           f"{stem}_records.csv", "--csv", f"{stem}_locust", "--run-time", f"{math.ceil(run_time_s)}s",
           "--only-summary", "--stop-timeout", "5"]
    if sl.limit is not None:
        cmd += ["--limit", str(sl.limit)]
    if sl.duration_s is not None:
        cmd += ["--duration", repr(sl.duration_s)]
    return cmd


def run_locust(cmd: list[str], log_path: Path, timeout_s: float,
               on_progress: Callable[[int, int, int, int], None] | None = None) -> int:
    """Run locust to completion (its output to ``log_path``); kill its process group after ``timeout_s``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(LOCUSTFILE.parent.parent), start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                m = _PROGRESS_RE.search(line)
                if m and on_progress:
                    done, total, _sent, failed, late = map(int, m.groups())
                    on_progress(done, total, failed, late)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise RuntimeError(f"locust did not finish within {timeout_s:.0f} s (log: {log_path})") from None
        except BaseException:
            _stop_group(proc)
            raise
        finally:
            reader.join(timeout=10)
    return rc


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group of ``proc`` (a session this module started)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


class HostSampler:
    """How much CPU the rest of the host takes while in ``with``: sampled every ``every_s`` s in a thread.

    ``foreign_cores`` = (busy CPU seconds of the whole host - CPU seconds of this process and its descendants:
    the Ray cluster, locust) / wall seconds, per interval. The live numbers depend on the CPU left to the Ray
    processes; a shared host (other test runs, sweeps) shows up here, and ``halffull loadtest compare
    --max-foreign-cpu`` re-runs a configuration that met too much of it. Also the 1-minute load average.
    """

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self.foreign: list[float] = []
        self.load: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    @staticmethod
    def _mine() -> dict[int, tuple[float, float]]:
        """pid -> (create time, CPU seconds) of this process and its descendants."""
        import psutil

        me = psutil.Process()
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    out[proc.pid] = (proc.create_time(), t.user + t.system)
            except psutil.Error:
                pass
        return out

    def _run(self) -> None:
        busy, mine, wall = self._busy(), self._mine(), time.time()
        while not self._stop.wait(self.every_s):
            busy2, mine2, wall2 = self._busy(), self._mine(), time.time()
            own = 0.0
            for pid, (created, cpu) in mine2.items():
                before = mine.get(pid)
                if before is not None and before[0] == created:
                    own += cpu - before[1]
                elif created > wall - 0.05:  # started during the interval: all its CPU is from it
                    own += cpu
            if wall2 > wall:
                self.foreign.append(max(0.0, (busy2 - busy - own) / (wall2 - wall)))
            self.load.append(os.getloadavg()[0])
            busy, mine, wall = busy2, mine2, wall2

    def __enter__(self) -> "HostSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, float]:
        out = {}
        if self.foreign:
            out.update(host_foreign_cores_mean=statistics.mean(self.foreign),
                       host_foreign_cores_p90=sorted(self.foreign)[int(0.9 * (len(self.foreign) - 1))])
        if self.load:
            out.update(host_load_mean=statistics.mean(self.load), host_load_max=max(self.load))
        return out


def wait_for_quiet_host(max_foreign_cores: float, *, window_s: float = 30.0, timeout_s: float = 1800.0,
                        stream=sys.stderr) -> bool:
    """Block until the rest of the host used at most ``max_foreign_cores`` over ``window_s``; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with HostSampler(every_s=window_s / 6) as host:
            time.sleep(window_s)
        foreign = host.summary().get("host_foreign_cores_mean", 0.0)
        if foreign <= max_foreign_cores:
            return True
        print(f"  waiting for a quiet host: other processes use {foreign:.2f} cores", file=stream, flush=True)
    return False


def read_records(path: Path) -> list[RequestRecord]:
    """The locustfile's ``--records-out`` CSV as ``RequestRecord``s."""

    def num(text):
        return float(text) if text not in ("", "None") else None

    out = []
    with path.open() as f:
        for row in csv.DictReader(f):
            out.append(RequestRecord(row["request_id"], float(row["arrival_s"]), num(row["first_token_s"]),
                                     num(row["finish_s"]), int(row["num_prompt_tokens"]),
                                     int(row["num_output_tokens"]), 0, int(row["num_cached_prompt_tokens"]),
                                     row["replica"], row["error"] or None))
    return out


async def _probe_async(url: str, model: str, speedup: float) -> list[tuple[float, float]]:
    """(TTFT, TPOT) in model seconds of ``PROBE_REQUESTS`` sequential probe requests."""
    import httpx

    from halffull.loadtest.live.prompts import PromptSynthesizer

    synth = PromptSynthesizer(seed=-1)
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=_auth_headers()) as client:
        for i in range(PROBE_REQUESTS):
            body = {"model": model, "prompt": synth.text(f"probe-{i}", PROBE_PROMPT_TOKENS),
                    "max_tokens": PROBE_OUTPUT_TOKENS, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            first = last = None
            tokens = 0  # from usage: an event may carry several tokens
            start = time.perf_counter()
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif (event.get("choices") or [{}])[0].get("text"):
                        last = time.perf_counter()
                        first = first or last
            if first is None or tokens < 2:
                raise RuntimeError(f"probe request {i}: no stream")
            out.append(((first - start) * speedup, (last - first) / (tokens - 1) * speedup))
            await asyncio.sleep(0.2)
    return out


def probe_idle(url: str, cfg, speedup: float) -> dict[str, float]:
    """Fixed path cost and step timing of the idle service vs the simulator's prediction (model ms)."""
    from halffull.loadtest.sim.cluster import ClusterSim
    from halffull.loadtest.sim.traces import TraceRequest

    model = _models(url)[0]["id"]
    measured = asyncio.run(_probe_async(url, model, speedup))
    trace = [TraceRequest(f"p{i}", 100.0 * i, PROBE_PROMPT_TOKENS, PROBE_OUTPUT_TOKENS) for i in range(PROBE_REQUESTS)]
    predicted = [r for r in ClusterSim(dataclasses.replace(cfg, stats_period_s=0.0)).run(trace).records]
    ttft_pred = statistics.mean(r.ttft for r in predicted)
    tpot_pred = statistics.mean(r.tpot for r in predicted)
    ttft = statistics.median(t for t, _ in measured)
    tpot = statistics.median(p for _, p in measured)
    overhead_ms = (ttft - ttft_pred) * 1e3
    return {"probe_ttft_overhead_ms": overhead_ms, "probe_ttft_wall_overhead_ms": overhead_ms / speedup,
            "probe_tpot_ratio": tpot / tpot_pred if tpot_pred else float("nan")}


def _auth_headers() -> dict[str, str]:
    key = os.environ.get("HALFFULL_API_KEY")  # as the locustfile: the service may require a key
    return {"Authorization": f"Bearer {key}"} if key else {}


def _models(url: str) -> list[dict]:
    import httpx

    response = httpx.get(f"{url}/v1/models", timeout=30, headers=_auth_headers())
    response.raise_for_status()
    return response.json()["data"]


# ---- rows ----------------------------------------------------------------------------------------------
def _config_columns(run: LiveRun, sl: Slice, requests: int, limits: Mapping[str, int]) -> dict[str, Any]:
    cfg = run.config
    from halffull.replicas.sim.profile_model import latency_model

    return {
        "trace": sl.trace, "label": run.label, "router": cfg.router, "engine_policy": cfg.engine_policy,
        "rate_scale": run.rate_scale, "replicas": cfg.num_replicas, "gpu": cfg.gpu, "model": cfg.model,
        "tp": latency_model(cfg.gpu, cfg.model, cfg.tp).tp, "stats_period": cfg.stats_period_s,
        "num_routers": cfg.num_routers, "router_params": json.dumps(cfg.router_params, sort_keys=True),
        "engine_params": json.dumps(cfg.engine_params, sort_keys=True), "num_blocks": limits["num_blocks"],
        "max_num_seqs": limits["max_num_seqs"], "max_num_batched_tokens": limits["max_num_batched_tokens"],
        "seed": cfg.seed, "limit": sl.limit, "requests": requests,
    }


def live_row(run: LiveRun, sl: Slice, summary: Mapping[str, Any], limits, speedup: float,
             probe: Mapping[str, float]) -> dict[str, Any]:
    replay = summary.get("replay", {})
    row = _config_columns(run, sl, int(replay.get("requests", 0)), limits)
    for key in report.SUMMARY_COLUMNS:
        row[key] = summary.get(key)
    row.update(source="live", speedup=speedup,
               stats_period_wall_s=wall_stats_period(run.config.stats_period_s, speedup),
               late=replay.get("late"), send_lag_p99_ms=replay.get("lag_ms_p99"),
               token_mismatches=sum((replay.get("token_mismatches") or {}).values()), **probe)
    return row


def simulate_slice(cfg, sl: Slice, rate_scale: float):
    from halffull.loadtest.sim.cluster import ClusterSim

    trace = _load_slice(cfg, sl, rate_scale)
    return ClusterSim(cfg).run(trace)


def sim_row(run: LiveRun, sl: Slice, result, limits) -> dict[str, Any]:
    row = _config_columns(run, sl, len(result.records), limits)
    row["label"] = run.label + OFFLINE_SUFFIX
    for key in report.SUMMARY_COLUMNS:
        row[key] = result.summary.get(key)
    row["source"] = "offline"
    return row


# ---- agreement -----------------------------------------------------------------------------------------
def _ratio(a, b) -> float | None:
    return (float(a) / float(b)) if a is not None and b else None


def _ranks(values: Mapping[str, float]) -> list[str]:
    return [k for k, _ in sorted(values.items(), key=lambda kv: (kv[1], kv[0]))]


def kendall_tau(order_a: Sequence[str], order_b: Sequence[str]) -> float:
    """Kendall's tau between two orderings of the same items (1: identical, -1: reversed)."""
    pos_b = {k: i for i, k in enumerate(order_b)}
    n = len(order_a)
    if n < 2:
        return 1.0
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            if pos_b[order_a[i]] < pos_b[order_a[j]]:
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / (n * (n - 1) / 2)


def robust_pairs(agree: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(better, worse) label pairs whose offline mean TTFT ranges over router seeds do not overlap.

    Only these orderings are properties of the policies; the others depend on a random draw (pow2's samples, a
    tie-break), so a live run may order them either way without disagreeing with the simulator.
    """
    ranged = [a for a in agree if a.get("offline_ttft_mean_seeds_min") is not None]
    out = []
    for i, x in enumerate(ranged):
        for y in ranged[i + 1:]:
            if x["offline_ttft_mean_seeds_max"] < y["offline_ttft_mean_seeds_min"]:
                out.append((x["label"], y["label"]))
            elif y["offline_ttft_mean_seeds_max"] < x["offline_ttft_mean_seeds_min"]:
                out.append((y["label"], x["label"]))
    return out


def matched_ttft_delta_ms(live: Sequence[RequestRecord], offline: Sequence[RequestRecord]) -> float | None:
    """Median over requests completed on both sides of (live TTFT - offline TTFT), model ms."""
    sim = {r.request_id: r for r in offline if r.completed}
    deltas = [(r.ttft - sim[r.request_id].ttft) * 1e3 for r in live if r.completed and r.request_id in sim]
    return statistics.median(deltas) if deltas else None


def agreement(rows: Sequence[Mapping[str, Any]], deltas: Mapping[tuple[str, float], float | None],
              sensitivity: Mapping[tuple[str, float], Mapping[str, float]]) -> list[dict[str, Any]]:
    """One dict per (label, rate scale) that has a live and an offline row."""
    live = {(r["label"], float(r["rate_scale"])): r for r in rows if r.get("source") == "live"}
    offline = {(r["label"][: -len(OFFLINE_SUFFIX)], float(r["rate_scale"])): r
               for r in rows if r.get("source") == "offline"}
    out = []
    for key, lr in live.items():
        orow = offline.get(key)
        if orow is None:
            continue
        ratio = _ratio(lr.get("ttft_mean"), orow.get("ttft_mean"))
        path_ms = lr.get("probe_ttft_overhead_ms")  # the idle HTTP + Ray path cost, model ms
        net = None if path_ms is None or lr.get("ttft_mean") is None else lr["ttft_mean"] - path_ms / 1e3
        out.append({
            "label": key[0], "rate_scale": key[1],
            "live_ttft_mean": lr.get("ttft_mean"), "offline_ttft_mean": orow.get("ttft_mean"), "ttft_ratio": ratio,
            "live_ttft_p99": lr.get("ttft_p99"), "offline_ttft_p99": orow.get("ttft_p99"),
            "ttft_p99_ratio": _ratio(lr.get("ttft_p99"), orow.get("ttft_p99")),
            "live_tpot_mean": lr.get("tpot_mean"), "offline_tpot_mean": orow.get("tpot_mean"),
            "tpot_ratio": _ratio(lr.get("tpot_mean"), orow.get("tpot_mean")),
            "ttft_ratio_net_of_path": _ratio(net, orow.get("ttft_mean")),
            "ttft_delta_median_ms": deltas.get(key),
            "within_target": ratio is not None and abs(ratio - 1.0) <= TTFT_AGREEMENT_TARGET,
            **{f"offline_ttft_mean_{k}": v for k, v in (sensitivity.get(key) or {}).items()},
        })
    return out


def _ms(x) -> str:
    return "–" if x is None else f"{float(x) * 1e3:.0f}"


def _x(x) -> str:
    return "–" if x is None else f"{float(x):.2f}"


def agreement_markdown(agree: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                       stats_period: float) -> str:
    lines = ["## Sim vs live agreement", "",
             f"Same trace slice, same configuration; live latencies are wall × speed-up (model time). Target: mean "
             f"TTFT within {TTFT_AGREEMENT_TARGET:.0%} (live / offline in [{1 - TTFT_AGREEMENT_TARGET:.2f}, "
             f"{1 + TTFT_AGREEMENT_TARGET:.2f}]) and the same ranking of the policies. \"Idle path cost out\": the "
             "live mean TTFT less the HTTP + Ray path cost measured on the idle service (the simulator models no "
             "path), i.e. the scheduling part alone.", ""]
    header = ["router + engine", "rate", "TTFT mean live / offline (ms)", "ratio", "ratio, idle path cost out",
              "TTFT p99 live / offline (ms)", "ratio", "TPOT mean live / offline (ms)", "ratio",
              "Δ TTFT per request, median (ms)", "within target"]
    body = []
    for a in agree:
        delta = a["ttft_delta_median_ms"]
        body.append([
            a["label"], f"{a['rate_scale']:g}×", f"{_ms(a['live_ttft_mean'])} / {_ms(a['offline_ttft_mean'])}",
            _x(a["ttft_ratio"]), _x(a.get("ttft_ratio_net_of_path")),
            f"{_ms(a['live_ttft_p99'])} / {_ms(a['offline_ttft_p99'])}", _x(a["ttft_p99_ratio"]),
            f"{float(a['live_tpot_mean'] or 0) * 1e3:.1f} / {float(a['offline_tpot_mean'] or 0) * 1e3:.1f}",
            _x(a["tpot_ratio"]), "–" if delta is None else f"{delta:+.0f}", "yes" if a["within_target"] else "**no**",
        ])
    lines += report._md_table(header, body, [":---", "---:"] + ["---:"] * 8 + [":---:"])
    lines.append("")
    for scale in sorted({a["rate_scale"] for a in agree}):
        at = [a for a in agree if a["rate_scale"] == scale]
        live_order = _ranks({a["label"]: a["live_ttft_mean"] for a in at})
        off_order = _ranks({a["label"]: a["offline_ttft_mean"] for a in at})
        tau = kendall_tau(live_order, off_order)
        same = "the same" if live_order == off_order else "**different**"
        lines += [f"Ranking by mean TTFT at {scale:g}× (best first): live {' < '.join(live_order)}; offline "
                  f"{' < '.join(off_order)}: {same} (Kendall τ = {tau:+.2f}).", ""]
        closest = min((abs(x["offline_ttft_mean"] - y["offline_ttft_mean"]) / max(x["offline_ttft_mean"], 1e-9),
                       x["label"], y["label"]) for i, x in enumerate(at) for y in at[i + 1:]) if len(at) > 1 else None
        if closest is not None:
            lines += [f"Closest pair offline: {closest[1]} vs {closest[2]}, {closest[0]:.1%} apart in mean TTFT "
                      "(pairs closer than the live noise can swap).", ""]
        pairs = robust_pairs(at)
        if pairs:
            live_ttft = {a["label"]: a["live_ttft_mean"] for a in at}
            held = [(b, w) for b, w in pairs if live_ttft[b] < live_ttft[w]]
            lines += [f"Orderings the simulator gives under every one of {SEED_SPREAD} router seeds (seed ranges "
                      f"disjoint): {len(held)} of {len(pairs)} hold live"
                      + "".join(f"; {b} < {w}" + ("" if (b, w) in held else " **not live**") for b, w in pairs)
                      + ".", ""]
    sens = [a for a in agree if "offline_ttft_mean_stats_0" in a]
    if sens:
        lines += [f"Offline sensitivity to stats staleness (mean TTFT, ms, stats period 0 / {stats_period:g} s / "
                  f"{2 * stats_period:g} s) and to the router's random draws ({SEED_SPREAD} seeds):", ""]
        body = [[a["label"], f"{a['rate_scale']:g}×", f"{_ms(a['offline_ttft_mean_stats_0'])} / "
                 f"{_ms(a['offline_ttft_mean'])} / {_ms(a['offline_ttft_mean_stats_2p'])}",
                 f"{_ms(a.get('offline_ttft_mean_seeds_min'))} – {_ms(a.get('offline_ttft_mean_seeds_max'))}"]
                for a in sens]
        lines += report._md_table(["router + engine", "rate", "stats 0 / P / 2P", "seeds min – max"], body,
                                  [":---", "---:", "---:", "---:"])
        lines.append("")
    lines += gap_lines([r for r in rows if r.get("source") == "live"])
    return "\n".join(lines)


def _mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    return statistics.mean(values) if values else None


def gap_lines(live_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The measured causes of sim-vs-live gaps, as Markdown bullets (what the live rows carry)."""
    if not live_rows:
        return []
    lines = ["Where the gaps come from (measured in these runs):", ""]
    speedup = float(live_rows[0].get("speedup") or 1.0)
    overhead = _mean_of(live_rows, "probe_ttft_wall_overhead_ms")
    if overhead is not None:
        lines.append(
            f"- HTTP + Ray path: an idle request's TTFT exceeds the model's by {overhead:.1f} ms wall = "
            f"{overhead * speedup:.1f} ms model time at speed-up {speedup:g} (proxy, ingress tokenization and "
            "routing, the replica call, streaming back); every live TTFT carries it, the simulator's none.")
    tpot = _mean_of(live_rows, "probe_tpot_ratio")
    if tpot is not None:
        lines.append(
            f"- Event-loop jitter: an idle request's TPOT is {tpot:.2f}× the model's (the real-time engine sleeps "
            "each step's modelled time, then pays its own scheduling and token delivery on a shared CPU; under load "
            "the replicas, ingress, proxy and locust share the cores, which stretches steps further).")
    wall_period = live_rows[0].get("stats_period_wall_s")
    if wall_period is not None:
        lines.append(
            f"- Stats staleness: live routers read replica stats published every {float(wall_period):g} s wall "
            f"({float(wall_period) * speedup:g} s model), polled by Serve's controller loop (0.1 s) and pushed by "
            "long-poll, so they are older than the simulator's; the sensitivity table shows how much a policy cares.")
    foreign = _mean_of(live_rows, "host_foreign_cores_mean")
    if foreign is not None:
        worst = max((r for r in live_rows if r.get("host_foreign_cores_mean") is not None),
                    key=lambda r: float(r["host_foreign_cores_mean"]))
        lines.append(
            f"- Host contention: other processes on this {os.cpu_count()}-core host used {foreign:.2f} cores on "
            f"average during the replays (most: {float(worst['host_foreign_cores_mean']):.2f} during "
            f"{worst['label']}); CPU the Ray processes do not get stretches steps and delays tokens, while the "
            "simulator's clock never waits. The service itself (proxy, ingress, replicas, locust) needs about one "
            "core at 500 streamed tokens/s.")
    lag = _mean_of(live_rows, "send_lag_p99_ms")
    if lag is not None:
        late = sum(int(r.get("late") or 0) for r in live_rows)
        lines.append(
            f"- Load generator: {late} requests sent later than the late threshold; mean p99 send lag {lag:.1f} ms "
            "wall (open loop: a late send would understate the load, not stretch the latencies).")
    return lines + [""] if len(lines) > 2 else []


# ---- the command ---------------------------------------------------------------------------------------
def _split(text: str | None, default: Sequence[str]) -> list[str]:
    if not text:
        return list(default)
    return [t.strip() for t in text.split(",") if t.strip()]


def _scales(text: str | None, default: float) -> list[float]:
    if not text:
        return [default]
    out = []
    for item in _split(text, ()):
        value = float(item)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--rate-scales: rate scales must be positive numbers, got {item!r}")
        out.append(value)
    return out


def run_compare(args: argparse.Namespace, *, cluster=None, command: str = "",
                stream=sys.stderr) -> dict[str, Any]:
    """The whole comparison; ``cluster`` (with ``deploy``/``delete``) is used if given, else a ``LocalServe``.

    Returns ``{"rows", "agreement", "csv", "report", "plots"}``.
    """
    from halffull.loadtest.experiments.sweep import git_commit
    from halffull.loadtest.sim.cli import cluster_config

    slo = Slo(args.slo_ttft, args.slo_tpot)
    speedup = float(args.speedup)
    if not (speedup > 0 and math.isfinite(speedup)):
        raise ValueError(f"--speedup must be a positive finite number, got {args.speedup}")
    base = cluster_config(args)
    routers = _split(args.routers, ("round_robin", "pow2", "prefix_aware", "sal"))
    engines = _split(args.engine_policies, ("fcfs",))
    runs = plan_runs(base, routers, engines, _scales(args.rate_scales, 1.0))
    limit = args.limit if (args.limit is not None or args.duration is not None) else 200
    sl = Slice(args.trace, limit, args.start, args.duration, args.seed)
    from halffull.deploy.app import AppConfig

    for run in runs:  # every configuration valid, every slice non-empty, before anything starts
        AppConfig.from_args(app_args(run.config, speedup))
        if not _load_slice(run.config, sl, run.rate_scale):
            raise ValueError(f"trace {sl.trace!r} has no requests in the selected window")
    out_dir = Path(args.out)
    run_dir = out_dir / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    if base.stats_period_s / speedup < MIN_WALL_STATS_PERIOD_S:
        print(f"note: stats period {base.stats_period_s:g} s / speed-up {speedup:g} is below "
              f"{MIN_WALL_STATS_PERIOD_S} s wall; live routers get {MIN_WALL_STATS_PERIOD_S} s wall "
              f"({MIN_WALL_STATS_PERIOD_S * speedup:g} s model)", file=stream)
    print(f"loadtest compare: {len(runs)} live runs ({len(routers)} routers x {len(engines)} engine policies x "
          f"{len(runs) // max(len(routers) * len(engines), 1)} rate scales), {base.num_replicas} x {base.gpu} "
          f"{base.model}, speed-up {speedup:g} -> {out_dir}", file=stream, flush=True)

    rows: list[dict[str, Any]] = []
    live_records: dict[tuple[str, float], list[RequestRecord]] = {}
    listeners = None
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        if cluster is None:
            cluster = stack.enter_context(LocalServe(num_cpus=args.num_cpus))
        for run in runs:
            note = f"[{run.index + 1}/{len(runs)}] {run.label} x{run.rate_scale:g}"
            for attempt in range(args.retries + 1):
                if args.max_foreign_cpu is not None and not wait_for_quiet_host(args.max_foreign_cpu, stream=stream):
                    print(f"{note}: the host did not get quiet; measuring anyway", file=stream, flush=True)
                summary, extra = _live_once(cluster, run, sl, speedup, run_dir, args, note, stream)
                if listeners is None and isinstance(cluster, LocalServe):
                    listeners = extra.pop("listeners")
                foreign = extra.get("host_foreign_cores_mean", 0.0)
                contended = args.max_foreign_cpu is not None and foreign > args.max_foreign_cpu
                print(f"{note}: {summary['completed']} completed, {summary['failed']} failed, late "
                      f"{summary['replay']['late']}; TTFT mean {summary['ttft_mean'] * 1e3:.0f} ms, p99 "
                      f"{summary['ttft_p99'] * 1e3:.0f} ms; TPOT mean {summary['tpot_mean'] * 1e3:.1f} ms (model time);"
                      f" other processes used {foreign:.2f} cores{' (contended)' if contended else ''}",
                      file=stream, flush=True)
                if not contended:
                    break
                if attempt < args.retries:
                    print(f"{note}: re-running (attempt {attempt + 2} of {args.retries + 1})", file=stream, flush=True)
            extra.pop("listeners", None)
            limits = engine_limits(run.config)
            rows.append(live_row(run, sl, summary, limits, speedup, {**extra, "attempts": attempt + 1}))
            live_records[(run.label, run.rate_scale)] = read_records(run_dir / f"{run.index:02d}_records.csv")
    live_wall = time.monotonic() - start

    deltas: dict[tuple[str, float], float | None] = {}
    sensitivity: dict[tuple[str, float], dict[str, float]] = {}
    if args.with_sim:
        print("offline simulator: same slices, same configurations", file=stream, flush=True)
        for run in runs:
            result = simulate_slice(run.config, sl, run.rate_scale)
            limits = engine_limits(run.config)
            rows.append(sim_row(run, sl, result, limits))
            key = (run.label, run.rate_scale)
            deltas[key] = matched_ttft_delta_ms(live_records[key], result.records)
            sensitivity[key] = {
                name: simulate_slice(dataclasses.replace(run.config, stats_period_s=period), sl,
                                     run.rate_scale).summary["ttft_mean"]
                for name, period in (("stats_0", 0.0), ("stats_2p", 2 * run.config.stats_period_s))
            }
            seeded = [result.summary["ttft_mean"]] + [
                simulate_slice(dataclasses.replace(run.config, seed=run.config.seed + k), sl,
                               run.rate_scale).summary["ttft_mean"] for k in range(1, SEED_SPREAD)]
            sensitivity[key].update(seeds_min=min(seeded), seeds_max=max(seeded))
    agree = agreement(rows, deltas, sensitivity)

    csv_path = report.write_csv(rows, out_dir / "results.csv")
    title_note = f"{base.num_replicas} × {base.gpu} {base.model}, live at speed-up {speedup:g}"
    plots = report.write_plots(rows, out_dir, slo=slo, title_note=title_note)
    notes = [
        f"live: a local Ray Serve on 127.0.0.1 (deploy/app.py), {base.num_replicas} simulated replicas, "
        f"speed-up {speedup:g} (latencies reported in model time = wall × speed-up); locust open-loop replay "
        f"of {sl.trace} (limit {sl.limit}, start {sl.start_s:g} s"
        f"{'' if sl.duration_s is None else f', duration {sl.duration_s:g} s'}, "
        f"prompt seed {sl.seed}); {len(runs)} runs in {live_wall:.0f} s wall",
        f"stats period {base.stats_period_s:g} s model ({wall_stats_period(base.stats_period_s, speedup):g} s wall), "
        f"{base.num_routers} router(s) (ingress replicas), router seed {base.seed}",
        "engine limits (KV blocks, max_num_seqs, max_num_batched_tokens) as the simulator resolves them: the "
        "columns of results.csv",
        "preemptions are not visible through the HTTP API: live rows leave them empty (plotted as 0); the "
        "offline rows have them",
    ]
    live_rows = [r for r in rows if r.get("source") == "live"]
    if args.max_foreign_cpu is not None:
        reruns = sum(int(r.get("attempts") or 1) - 1 for r in live_rows)
        notes.append(f"contention guard: at most {args.max_foreign_cpu:g} cores used by other processes per run "
                     f"({reruns} re-run(s); the per-run figure is host_foreign_cores_mean in results.csv)")
    if listeners is not None:
        notes.append(f"listeners: {listeners[0]} listening sockets of this Ray cluster, all on loopback")
    if args.with_sim:
        notes.append(f"series '<label>{OFFLINE_SUFFIX}': the offline simulator on the same slice and configuration")
    md_path = report.write_markdown(rows, out_dir / "report.md", slo=slo,
                                    title="halffull loadtest compare: live Ray Serve", commit=git_commit(),
                                    command=command, notes=notes, plots=plots)
    if agree:
        with md_path.open("a") as f:
            f.write("\n" + agreement_markdown(agree, rows, base.stats_period_s))
        (out_dir / "agreement.json").write_text(json.dumps(agree, indent=2, sort_keys=True))
    for a in agree:
        print(f"  {a['label']:26} x{a['rate_scale']:<5g} TTFT live/offline {_x(a['ttft_ratio'])}  TPOT "
              f"{_x(a['tpot_ratio'])}  {'ok' if a['within_target'] else 'OUTSIDE target'}", file=stream)
    print(f"wrote {csv_path}, {md_path} and {sum(len(p) for p in plots.values())} plots", file=stream, flush=True)
    return {"rows": rows, "agreement": agree, "csv": csv_path, "report": md_path, "plots": plots}


def _live_once(cluster, run: LiveRun, sl: Slice, speedup: float, run_dir: Path, args, note: str,
               stream) -> tuple[dict[str, Any], dict[str, Any]]:
    """Deploy, replay, probe, delete: (the locust summary, probe + host figures [+ "listeners"])."""
    from halffull.loadtest.progress import Progress

    name = f"live{os.getpid()}x{run.index}"
    trace = _load_slice(run.config, sl, run.rate_scale)
    span = trace[-1].arrival_s / speedup
    print(f"{note}: deploying ({len(trace)} requests over {span:.0f} s wall)", file=stream, flush=True)
    url = cluster.deploy(name, app_args(run.config, speedup))
    extra: dict[str, Any] = {}
    try:
        if isinstance(cluster, LocalServe):
            extra["listeners"] = non_loopback_listeners()
            if extra["listeners"][1]:
                raise RuntimeError(f"non-loopback listeners: {extra['listeners'][1]}")
        bar = Progress(len(trace), note, stream=stream, enabled=not args.quiet)
        run_time = span + args.drain_timeout + 60
        stem = run_dir / f"{run.index:02d}"
        for old in run_dir.glob(f"{run.index:02d}_*"):  # a re-run must not read the last attempt's files
            old.unlink()
        cmd = locust_command(url, run, sl, speedup, run_dir, drain_timeout=args.drain_timeout, run_time_s=run_time,
                             late_ms=args.late_ms)
        with HostSampler() as host:
            rc = run_locust(cmd, Path(f"{stem}_locust.log"), run_time + 60,
                            lambda done, total, failed, late: bar.update(done, f"failed {failed} late {late}"))
        bar.close()
        summary_path = Path(f"{stem}_summary.json")
        if not summary_path.exists():
            raise RuntimeError(f"locust exited {rc} without a summary; log: {stem}_locust.log")
        summary = json.loads(summary_path.read_text())
        extra.update(host.summary())
        try:
            extra.update(probe_idle(url, run.config, speedup))
        except Exception as exc:  # the comparison stands without it
            print(f"{note}: idle probe failed ({type(exc).__name__}: {exc})", file=stream)
    finally:
        cluster.delete(name)
    return summary, extra


def cmd_compare(args: argparse.Namespace) -> int:
    run_compare(args, command=getattr(args, "_command", "") or shlex.join(["halffull", *sys.argv[1:]]))
    return 0


def add_compare_args(p: argparse.ArgumentParser) -> None:
    from halffull.loadtest.sim.cli import add_cluster_args

    add_cluster_args(p)
    # The comparison's axes replace the single-valued cluster flags of the same names (kept as aliases).
    p.add_argument("--routers", "--router", dest="routers", default=None,
                   help="comma-separated routers (default round_robin,pow2,prefix_aware,sal)")
    p.add_argument("--engine-policies", "--engine-policy", dest="engine_policies", default=None,
                   help="comma-separated engine policies (default fcfs)")
    p.add_argument("--rate-scales", "--rate-scale", dest="rate_scales", default=None,
                   help="comma-separated arrival-rate scales (default 1)")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="the replicas run S times faster than modelled; arrivals / S; latencies x S in reports")
    p.add_argument("--with-sim", action="store_true",
                   help="also run the offline simulator on the same slices and report the agreement")
    p.add_argument("--drain-timeout", type=float, default=180.0,
                   help="wall seconds locust waits for running requests after the last send (default 180)")
    p.add_argument("--late-ms", type=float, default=50.0, help="wall ms after which a send counts as late")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--max-foreign-cpu", type=float, default=None, metavar="CORES",
                   help="shared hosts: wait until other processes use at most CORES before each run, and re-run "
                        "a run during which they used more (see --retries)")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a contended run (default 2)")
    p.add_argument("--out", default="out/live", help="output directory (default out/live)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare, router="sal", engine_policy="fcfs", rate_scale=1.0)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``loadtest`` (with ``compare``) to ``halffull``'s subcommands (loadtest/cli.py)."""
    p = subparsers.add_parser("loadtest", help="live load tests against Ray Serve (locust)",
                              description="Live load tests against a local Ray Serve deployment.")
    sub = p.add_subparsers(dest="loadtest_command", required=True)
    c = sub.add_parser(
        "compare", conflict_handler="resolve",
        help="deploy each policy on a local Ray Serve, replay a trace with locust, report",
        description="For each router x engine policy x rate scale: deploy the app on a local loopback Ray "
                    "Serve, replay the trace slice with locust (headless, open loop), tear down; write "
                    "results.csv, plots and report.md as `halffull compare` does. --with-sim adds the offline "
                    "simulator on the same slices and the sim-vs-live agreement.")
    add_compare_args(c)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m halffull.loadtest.live.compare ...`` = ``halffull loadtest compare ...``."""
    from halffull.loadtest import command

    parser = argparse.ArgumentParser(prog="python -m halffull.loadtest.live.compare", conflict_handler="resolve",
                                     description="halffull loadtest compare")
    add_compare_args(parser)
    return command.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
