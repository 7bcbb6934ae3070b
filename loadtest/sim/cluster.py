"""Offline cluster simulator: N simulated replicas on one virtual clock, routed by the very policy objects the
Ray Serve router runs.

Events, in time order (ties: stats refresh, then completions, then the arrival):

* stats refresh every ``stats_period_s``: each replica publishes ``engine_stats`` plus its received-requests
  feed (``num_received``, ``recent_prefix_hashes``: router/feed.py), as ``record_routing_stats`` does in
  Serve; routers only ever see the latest *delivered* dict, so their view is stale by up to one period plus
  the delivery delay. ``stats_period_s = 0`` gives routers exact, current stats (perfect information).
* stats delivery, ``stats_delay_s`` after a refresh: what crosses processes live (the controller's poll of
  ``record_routing_stats`` and its long-poll broadcast to every router) reaches routers that much later.
  Routers learn each new publication once (``on_stats``: published prefix hashes; the traffic share).
  Default 0.11 s, MEASURED on the live Serve path (Ray 2.60, this repo's app, 1 ingress replica, 2 simulated
  replicas at speedup 4, period 0.5 s, ~38 requests/s over HTTP for 30 s; ``tests/test_router_delivery_delay.py``):
  the router in the ingress replica records ``time.time() - stats_time`` of every new publication in
  ``update_replicas`` (``HalffullRequestRouter.delivery_delays``; ``stats_time`` is ``time.time()`` in
  ``LLMReplica.record_routing_stats``, one clock on one host) and logs them; over 115 publications: min 0.104,
  median 0.110, mean 0.114, p90 0.120, p95 0.128, max 0.363 s. The median (0.11 s ~ the controller's 0.1 s
  loop, which collects the finished poll and broadcasts it, plus the long poll) is the default: the delay is
  nearly constant (p90 only 10 ms above it), the simulator models one constant delay, and the rare 0.36 s
  outlier (a busy controller loop) would overstate every other delivery if taken as the constant.
* peer bookings, ``peer_delay_s`` after a routing decision: with ``num_routers`` > 1 and a policy that shares
  bookings (``peer_bookings``, router/peers.py), the deciding router's booking reaches every other router
  that much later, as the live ingress replicas send them (deploy/peer_link.py). Default
  ``PEER_DELAY_S``, MEASURED on the live Serve path (see its comment).
* arrival: every replica runs up to the arrival time; completions reach the router that routed them
  (``on_finished`` + local accounting); the arrival's router (round-robin over ``num_routers`` routers, each
  with its own policy state, RNG and accounting, as Serve runs one router per proxy/ingress process) builds
  snapshots, calls ``policy.choose`` and sends the request to the first tier.

Everything is deterministic for a seed: no wall clock, no global RNG, ordered containers only.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from halffull.loadtest.sim.metrics import RequestRecord, Slo, summarize
from halffull.loadtest.sim.traces import Trace, TraceRequest, load_trace
from halffull.replicas.engine.policies import make_engine_policy
from halffull.replicas.engine.request import Request, hash_trace_blocks
from halffull.replicas.engine.scheduler import Scheduler, SchedulerConfig
from halffull.replicas.sim.latency import LatencyModel
from halffull.replicas.sim.profile_model import check_step_model, latency_model
from halffull.replicas.sim.virtual import SimReplica
from halffull.router.accounting import RouterAccounting, routed_estimates
from halffull.router.estimate import OutputLengthEstimator
from halffull.router.feed import ReceivedFeed
from halffull.router import peers
from halffull.router.registry import make_policy
from halffull.router.types import Completion, RequestView


STATS_DELAY_S = 0.11  # live delivery delay, measured median (module docstring)
# Live lag of a peer booking, measured median: from a router's decision (``routed_time``) to the booking reaching
# another ingress replica's process (the kernel's receive time of its UDP datagram, deploy/peer_link.py), from when
# every decision there sees it (each router polls the link's socket before it decides).
# tests/test_router_delivery_delay.py (Ray 2.60, this repo's app, 4 ingress replicas, 2 simulated replicas at
# speedup 4, ~40-47 requests/s over HTTP for 30 s on the 2-core host; every router logs the lags it applies), three
# runs of ~1,550 logged bookings: min 0.20 ms, median 0.40 / 0.40 / 0.30, p90 1.6 / 1.5 / 1.0, max 10.9 / 9.2 /
# 6.2 ms. (With a receiver thread handing each datagram to the router's loop instead, the same test gave a median
# of 1.2-1.8 ms; with a Serve broadcast per batch, 10.0 ms.)
PEER_DELAY_S = 0.0004


@dataclass(frozen=True)
class ClusterConfig:
    """One simulated fleet. Every field is a CLI flag of ``halffull simulate``."""

    num_replicas: int = 4
    router: str = "sal"
    router_params: dict = field(default_factory=dict)
    engine_policy: str = "fcfs"
    engine_params: dict = field(default_factory=dict)
    gpu: str = "h100"
    model: str = "llama3-8b"
    tp: int | None = None
    block_size: int = 16
    num_blocks: int | None = None  # None: from the latency model's KV capacity
    max_num_batched_tokens: int | None = None  # None: vLLM's default for the GPU (vllm_engine_defaults)
    max_num_seqs: int | None = None
    stats_period_s: float = 0.5
    stats_delay_s: float = STATS_DELAY_S
    num_routers: int = 1
    peer_delay_s: float = PEER_DELAY_S
    prefix_block_size: int = 512  # router-side prefix hash granularity (the trace's block size)
    seed: int = 0
    jump: bool = True
    step_model: str = "calibrated"  # profile_model.STEP_MODELS: "roofline" = the step model before calibration

    def __post_init__(self):
        check_step_model(self.step_model)
        if self.num_replicas < 1 or self.num_routers < 1:
            raise ValueError("num_replicas and num_routers must be >= 1")
        if self.stats_period_s < 0 or self.stats_delay_s < 0 or self.peer_delay_s < 0:
            raise ValueError("stats_period_s, stats_delay_s and peer_delay_s must be >= 0")


@dataclass
class SimResult:
    config: ClusterConfig
    summary: dict[str, Any]
    records: list[RequestRecord]
    per_replica: list[dict[str, Any]]
    sim_wall_s: float


def vllm_engine_defaults(latency: LatencyModel) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) that vLLM's OpenAI server picks for this GPU.

    From vLLM's EngineArgs (vllm/engine/arg_utils.py, 0.32): >= 160 GiB: 16384 / 1024; >= 70 GiB and not
    an A100: 8192 / 1024; otherwise 2048 / 256.
    """
    gib = latency.gpu.memory_bytes / 2**30
    if gib >= 160:
        return 16384, 1024
    if gib >= 70 and "a100" not in latency.gpu.name.lower():
        return 8192, 1024
    return 2048, 256


