"""Streaming cost of the serving path: tokens/s and server CPU per output token, per process, streamed and not.

    halffull bench stream [--streams 32,128] [--tokens 500] [--stream-rounds 3] [--speeds 1,inf]
                          [--stream-replicas 4] [--ingress-replicas 1] [--stream-interval-ms MS]
                          [--apps halffull,default] [--paths proxy,direct] [--ramp-s 1] [--no-token-channel]

Setup (loopback only): a fresh local Ray cluster (127.0.0.1) and Serve's HTTP proxy on a free 127.0.0.1 port.
For each speed (``1``: simulated H100s at their real step cadence, every stream gets a token per engine step;
``inf``: instant replicas, the serving path alone), two apps side by side, the default app config
(AppConfig defaults = deploy/serve_config.yaml) but for the router:

    halffull   halffull's request router (``sal``)
    default    Ray Serve's PowerOfTwoChoicesRequestRouter (router: ray_default)
    halffull-actor  as halffull, but the ingress calls the LLM replicas with Ray actor calls (replica_calls:
               actor) instead of gRPC; only when listed in --apps
    halffull-1loop  as halffull, but the LLM replicas too run their code on the replica's own event loop
               (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 for every replica; the ingress does by default:
               deploy/app.py ingress_env); only when listed
    halffull-2loop  as halffull, but the ingress too runs its code on a second thread's loop, Ray's default
               (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1): halffull's default before 2026-12-07; only when
               listed

Paths: ``proxy`` through the cluster's HTTP front on http_options.port, the way clients reach the service: by
default HAProxy in front of the ingress replicas (deploy/ray_env.py); with RAY_SERVE_ENABLE_HA_PROXY=0 exported,
Serve's Python proxy, which reaches the ingress over gRPC unless RAY_SERVE_PROXY_USE_GRPC=0 is exported too.
``direct`` to the ingress replicas' own HTTP servers (Ray's direct ingress, switched on for this cluster when
listed), with no front. Both paths are measured on the same cluster; the report's header names the front. The
``proxy`` role counts whichever front runs: Serve's proxy actor, or HAProxy and its manager actor (Serve's
proxy also runs beside HAProxy, as its backup server while no ingress replica is up).

Load, per phase: N concurrent completions of T output tokens each (``max_tokens`` T, ``ignore_eos``), sent
over ``--ramp-s`` seconds (default 1: a burst of N at once measures the ingress admitting N requests, not
streaming), streamed (SSE, ``stream_options.include_usage``) or not. Each round runs every (speed, N, mode) for both
apps, in alternating order. The client is a minimal asyncio HTTP/1.1 reader in this process (so its CPU is
not the server's, and it timestamps bytes as they arrive).

Reported per phase, medians over rounds:
  * tokens/s: output tokens (the answers' ``usage``; checked against N x T) / the phase's wall seconds;
  * server CPU per token, per process role: user+system CPU seconds of each process of this Ray cluster over
    the phase (psutil), grouped as ``ingress`` and ``replica`` (this app's OpenAIIngress / LLMReplica
    actors), ``proxy`` (Serve's HTTP proxy actor), ``controller`` (ServeController), ``ray`` (raylet, GCS,
    every other process of the cluster), ``total`` (all of them; the other app's replicas excluded);
  * marginal: total less what the deployed cluster burns idle (measured for 5 s before the rounds and printed
    per role: stats polling, health checks, metrics), i.e. what the tokens themselves cost;
  * TTFT-out (streamed): per request, the wall time its first SSE text bytes reached the client minus the time
    the replica got its first token from the engine (``LLMReplica.stream_timings``, wall clock, same host):
    what the serving path adds to TTFT.

Targets (issue "the serving path carries a GPU's token rate", speed 1, default knobs): total <= 0.1 ms/token
streamed at N = 32 and 128, <= 0.05 ms non-streamed; TTFT-out median < 1 ms at N = 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field

from halffull.deploy import ray_env
from halffull.loadtest.bench.serve import percentile

ROLES = ("ingress", "replica", "proxy", "controller", "ray", "total")
IDLE_S = 5.0
IDLE_CPU_PER_S: dict[tuple[str, str], float] = {}
APPS = {  # app name -> its arguments besides the defaults
    "halffull": {"router": "sal"},
    "default": {"router": "ray_default"},
    "halffull-actor": {"router": "sal", "replica_calls": "actor"},  # the ingress calls replicas by actor calls
    "halffull-1loop": {"router": "sal"},  # every replica runs its code on its own loop (APP_ENV)
    "halffull-2loop": {"router": "sal"},  # the ingress too on Ray's separate loops (APP_ENV)
}
HAPROXY_PROCESS = re.compile(r"(^|/)haproxy\s")  # the HAProxy binary Serve starts (-db -f <config>)
APP_ENV = {  # app -> the environment its app is built with (deploy/app.py process_env, ingress_env)
    "halffull-1loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "halffull-2loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"},
}


# ---- per-process CPU ---------------------------------------------------------------------------------------
def role_of(cmdline: str, app: str) -> str | None:
    """The role of a Ray process for ``app`` from its command line (Ray sets ``ray::<actor>`` titles); None: a
    replica of another app (not counted)."""
    if "ServeReplica:" in cmdline:
        if f"ServeReplica:{app}:" not in cmdline:
            return None
        return "ingress" if "OpenAIIngress" in cmdline else "replica"
    if "ProxyActor" in cmdline or "HAProxyManager" in cmdline or HAPROXY_PROCESS.search(cmdline):
        return "proxy"  # Serve's HTTP proxy actor, or HAProxy and the actor that manages it
    if "ServeController" in cmdline:
        return "controller"
    return "ray"


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds so far) of every descendant of this driver (its Ray cluster)."""
    import psutil

    out = {}
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            times = proc.cpu_times()
            out[proc.pid] = (" ".join(proc.cmdline()), times.user + times.system)
        except psutil.Error:
            pass
    return out


