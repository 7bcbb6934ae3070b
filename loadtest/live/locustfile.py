"""Open-loop trace replay against halffull's OpenAI-compatible API (locust; loopback only).

    # headless (CI): one replay user; exits when the slice is done (+ drain), writes the JSON and the CSVs
    locust -f loadtest/live/locustfile.py --headless -u 1 --host http://127.0.0.1:8000 \\
           --trace azure_conv --rate-scale 4 --limit 200 --json-out out/replay.json --csv out/replay
    # web UI (people): http://127.0.0.1:8089, start with 1 user; the options below are in the form
    locust -f loadtest/live/locustfile.py --host http://127.0.0.1:8000 --trace azure_conv --limit 200

What it does
  * Loads a slice of a trace (loadtest/sim/traces.py: ``--trace --rate-scale --limit --start --duration``, clipped
    to the served model's context from ``GET /v1/models``) and synthesizes every prompt up front
    (loadtest/live/prompts.py): exactly the trace's prompt token count under the served tokenizer, identical text
    exactly where Mooncake hash_ids are shared. ``max_tokens`` = the trace's output length, ``ignore_eos``.
  * Open loop: one dispatcher greenlet sleeps until each request's arrival time, ``arrival / speedup`` wall
    seconds after the start (arrivals are already divided by ``--rate-scale``), and spawns one greenlet per
    request, so a slow server never slows the arrivals. The send lag (actual send - scheduled) of every request
    is recorded; a request sent more than ``--late-ms`` late counts as *late* (reported; late requests are a
    sign the load generator, not the server, is the bottleneck).
  * Each request: ``POST /v1/completions`` with ``stream: true`` and ``stream_options.include_usage``; TTFT at
    the first chunk with text, E2E at the last chunk with text, TPOT = (E2E - TTFT) / (output tokens - 1)
    (DESIGN.md §7); the output and cached-prompt token counts from the final usage chunk (a chunk may carry
    several tokens: tokens are counted from usage, never from chunks; loadtest/live/sse.py).
  * ``--speedup S`` must equal the app's ``speedup``: arrivals are compressed S times and measured latencies
    are multiplied by S, so every reported latency is in *model time*, comparable with ``halffull simulate``.
  * Bounded: the slice (``--limit`` defaults to 500 when neither it nor ``--duration`` is given), then at most
    ``--drain-timeout`` wall seconds for the requests still running (then they are cancelled and count as
    failed); headless runs then quit, a web-UI run stops (the UI keeps the results).

Locust statistics (web UI, ``--csv``, ``--html``): ``POST /v1/completions`` (wall ms, send to end of stream;
failures here), and custom request types in model ms: ``TTFT``, ``TPOT``, ``E2E`` (name
``/v1/completions (model ms)``), plus ``LAG`` (name ``dispatch (wall ms)``): the send lag of each request.

End of run (``--json-out``): the keys of ``halffull simulate --json`` (``halffull.loadtest.sim.metrics.summarize`` over
``RequestRecord``s in model time, ``clipped``, ``rejected``, ``config``, ``trace``, ``rate_scale``,
``per_replica`` from the ``x-halffull-replica`` header; ``sim_wall_s`` is the replay's wall time,
``preemptions_per_request`` is null: the API does not report preemptions) plus a ``replay`` dict (sent, late,
send-lag percentiles, token-count mismatches, first errors).

Refused (exit code 2, one clear error line): a ``--host`` that is not a loopback address, a web UI bound to
a non-loopback ``--web-host`` (the default here is 127.0.0.1), and distributed runs (``--processes``,
``--master``/``--worker``: each worker would replay the whole trace).
"""

from __future__ import annotations

import csv
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
from gevent.pool import Pool
from geventhttpclient import HTTPClient
from locust import User, events, task
from locust.runners import LocalRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from halffull.loadtest.live.prompts import PromptSynthesizer
from halffull.loadtest.live.sse import StreamError, read_completion_stream
from halffull.loadtest.sim.metrics import RequestRecord, Slo, percentile, summarize
from halffull.loadtest.sim.traces import load_trace

logger = logging.getLogger("halffull.replay")