_new_view = tuple.__new__  # RequestView positionally, without the named tuple's Python-level __new__


class _Router:
    def __init__(self, cfg: ClusterConfig, index: int):
        self.policy = make_policy(cfg.router, cfg.router_params)
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.accounting = RouterAccounting()
        self.expected_decode, self.uncached_prompt = routed_estimates(self.policy)
        self.shares = cfg.num_routers > 1 and peers.shares_bookings(self.policy)


class ClusterSim:
    def __init__(self, cfg: ClusterConfig, *, slo: Slo = Slo()):
        self.cfg = cfg
        self.slo = slo
        self.latency = latency_model(cfg.gpu, cfg.model, cfg.tp, step_model=cfg.step_model)
        num_blocks = cfg.num_blocks or self.latency.num_kv_blocks(cfg.block_size)
        default_tokens, default_seqs = vllm_engine_defaults(self.latency)
        self.sched_config = SchedulerConfig(
            num_blocks=num_blocks, block_size=cfg.block_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens or default_tokens,
            max_num_seqs=cfg.max_num_seqs or default_seqs, max_model_len=self.latency.model.max_model_len,
        )
        self.replicas = [
            SimReplica(f"replica-{i}", Scheduler(self.sched_config, make_engine_policy(cfg.engine_policy, cfg.engine_params)),
                       self.latency, jump=cfg.jump)
            for i in range(cfg.num_replicas)
        ]
        self.by_id = {r.replica_id: r for r in self.replicas}
        self.estimators = {r.replica_id: OutputLengthEstimator() for r in self.replicas}
        self.routers = [_Router(cfg, i) for i in range(cfg.num_routers)]
        self.feeds = {r.replica_id: ReceivedFeed() for r in self.replicas}
        # (replica id, its last delivered stats) per replica, in replica order: what routers snapshot
        self.published: list[tuple[str, dict | None]] = [(r.replica_id, None) for r in self.replicas]
        self.in_transit: deque[tuple[float, list[tuple[str, dict]]]] = deque()  # (delivery time, publication)
        self.peer_transit: deque[tuple[float, int, tuple]] = deque()  # (delivery time, sender, booking)
        self.owner: dict[str, _Router] = {}  # request id -> router that routed it
        self.records: dict[str, RequestRecord] = {}
        self.num_rejected = 0

    # ---- building blocks -----------------------------------------------------------------------------
    def make_request(self, tr: TraceRequest) -> Request:
        hashes = hash_trace_blocks(tr.hash_ids, tr.num_prompt_tokens, self.cfg.block_size) if tr.hash_ids else ()
        return Request(tr.request_id, tr.num_prompt_tokens, tr.num_output_tokens, tr.arrival_s,
                       priority=tr.priority, block_hashes=hashes)

    def request_view(self, tr: TraceRequest) -> RequestView:
        return _new_view(RequestView, (tr.request_id, tr.num_prompt_tokens, tr.num_output_tokens, tr.arrival_s,
                                       tuple(tr.hash_ids), self.cfg.prefix_block_size))

    def publish(self, now: float) -> None:
        """Every replica's stats as of ``now``; the replicas have been advanced to ``now`` (advance_all).
        Routers see them ``stats_delay_s`` later (``deliver``), at once with perfect information."""
        estimators, feeds = self.estimators, self.feeds
        published = []
        for rep in self.replicas:
            stats = rep.stats(now, estimators[rep.replica_id])
            stats.update(feeds[rep.replica_id].publish(now))
            published.append((rep.replica_id, stats))
        if self.cfg.stats_delay_s == 0 or self.cfg.stats_period_s == 0:
            self.published = published
        else:
            self.in_transit.append((now + self.cfg.stats_delay_s, published))

    def deliver(self, t: float) -> None:
        """Hand routers every publication due by ``t`` (the newest wins)."""
        transit = self.in_transit
        while transit and transit[0][0] <= t:
            self.published = transit.popleft()[1]

    def deliver_peers(self, t: float) -> None:
        """Hand every booking due by ``t`` to the routers other than its sender that share bookings."""
        transit, routers = self.peer_transit, self.routers
        while transit and transit[0][0] <= t:
            due, sender, b = transit.popleft()
            for j, other in enumerate(routers):
                if j != sender and other.shares:
                    peers.apply((b,), other.accounting, other.policy, due)

    def advance_all(self, t: float) -> None:
        for rep in self.replicas:
            run = rep.pending
            if run is not None and run.last_start >= t - rep.clock:
                continue  # advance_to's own early out, without the call: most replicas are inside a run
            for req in rep.advance_to(t):
                self._complete(rep.replica_id, req)

    def _complete(self, replica_id: str, req: Request) -> None:
        self.estimators[replica_id].observe(req.num_output_tokens)
        rec = self.records[req.request_id]
        rec.first_token_s, rec.finish_s = req.first_token_time, req.finish_time
        rec.num_output_tokens, rec.num_preemptions = req.num_output_tokens, req.num_preemptions
        rec.num_cached_prompt_tokens = req.num_cached_tokens if req.num_cached_tokens > 0 else 0
        router = self.owner.pop(req.request_id)
        router.accounting.on_finished(req.request_id)
        router.policy.on_finished(Completion(req.request_id, replica_id, req.num_prompt_tokens,
                                             req.num_output_tokens, req.finish_time or 0.0))

    def route(self, tr: TraceRequest, index: int) -> str:
        sender = index % len(self.routers)
        router = self.routers[sender]
        t = tr.arrival_s
        if self.cfg.stats_period_s == 0:
            self.publish(t)
        else:
            self.deliver(t)
        if self.peer_transit:
            self.deliver_peers(t)
        view = self.request_view(tr)
        snapshots = router.accounting.snapshots(self.published, router.policy.on_stats)
        tiers = router.policy.choose(view, snapshots, now=t, rng=router.rng)
        replica_id = tiers[0][0] if tiers and tiers[0] else self.replicas[0].replica_id
        self.feeds[replica_id].on_received(view.prefix_hashes, t)
        prompt_tokens = router.uncached_prompt(view, replica_id)
        router.policy.on_routed(view, replica_id, now=t)
        decode_tokens = router.expected_decode(view)
        router.accounting.on_routed(tr.request_id, replica_id, now=t, prompt_tokens=prompt_tokens,
                                    decode_tokens=decode_tokens)
        if router.shares:
            self.peer_transit.append((t + self.cfg.peer_delay_s, sender,
                                      peers.booking(replica_id, t, prompt_tokens, decode_tokens, view.prefix_hashes)))
        self.owner[tr.request_id] = router
        return replica_id

    # ---- the run -------------------------------------------------------------------------------------
    def run(self, trace: Sequence[TraceRequest], progress: Callable[[int, int], None] | None = None) -> SimResult:
        with _gc_paused():
            return self._run(trace, progress)

    def _run(self, trace: Sequence[TraceRequest], progress: Callable[[int, int], None] | None) -> SimResult:
        start = time.perf_counter()
        period = self.cfg.stats_period_s
        self.publish(0.0)
        next_refresh = period if period > 0 else math.inf
        for i, tr in enumerate(trace):
            t = tr.arrival_s
            while next_refresh <= t:
                self.advance_all(next_refresh)
                self.publish(next_refresh)
                next_refresh += period
            self.advance_all(t)
            self._admit(tr, i)
            if progress is not None and i % 1000 == 0:
                progress(i, len(trace))
        self.advance_all(math.inf)
        wall = time.perf_counter() - start
        records = list(self.records.values())
        summary = summarize(records, slo=self.slo)
        summary["rejected"] = self.num_rejected
        summary["clipped"] = getattr(trace, "num_clipped", 0)
        summary["sim_wall_s"] = wall
        summary["sim_requests_per_s"] = len(records) / wall if wall > 0 else 0.0
        return SimResult(self.cfg, summary, records, self._per_replica(), wall)

    def _admit(self, tr: TraceRequest, index: int) -> None:
        rec = RequestRecord(tr.request_id, tr.arrival_s, None, None, tr.num_prompt_tokens, 0)
        self.records[tr.request_id] = rec
        request = self.make_request(tr)
        replica_id = self.route(tr, index)
        rec.replica = replica_id
        try:
            for done in self.by_id[replica_id].add_request(request, tr.arrival_s):
                self._complete(replica_id, done)
        except ValueError as exc:  # too long for the model: the server would answer 400
            rec.error = str(exc)
            self.num_rejected += 1
            router = self.owner.pop(tr.request_id)
            router.accounting.on_finished(tr.request_id)

    def _per_replica(self) -> list[dict[str, Any]]:
        counts: dict[str, int] = {}
        for rec in self.records.values():
            counts[rec.replica] = counts.get(rec.replica, 0) + 1
        return [
            {"replica": r.replica_id, "requests": counts.get(r.replica_id, 0), "busy_s": r.busy_time,
             "steps": r.scheduler.num_steps, "preemptions": r.scheduler.num_preemptions}
            for r in self.replicas
        ]


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off for a run, back on (if it was) afterwards.

    Why: a run builds hundreds of thousands of short-lived containers (snapshots, ranking keys, block lists,
    requests) but no reference cycles (``gc.collect()`` after a run finds nothing: sal, prefix_aware, fcfs,
    larry, several routers; tests/test_cluster_sim.py), so the collector's passes over them find nothing and
    cost ~1.7% of ``halffull bench sim``'s instructions (cachegrind). Reference counting frees everything as
    before; a cycle that did form would wait for the first collection after the run.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_trace_for(cfg: ClusterConfig, name_or_path: str, **kw) -> Trace:
    """A trace fitted to the model's context window.

    Requests longer than ``max_model_len`` (half of Mooncake's prompts exceed Llama-3's 8k) are clipped, not
    dropped, keeping the arrival process and the leading prefix blocks; ``Trace.num_clipped`` counts them and
    the summary reports it.
    """
    context = latency_model(cfg.gpu, cfg.model, cfg.tp).model.max_model_len
    return load_trace(name_or_path, max_total_tokens=context, **kw)


def simulate(trace: Iterable[TraceRequest], cfg: ClusterConfig, **kw) -> SimResult:
    return ClusterSim(cfg, **kw).run(trace if isinstance(trace, list) else list(trace))


def config_dict(cfg: ClusterConfig) -> dict[str, Any]:
    return asdict(cfg)