def cpu_by_role(before: dict, after: dict, app: str) -> dict[str, float]:
    """CPU seconds per role between two ``cpu_by_process`` snapshots (processes that started count from 0)."""
    out = dict.fromkeys(ROLES, 0.0)
    for pid, (cmd, cpu) in after.items():
        role = role_of(cmd, app)
        if role is None:
            continue
        delta = cpu - before.get(pid, (cmd, 0.0))[1]
        out[role] += delta
        out["total"] += delta
    return out


# ---- the client ----------------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int = 0
    first_text: float | None = None  # wall time the first SSE text bytes arrived (streamed)
    tokens: int = 0
    error: str | None = None
    body: bytearray = field(default_factory=bytearray)


class _Reader(asyncio.Protocol):
    """One HTTP/1.1 request on its own connection; stamps the first streamed text, keeps the body's bytes."""

    def __init__(self, answer: Answer, done: asyncio.Future, stream: bool):
        self.answer, self.done, self.stream = answer, done, stream
        self.head = True

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if self.stream and answer.first_text is None and b'"text": "' in data:
            answer.first_text = time.time()
        answer.body += data
        if (b"data: [DONE]" in data or (not self.stream and data.endswith(b"\r\n0\r\n\r\n"))) \
                and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def one_request(port: int, path: str, body: dict, request_id: str, timeout: float) -> Answer:
    loop = asyncio.get_running_loop()
    answer, done = Answer(), loop.create_future()
    payload = json.dumps(body).encode()
    transport, _ = await loop.create_connection(lambda: _Reader(answer, done, body["stream"]), "127.0.0.1", port)
    transport.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"x-request-id: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                    % (path.encode(), request_id.encode(), len(payload)) + payload)
    try:
        await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        answer.error = "timeout"
    finally:
        transport.close()
    parse_answer(answer, body["stream"])
    return answer