DEFAULT_LIMIT = 500  # requests, when neither --limit nor --duration bounds the slice
PROGRESS_EVERY_S = 2.0  # wall seconds between progress lines (loadtest/live/compare.py parses them)
START_DELAY_S = 0.5  # wall seconds between the end of setup and the first scheduled arrival
PROGRESS_PREFIX = "replay progress:"
MAX_ERRORS_KEPT = 20
# --records-out columns (times: model seconds on the replay's clock; empty when unknown)
# accepted_s: the response headers arrived, i.e. the replica took the request and said so: a round trip through
# proxy, ingress, router and replica, the path cost each TTFT carries (under the load of the moment).
RECORD_COLUMNS = ("request_id", "arrival_s", "first_token_s", "finish_s", "num_prompt_tokens",
                  "num_output_tokens", "num_cached_prompt_tokens", "replica", "error", "accepted_s")


# ---- options -------------------------------------------------------------------------------------------
@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--trace", default="azure_conv",
                        help="azure_code | azure_conv | mooncake_conv | PATH (.csv / .jsonl)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="arrivals X times faster than the trace")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"first N requests of the window (default {DEFAULT_LIMIT} unless --duration)")
    parser.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace")
    parser.add_argument("--duration", type=float, default=None, help="window length, seconds of the trace")
    parser.add_argument("--seed", type=int, default=0, help="prompt text seed")
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="the app's speedup: arrivals / S on the wall clock, latencies x S in reports")
    parser.add_argument("--json-out", default=None, help="write the end-of-run summary JSON here")
    parser.add_argument("--records-out", default=None,
                        help="write one CSV line per request here (model-time seconds)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="wall seconds to wait for running requests after the last send")
    parser.add_argument("--late-ms", type=float, default=50.0,
                        help="a request sent more than this many wall ms after its time counts as late")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="wall seconds without progress on one request before it fails")
    parser.add_argument("--max-in-flight", type=int, default=4096,
                        help="connections (= concurrent requests) at most; more wait and show up as late")
    parser.add_argument("--api-key", default=os.environ.get("HALFFULL_API_KEY") or None, is_secret=True,
                        help="sent as 'Authorization: Bearer ...' when set (env HALFFULL_API_KEY)")
    # Every listener binds loopback: the web UI too, unless told otherwise (and then refused, below).
    parser.set_defaults(web_host="127.0.0.1")


@dataclass(frozen=True)
class ReplayOptions:
    host: str
    trace: str = "azure_conv"
    rate_scale: float = 1.0
    limit: int | None = None
    start: float = 0.0
    duration: float | None = None
    seed: int = 0
    speedup: float = 1.0
    json_out: str | None = None
    records_out: str | None = None
    drain_timeout: float = 60.0
    late_ms: float = 50.0
    request_timeout: float = 600.0
    max_in_flight: int = 4096
    api_key: str | None = None

    @classmethod
    def from_parsed(cls, opts, host: str | None) -> "ReplayOptions":
        """From locust's parsed options (web-UI edits arrive as strings: convert here, fail clearly)."""

        def num(name, kind, optional=False):
            value = getattr(opts, name, None)
            if value in (None, "", "None") and optional:
                return None
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"--{name.replace('_', '-')}: not a {kind.__name__}: {value!r}") from None

        out = cls(
            host=(host or "").rstrip("/"), trace=str(opts.trace), rate_scale=num("rate_scale", float),
            limit=num("limit", int, True), start=num("start", float), duration=num("duration", float, True),
            seed=num("seed", int), speedup=num("speedup", float), json_out=opts.json_out or None,
            records_out=getattr(opts, "records_out", None) or None,
            drain_timeout=num("drain_timeout", float), late_ms=num("late_ms", float),
            request_timeout=num("request_timeout", float), max_in_flight=num("max_in_flight", int),
            api_key=opts.api_key or None,
        )
        if not (out.speedup > 0 and math.isfinite(out.speedup)):
            raise ValueError(f"--speedup must be a positive finite number, got {out.speedup}")
        if out.max_in_flight < 1:
            raise ValueError("--max-in-flight must be >= 1")
        return out


def is_loopback_host(hostname: str) -> bool:
    """True when every address ``hostname`` resolves to is a loopback address."""
    def loopback(address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0])
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too

    if not hostname:
        return False
    try:
        return loopback(hostname.strip("[]"))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(hostname, None)
    except OSError:
        return False
    return bool(infos) and all(loopback(info[4][0]) for info in infos)