def parse_answer(answer: Answer, stream: bool) -> None:
    """Status and output tokens (``usage.completion_tokens``) from the raw response."""
    raw = bytes(answer.body)
    try:
        answer.status = int(raw[9:12])
    except ValueError:
        answer.error = answer.error or f"no HTTP status in {raw[:80]!r}"
        return
    found = re.findall(rb'"completion_tokens": ?(\d+)', raw[-2000:])
    if not found:
        answer.error = answer.error or f"no usage (HTTP {answer.status}): {raw[-300:]!r}"
        return
    answer.tokens = int(found[-1])
    if stream and b'"error"' in raw:
        answer.error = "error event"


BENCH_PROMPT = "benchmark prompt with a few words in it"  # every request's (bench engine tokenizes it too)


async def phase(ports: list[int], app: str, streams: int, tokens: int, stream: bool, timeout: float,
                ramp_s: float = 0.0):
    """(answers, request ids, seconds) of ``streams`` concurrent completions of ``tokens`` tokens, spread
    round-robin over ``ports`` (the proxy's, or the ingress replicas' own with direct ingress)."""
    body = {"model": "llama3-8b", "prompt": BENCH_PROMPT, "max_tokens": tokens,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    ids = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(streams)]

    async def send(i: int, rid: str) -> Answer:
        await asyncio.sleep(ramp_s * i / streams)
        return await one_request(ports[i % len(ports)], f"/{app}/v1/completions", body, rid, timeout)

    start = time.perf_counter()
    answers = await asyncio.gather(*(send(i, rid) for i, rid in enumerate(ids)))
    return answers, ids, time.perf_counter() - start


# ---- the run ---------------------------------------------------------------------------------------------------
def ttft_out_ms(answers, ids, timings: dict[str, float]) -> list[float]:
    out = []
    for answer, rid in zip(answers, ids):
        starts = [t for key, t in timings.items() if key.startswith(f"cmpl-{rid}-")]
        if answer.first_text is not None and starts:
            out.append((answer.first_text - min(starts)) * 1e3)
    return out


@dataclass
class Row:
    speed: str
    streams: int
    mode: str
    path: str
    app: str
    tokens_per_s: list[float] = field(default_factory=list)
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})
    ttft_out_ms: list[float] = field(default_factory=list)
    marginal_ms: list[float] = field(default_factory=list)  # total less the idle cluster's CPU over the phase
    idle_cpu_per_s: float = 0.0

    def add(self, answers, seconds: float, cpu: dict[str, float]) -> None:
        total = sum(a.tokens for a in answers)
        self.tokens_per_s.append(total / seconds)
        self.marginal_ms.append((cpu["total"] - self.idle_cpu_per_s * seconds) / max(total, 1) * 1e3)
        for role, value in cpu.items():
            self.cpu_ms[role].append(value / max(total, 1) * 1e3)


def direct_ports(app: str, proxy_port: int, num_ingress: int, timeout: float = 60.0) -> list[int]:
    """The HTTP ports the ingress replicas of ``app`` serve on themselves (direct ingress), from the controller's
    target groups (the proxy's port while a replica has none yet)."""
    import ray
    from ray import serve

    controller = serve.context._get_global_client()._controller
    deadline = time.monotonic() + timeout
    while True:
        # from_proxy_manager: with HAProxy on, the controller answers others with HAProxy's own target.
        groups = ray.get(controller.get_target_groups.remote(app, from_proxy_manager=True))
        ports = sorted({t.port for group in groups
                        for t in group.targets if group.protocol == "HTTP" and t.port != proxy_port})
        if len(ports) >= num_ingress or time.monotonic() > deadline:
            if not ports:
                raise RuntimeError(f"no direct-ingress port for {app}")
            return ports
        time.sleep(0.5)


def run_speed(args, speed: str, port: int, rows: dict) -> None:
    from ray import serve

    from halffull.deploy.app import build_app_with_env

    extra = {} if args.stream_interval_ms is None else {"stream_interval_ms": args.stream_interval_ms}
    if args.no_token_channel:
        extra["token_channel"] = False
    apps = args.apps
    paths = [p for p in args.paths.split(",") if p]
    for app in apps:
        app_args = {"num_replicas": args.stream_replicas, "ingress_replicas": args.ingress_replicas,
                    "speedup": speed, **APPS[app], **extra}
        serve.run(build_app_with_env(app_args, {**os.environ, **APP_ENV.get(app, {})}), name=app,
                  route_prefix=f"/{app}")
    ports = {(app, "proxy"): [port] for app in apps}
    if "direct" in paths:
        ports.update({(app, "direct"): direct_ports(app, port, args.ingress_replicas) for app in apps})
    try:
        for (app, path), app_ports in ports.items():  # warm-up
            asyncio.run(phase(app_ports, app, 8, 16, True, args.phase_timeout))
        for app in apps:  # the deployed, idle cluster's own CPU (stats polling, health checks, metrics)
            before = cpu_by_process()
            time.sleep(IDLE_S)
            idle = cpu_by_role(before, cpu_by_process(), app)
            IDLE_CPU_PER_S[(speed, app)] = idle["total"] / IDLE_S
            print(f"idle cluster (speed {speed}, {app}): {IDLE_CPU_PER_S[(speed, app)]:.3f} CPU s/s ("
                  + ", ".join(f"{role} {idle[role] / IDLE_S:.3f}" for role in ROLES[:-1]) + ")", flush=True)
        for r in range(args.stream_rounds):
            for n in args.streams:
                for mode in ("stream", "plain"):
                    for path in paths:
                        order = apps if r % 2 == 0 else apps[::-1]
                        for app in order:
                            measure(args, rows, speed, n, mode, path, app, ports[(app, path)], r)
    finally:
        for app in apps:
            serve.delete(app)


def measure(args, rows: dict, speed: str, n: int, mode: str, path: str, app: str, ports: list[int], r: int) -> None:
    before = cpu_by_process()
    answers, ids, seconds = asyncio.run(phase(ports, app, n, args.tokens, mode == "stream", args.phase_timeout,
                                              args.ramp_s))
    cpu = cpu_by_role(before, cpu_by_process(), app)
    bad = [a for a in answers if a.error or a.status != 200 or a.tokens != args.tokens]
    if bad:
        raise RuntimeError(f"{app} {mode} N={n}: {len(bad)} bad answers, first: "
                           f"{bad[0].status} {bad[0].error} {bad[0].tokens} tokens")
    row = rows.setdefault((speed, n, mode, path, app), Row(speed, n, mode, path, app,
                                                           idle_cpu_per_s=IDLE_CPU_PER_S.get((speed, app), 0.0)))
    row.add(answers, seconds, cpu)
    if mode == "stream":
        row.ttft_out_ms += ttft_out_ms(answers, ids, replica_timings(app, args.stream_replicas))
    print(f"round {r + 1} speed {speed:3s} N={n:3d} {mode:6s} {path:6s} {app:14s} {row.tokens_per_s[-1]:8.0f} tok/s"
          f"  CPU/token " + " ".join(f"{k} {v[-1]:.3f}" for k, v in row.cpu_ms.items()) + " ms", flush=True)