def check_target(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of a loopback http:// URL; ValueError otherwise."""
    parts = urlsplit(url or "")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--host must be an http:// URL of the local service, got {url!r}")
    if not is_loopback_host(parts.hostname):
        raise ValueError(f"--host {url!r} is not a loopback address: halffull load tests only target "
                         "127.0.0.1 / ::1 / localhost")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


def _refuse(environment, message: str) -> None:
    logger.error("halffull replay: %s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    environment.process_exit_code = 2


@events.init.add_listener
def _check_setup(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None:  # locust used as a library
        return
    problem = None
    if not isinstance(environment.runner, LocalRunner) or getattr(opts, "processes", None):
        problem = "the replay runs in one process: no --processes, --master or --worker (each would replay the trace)"
    elif not opts.headless and not is_loopback_host(opts.web_host or "0.0.0.0"):
        problem = f"--web-host {opts.web_host or '*'!r} is not loopback; use --web-host 127.0.0.1"
    else:
        try:
            if environment.host or opts.headless:
                check_target(environment.host)
            ReplayOptions.from_parsed(opts, environment.host)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        _refuse(environment, problem)
        sys.exit(2)


# ---- one replay ----------------------------------------------------------------------------------------
@dataclass
class _Item:
    index: int
    request_id: str
    arrival_s: float  # model seconds after the first arrival
    num_prompt_tokens: int
    num_output_tokens: int
    body: bytes


class Replay:
    """Schedule, dispatcher, per-request streaming, results. One per test start."""

    def __init__(self, environment, options: ReplayOptions):
        self.environment = environment
        self.options = options
        self.host, self.port, self.prefix = check_target(options.host)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if options.api_key:
            headers["Authorization"] = f"Bearer {options.api_key}"
        self.headers = headers
        self.client = HTTPClient(self.host, self.port, concurrency=options.max_in_flight,
                                 connection_timeout=10.0, network_timeout=options.request_timeout,
                                 headers=headers)
        self.items: list[_Item] = []
        self.records: dict[str, RequestRecord] = {}
        self.lags_ms: list[float] = []
        self.accepted: dict[str, float] = {}  # request id -> model time the response headers arrived
        self.errors: list[str] = []
        self.replica_counts: dict[str, int] = {}
        self.mismatches = {"prompt_tokens": 0, "output_tokens": 0}
        self.num_sent = self.num_done = self.num_failed = self.num_late = 0
        self.num_clipped = 0
        self.num_rejected = 0  # HTTP 4xx: the server refused the request
        self.model = ""
        self.max_model_len = 0
        self.t0: float | None = None
        self.wall_start = self.wall_end = None
        self.finished = False
        self.pool = Pool()
        self._written = False

    # ---- setup ---------------------------------------------------------------------------------------
    def _get_json(self, path: str) -> dict:
        response = self.client.get(self.prefix + path, headers=self.headers)
        body = response.read()
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status_code}: {body[:200]!r}")
        return json.loads(body)

    def prepare(self) -> None:
        models = self._get_json("/v1/models")["data"]
        self.model = models[0]["id"]
        self.max_model_len = int(models[0].get("max_model_len") or 0) or None
        o = self.options
        limit = o.limit if (o.limit is not None or o.duration is not None) else DEFAULT_LIMIT
        trace = load_trace(o.trace, rate_scale=o.rate_scale, limit=limit, start_s=o.start, duration_s=o.duration,
                           max_total_tokens=self.max_model_len)
        if not trace:
            raise ValueError(f"trace {o.trace!r} has no requests in the selected window")
        self.num_clipped = trace.num_clipped
        synth = PromptSynthesizer(o.seed)
        for i, r in enumerate(trace):
            body = {"model": self.model, "prompt": synth.for_request(r), "max_tokens": r.num_output_tokens,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            self.items.append(_Item(i, r.request_id, r.arrival_s, r.num_prompt_tokens, r.num_output_tokens,
                                    json.dumps(body).encode()))
        span = self.items[-1].arrival_s
        logger.info("replay: %s, %d requests over %.1f s of model time (%.1f s wall at speed-up %g), model %s",
                    o.trace, len(self.items), span, span / o.speedup, o.speedup, self.model)

    # ---- the run -------------------------------------------------------------------------------------
    def model_time(self, wall: float) -> float:
        return (wall - self.t0) * self.options.speedup

    def run(self) -> None:
        """Dispatch every request at its time, then drain (runs in the replay user's greenlet)."""
        o = self.options
        progress = gevent.spawn(self._progress_loop)
        try:
            self.wall_start = time.time()
            self.t0 = time.perf_counter() + START_DELAY_S
            for item in self.items:
                due = self.t0 + item.arrival_s / o.speedup
                delay = due - time.perf_counter()
                if delay > 0:
                    gevent.sleep(delay)
                self.pool.spawn(self._send, item, due)
            if not self.pool.join(timeout=o.drain_timeout):
                logger.warning("replay: %d requests still running %.0f s after the last send; cancelling them",
                               len(self.pool), o.drain_timeout)
        finally:
            self.pool.kill(block=True, timeout=10)
            progress.kill(block=False)
            self.wall_end = time.time()
            self.finished = True
            self._progress_line()

    def _progress_line(self) -> None:
        line = (f"{PROGRESS_PREFIX} done={self.num_done + self.num_failed} total={len(self.items)} "
                f"sent={self.num_sent} failed={self.num_failed} late={self.num_late}")
        logger.info(line)

    def _progress_loop(self) -> None:
        while True:
            gevent.sleep(PROGRESS_EVERY_S)
            self._progress_line()

    def _send(self, item: _Item, due: float) -> None:
        o = self.options
        sent = time.perf_counter()
        lag_ms = (sent - due) * 1e3
        self.lags_ms.append(lag_ms)
        self.num_sent += 1
        if lag_ms > o.late_ms:
            self.num_late += 1
        self._fire("LAG", "dispatch (wall ms)", max(lag_ms, 0.0), 0)
        record = RequestRecord(item.request_id, self.model_time(sent), None, None, item.num_prompt_tokens, 0)
        self.records[item.request_id] = record
        try:
            response = self.client.request("POST", self.prefix + "/v1/completions", body=item.body)
            self.accepted[item.request_id] = self.model_time(time.perf_counter())
            try:
                if response.status_code != 200:
                    if 400 <= response.status_code < 500:
                        self.num_rejected += 1
                    raise StreamError(f"HTTP {response.status_code}: {response.read()[:300].decode(errors='replace')}")
                replica = response.get("x-halffull-replica") or ""
                record.replica = replica
                stream = read_completion_stream(lambda: response.readline(b"\n"))
            finally:
                response.release()
            usage, first, last = stream.usage, stream.first, stream.last
            output = stream.num_output_tokens  # tokens, not events: an event may carry several
            prompt = int(usage.get("prompt_tokens") or item.num_prompt_tokens)
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            if prompt != item.num_prompt_tokens:
                self.mismatches["prompt_tokens"] += 1
            if output != item.num_output_tokens:
                self.mismatches["output_tokens"] += 1
            record.first_token_s, record.finish_s = self.model_time(first), self.model_time(last)
            record.num_output_tokens, record.num_prompt_tokens = output, prompt
            record.num_cached_prompt_tokens = cached
            self.replica_counts[replica] = self.replica_counts.get(replica, 0) + 1
        except gevent.GreenletExit:
            record.error = "cancelled (drain timeout or test stopped)"
            self.num_failed += 1
            raise
        except Exception as exc:  # one failed request; the run goes on
            record.error = f"{type(exc).__name__}: {exc}"[:500]
            self.num_failed += 1
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(f"{item.request_id}: {record.error}")
            self._fire("POST", "/v1/completions", (time.perf_counter() - sent) * 1e3, 0, exc)
            return
        self.num_done += 1
        end = time.perf_counter()
        self._fire("POST", "/v1/completions", (end - sent) * 1e3, record.num_output_tokens)
        name = "/v1/completions (model ms)"
        self._fire("TTFT", name, record.ttft * 1e3, record.num_prompt_tokens)
        self._fire("E2E", name, record.e2e * 1e3, record.num_output_tokens)
        if record.tpot is not None:
            self._fire("TPOT", name, record.tpot * 1e3, record.num_output_tokens)

    def _fire(self, request_type: str, name: str, ms: float, length: int, exc: BaseException | None = None) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=ms,
                                             response_length=length, exception=exc, context={})

    # ---- results -------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        o = self.options
        records = list(self.records.values())
        unsent = len(self.items) - len(records)  # the test stopped before their time: failed
        summary = summarize(records, slo=Slo())
        summary.update(
            failed=summary["failed"] + unsent, clipped=self.num_clipped, rejected=self.num_rejected,
            preemptions_per_request=None,  # not visible through the API
            sim_wall_s=(self.wall_end or time.time()) - (self.wall_start or time.time()),
        )
        summary["sim_requests_per_s"] = len(records) / summary["sim_wall_s"] if summary["sim_wall_s"] > 0 else 0.0
        lags = sorted(self.lags_ms)
        summary.update(
            trace=o.trace, rate_scale=o.rate_scale,
            config={"host": o.host, "model": self.model, "max_model_len": self.max_model_len, "speedup": o.speedup,
                    "limit": o.limit, "start_s": o.start, "duration_s": o.duration, "seed": o.seed},
            per_replica=[{"replica": k, "requests": v, "busy_s": None, "steps": None, "preemptions": None}
                         for k, v in sorted(self.replica_counts.items())],
            replay={
                "requests": len(self.items), "sent": self.num_sent, "unsent": unsent, "late": self.num_late,
                "late_ms": o.late_ms, "lag_ms_mean": sum(lags) / len(lags) if lags else 0.0,
                "lag_ms_p50": percentile(lags, 50, presorted=True), "lag_ms_p99": percentile(lags, 99, presorted=True),
                "lag_ms_max": lags[-1] if lags else 0.0, "speedup": o.speedup,
                **self._accept_stats(records),
                "token_mismatches": dict(self.mismatches), "errors": list(self.errors),
                "finished": self.finished,
            },
        )
        return summary

    def _accept_stats(self, records: list[RequestRecord]) -> dict[str, float]:
        """Send -> response headers of completed requests, model ms (the path cost under load)."""
        ms = sorted((self.accepted[r.request_id] - r.arrival_s) * 1e3 for r in records
                    if r.completed and r.request_id in self.accepted)
        return {"accept_ms_mean": sum(ms) / len(ms) if ms else 0.0, "accept_ms_p50": percentile(ms, 50, presorted=True),
                "accept_ms_p99": percentile(ms, 99, presorted=True)}

    def write_json(self) -> None:
        if self._written:
            return
        self._written = True
        self.write_records()
        if not self.options.json_out:
            return
        path = Path(self.options.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = self.result()
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=2, sort_keys=True))
        tmp.replace(path)  # whole file or none: a reader never sees half a JSON
        logger.info("replay: %d completed, %d failed, %d late; wrote %s", out["completed"], out["failed"],
                    out["replay"]["late"], path)

    def write_records(self) -> None:
        if not self.options.records_out:
            return
        path = Path(self.options.records_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(RECORD_COLUMNS)
            for r in self.records.values():
                writer.writerow([r.request_id, r.arrival_s, r.first_token_s, r.finish_s, r.num_prompt_tokens,
                                 r.num_output_tokens, r.num_cached_prompt_tokens, r.replica, r.error or "",
                                 self.accepted.get(r.request_id, "")])

    def close(self) -> None:
        self.pool.kill(block=False)
        self.client.close()


_current: Replay | None = None


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    global _current
    _current = None
    try:
        options = ReplayOptions.from_parsed(environment.parsed_options, environment.host)
        replay = Replay(environment, options)
        replay.prepare()
    except Exception as exc:
        _refuse(environment, f"replay setup failed: {exc}")
        headless = bool(environment.parsed_options and environment.parsed_options.headless)
        gevent.spawn_later(0, environment.runner.quit if headless else environment.runner.stop)
        return
    _current = replay


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    replay = _current
    if replay is None:
        return
    replay.write_json()
    replay.close()


class TraceReplayUser(User):
    """The single replay user: its one task runs the whole open-loop replay, then ends the test."""

    fixed_count = 1

    @task
    def replay(self) -> None:
        replay = _current
        if replay is None or replay.finished:
            gevent.sleep(1.0)  # setup failed (quitting) or already replayed: nothing to do
            return
        try:
            replay.run()
        finally:
            replay.write_json()
        runner = self.environment.runner
        # Locust writes --csv files every CSV_STATS_INTERVAL_SEC and not at exit: let it see the last requests.
        delay = CSV_STATS_INTERVAL_SEC + 0.5
        if self.environment.parsed_options and self.environment.parsed_options.headless:
            gevent.spawn_later(delay, runner.quit)
        else:
            gevent.spawn_later(delay, runner.stop)  # the web UI keeps showing the results
        gevent.sleep(delay + 5)  # not again: the runner stops this user first