def replica_timings(app: str, num_replicas: int) -> dict[str, float]:
    """Request id -> wall time its replica got the first token, from every LLMReplica of ``app`` (asked
    through the deployment handle until every replica answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMReplica", app)
    seen: set[str] = set()
    out: dict[str, float] = {}
    for _ in range(40 * num_replicas):
        answer = handle.stream_timings.remote().result(timeout_s=30)
        seen.add(answer["replica"])
        out.update(answer["first_token"])
        if len(seen) >= num_replicas:
            break
    return out


def front() -> str:
    """What the ``proxy`` path goes through on this cluster (deploy/ray_env.py)."""
    if ray_env.haproxy_on(os.environ):
        return "front: HAProxy (direct ingress behind it)"
    hop = "gRPC" if os.environ.get("RAY_SERVE_PROXY_USE_GRPC") == "1" else "Ray actor calls"
    return f"front: Serve's proxy, to the ingress over {hop}"


def report(rows: dict) -> None:
    print(f"\nmedians over rounds; CPU in ms per output token (server processes of this Ray cluster); {front()}")
    print(f"{'speed':>5s} {'N':>4s} {'mode':6s} {'path':6s} {'app':14s} {'tok/s':>8s} "
          + " ".join(f"{r:>10s}" for r in ROLES) + f" {'marginal':>9s} {'TTFT-out p50/p90 ms':>20s}")
    for key in sorted(rows, key=lambda k: (k[0] != "1", k[1], k[2] != "stream", k[3], k[4])):
        row = rows[key]
        cells = " ".join(f"{statistics.median(row.cpu_ms[r]):10.3f}" for r in ROLES)
        ttft = (f"{percentile(row.ttft_out_ms, 0.5):8.2f} / {percentile(row.ttft_out_ms, 0.9):7.2f}"
                if row.ttft_out_ms else "")
        print(f"{row.speed:>5s} {row.streams:4d} {row.mode:6s} {row.path:6s} {row.app:14s} "
              f"{statistics.median(row.tokens_per_s):8.0f} {cells} {statistics.median(row.marginal_ms):9.3f} "
              f"{ttft:>20s}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench stream")
    g.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128],
                   help="concurrent streams per phase, comma-separated (default 32,128)")
    g.add_argument("--tokens", type=int, default=500, help="output tokens per request (default 500)")
    g.add_argument("--stream-rounds", type=int, default=3)
    g.add_argument("--speeds", default="1,inf", help="simulated replica speed-ups, comma-separated")
    g.add_argument("--stream-replicas", type=int, default=4, help="LLMReplica replicas per app (default 4)")
    g.add_argument("--ingress-replicas", type=int, default=1)
    g.add_argument("--stream-interval-ms", type=float, default=None, help="default: the app's default")
    g.add_argument("--apps", type=lambda s: [a for a in s.split(",") if a], default="halffull,default",
                   help=f"comma-separated, of {', '.join(APPS)}")
    g.add_argument("--ramp-s", type=float, default=1.0,
                   help="the N requests of a phase start evenly over this many seconds (0: all at once)")
    g.add_argument("--paths", default="proxy,direct",
                   help="proxy: through Serve's HTTP proxy; direct: to the ingress replicas' own HTTP servers "
                        "(Ray's direct ingress, enabled for this cluster when listed)")
    g.add_argument("--no-token-channel", action="store_true", help="tokens as Serve stream items (app option)")
    g.add_argument("--stream-phase-timeout", dest="phase_timeout", type=float, default=300.0)


def cmd_bench(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.apps) - set(APPS))
    if unknown:
        print(f"halffull bench stream: unknown app(s) {', '.join(unknown)}; known: {', '.join(APPS)}",
              file=sys.stderr)
        return 2
    ray_env.apply()  # loopback listeners (DESIGN.md §9), the gRPC proxy hop (deploy/ray_env.py)
    if "direct" in args.paths.split(","):
        # Read by every Serve process when it starts: the ingress replicas also serve HTTP on their own
        # 127.0.0.1 port (the front keeps serving too), even where RAY_SERVE_ENABLE_DIRECT_INGRESS=0 is exported.
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    rows: dict = {}
    try:
        port = ray_env.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for speed in args.speeds.split(","):
            run_speed(args, speed, port, rows)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    report(rows)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
