"""The Ray Serve adapter: halffull's routing policies as a Ray Serve ``RequestRouter`` (Ray 2.60, alpha API).

This is the only module that imports Ray's request-router API. It is thin: convert, call the policy, convert
back::

    pending_request.kwargs["routing"]  ->  RequestView        (request_view)
    replica.routing_stats + local view ->  ReplicaSnapshot    (RouterAccounting.snapshots)
    policy.choose(view, snapshots, now=time.time(), rng)  ->  ranked singleton tiers of RunningReplica

How the request reaches the router. The ingress (deploy/app.py) tokenizes once and calls the replica with a
keyword argument ``routing`` built by ``routing_kwarg``::

    handle.options(stream=True).generate.remote(request, routing={
        "request_id": "cmpl-...", "num_prompt_tokens": 812, "max_tokens": 128,
        "prefix_hashes": [h0, h1, ...],   # halffull.prefix_hash.hash_token_blocks(prompt ids, block size)
        "prefix_block_size": 64,
    })

Ray resolves the call's arguments before routing, so ``choose_replicas`` reads them from
``pending_request.kwargs``. A call without ``routing`` (any other method) is routed as a one-token request.

Lifecycle hooks (verified in ray/serve/_private/router.py, 2.60):
  * ``choose_replicas`` *reserves* its first choice: ``policy.on_routed`` and ``RouterAccounting.on_routed``
    run at once, as in the simulator, with the prompt tokens the policy expects to compute there (sal: net of
    its prefix credit, ``uncached_prompt_tokens``; the simulator records the same). Why: Ray calls
    ``on_request_routed`` only after the replica accepted (a round trip later), and requests arriving
    together would otherwise all be ranked on the same state and herd onto one replica (round_robin sent four
    in a row to one replica under a burst). A request ranked again (every replica rejected it) first releases
    its reservation; one never routed releases it after ``RESERVATION_TTL_S``. (A booking sent to the peers
    for a reservation that is released stays with them until the stats pass it: a hint, as every booking.)
  * ``on_request_routed(pending_request, replica_id, result)``: called once the replica *accepted* the request
    (rejection protocol). The reservation becomes the routed request; if Ray used another replica than the
    reserved one, the accounting moves there and the policy hears ``on_routed`` for the replica actually used
    (a policy's own side effects of the reservation, e.g. a prefix-index entry, stay: a harmless hint).
  * ``on_request_completed(replica_id, internal_request_id)``: called when the result finishes, fails or is
    cancelled — also for attempts a replica rejected, so it is ignored unless the request was routed to that
    replica. -> ``RouterAccounting.on_finished``; ``policy.on_finished`` once the output token count is
    known. The router never sees the token stream: the ingress reports the count through
    ``halffull.router.completions.report_completion(request_id, num_output_tokens)`` (same process: the router
    lives in the process that holds the handle; that module says why the shared state cannot live here).
    Whichever of the two arrives second calls ``policy.on_finished``; a completion whose count has not arrived
    ``COMPLETION_GRACE_S`` later is dropped from the policy's view (a request the client abandoned), since an
    invented count would bias the output-length estimate.
  * ``on_replica_actor_died`` / ``update_replicas``: replicas that left -> ``policy.on_replica_removed`` and
    ``RouterAccounting.on_replica_removed``. ``update_replicas`` runs on every broadcast of the controller
    (which carries the replicas' latest routing stats): it records each new publication's delivery delay,
    ``time.time() - stats_time`` (``delivery_delays``, bounded), which sets the simulator's ``stats_delay_s``.

Many routers (one per ingress replica, DESIGN.md §3). Two things cross between them:
  * the replicas' published stats, every period: new publications reach ``policy.on_stats`` (merging the
    ``recent_prefix_hashes`` every replica publishes, router/feed.py) and the accounting's traffic share
    (``num_received``, router/share.py), both through ``RouterAccounting.snapshots``;
  * peer bookings (router/peers.py), for a policy whose params say ``peer_bookings``: every request this router
    books (``_book``) is posted to the ingress's link (deploy/peer_link.py: UDP to every other ingress
    replica), and what the peers' routers booked is taken before each decision (``peers.poll``: the link's
    socket; ``_peer_bookings`` queues each batch with its arrival time, bounded) and applied then
    (``_apply_peers``): their sends count in the deltas until the stats include them, and their lag (from the
    peer's decision to the datagram reaching this process) feeds the in-transit estimate. The lags are logged
    with the delivery delays ("peer bookings applied N (total T): lag median ...").
A router whose peers die or fall silent sees its traffic share drop and falls back to scaling what it knows;
nothing between routers is ever awaited on the request path, so nothing there can fail or hang a request.
(A request ranked again after a rejection counts as sent twice in the share estimate: a small bias toward a
larger share.)

No ``FIFOMixin``: with it, a replica found for one request is handed to the *oldest* pending request, so a
decision made for this request's tokens and prefix would serve another. Without it Ray matches the chosen
replica to the request it was chosen for (by internal request id).

Failure rule: an exception inside ``choose_replicas`` would hang the request (Ray retries forever), so any
exception in conversion or policy is logged (rate-limited) and the candidates are returned in the given
order. Every return also sets ``routing_context.should_backoff``: without it Ray re-calls ``choose_replicas``
in a tight loop while every replica rejects (queues full).

Stats trust: a replica's published stats are used only if ``halffull.router.accounting.parse_stats`` accepts them
(every field present, numeric, finite, in range) and their ``stats_time`` is within ``max_stats_age_s`` of
this router's clock (either way: a replica that stopped publishing, or a skewed clock). Anything else makes the
replica's snapshot ``stats_known=False`` — the policies rank it by request counts, after replicas with known
stats — and never raises.

Configuration (``request_router_kwargs`` -> ``initialize_state``):
  policy          str, default "sal"   a name from halffull.router.registry.POLICY_NAMES
  policy_params   dict, default {}     that policy's params (unknown keys fail at startup)
  seed            int | None           RNG seed; mixed with this router's actor id so routers in different
                                       processes draw differently. None: OS entropy.
  max_stats_age_s float | None, 10.0   stats older (or further in the future) than this are unknown; None: any
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from halffull.prefix_hash import hash_token_blocks
from halffull.router import completions, peers
from halffull.router.accounting import RouterAccounting, routed_estimates
from halffull.router.registry import make_policy
from halffull.router.types import Completion, RequestView

logger = logging.getLogger("ray.serve")

ROUTING_KWARG = "routing"
COMPLETION_GRACE_S = 5.0
RESERVATION_TTL_S = 30.0  # a reservation whose request was neither routed nor ranked again is released
MAX_STATS_AGE_S = 10.0
_MAX_DELAYS = 4096
MAX_PEER_BATCHES = 1024  # peers' batches queued for the next decision; the oldest dropped beyond
# Every this many seconds (at most) a router logs the delivery delays of the publications it saw since its last
# such line, and how many output counts reached its policy: "halffull router: stats delivery delay ..." (tests
# read them; HALFFULL_DELAY_LOG_EVERY_S, read when a router is made, lets them log often). Not read into a module
# global: Ray pickles this module by value, so a global would hold the value of the process that built the app.
DELAY_LOG_ENV = "HALFFULL_DELAY_LOG_EVERY_S"
DELAY_LOG_EVERY_S = 60.0
_DELAY_LOG_SAMPLE = 64  # delays listed per line (the most recent), in ms
_LOG_EVERY_S = 10.0


# ---- what the ingress sends ----------------------------------------------------------------------------
def routing_kwarg(
    request_id: str, prompt_token_ids: Sequence[int], max_tokens: int, *, prefix_block_size: int
) -> dict[str, Any]:
    """The ``routing`` keyword argument for one request (computed once, at the ingress)."""
    return {
        "request_id": request_id,
        "num_prompt_tokens": len(prompt_token_ids),
        "max_tokens": max_tokens,
        "prefix_hashes": hash_token_blocks(prompt_token_ids, prefix_block_size),
        "prefix_block_size": prefix_block_size,
    }


def request_view(pending_request: Optional[PendingRequest], now: float) -> RequestView:
    """The policy's view of a pending request (see the module docstring); ValueError if malformed."""
    routing = pending_request.kwargs.get(ROUTING_KWARG) if pending_request is not None else None
    if routing is None:
        rid = pending_request.metadata.internal_request_id if pending_request is not None else ""
        return RequestView(request_id=rid, num_prompt_tokens=1, max_tokens=1, arrival_time=now)
    if not isinstance(routing, Mapping):
        raise ValueError(f"routing must be a mapping, got {type(routing).__name__}")
    num_prompt, max_tokens = routing["num_prompt_tokens"], routing["max_tokens"]
    block = routing.get("prefix_block_size", 64)
    for key, value in (("num_prompt_tokens", num_prompt), ("max_tokens", max_tokens), ("prefix_block_size", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"routing[{key!r}] must be a positive int, got {value!r}")
    return RequestView(
        request_id=str(routing.get("request_id", "")),
        num_prompt_tokens=num_prompt,
        max_tokens=max_tokens,
        arrival_time=pending_request.created_at,
        prefix_hashes=tuple(routing.get("prefix_hashes", ())),
        prefix_block_size=block,
    )


def _trusted(stats: Any, now: float, max_age_s: float | None) -> Any:
    """``stats``, or None when they are too old or too far ahead of ``now`` (field checks: parse_stats)."""
    if max_age_s is None or not isinstance(stats, Mapping):
        return stats
    published = stats.get("stats_time")
    if isinstance(published, (int, float)) and not isinstance(published, bool):
        try:
            if abs(now - published) > max_age_s:
                return None
        except OverflowError:  # an int beyond float range
            return None
    return stats


@dataclass(slots=True)
class _InFlight:
    replica_id: str
    request_id: str
    num_prompt_tokens: int


@dataclass(slots=True)
class _Reserved:
    replica_id: str
    at: float


@dataclass(slots=True)
class _Awaiting:
    replica_id: str
    num_prompt_tokens: int
    finish_time: float


class HalffullRequestRouter(RequestRouter):
    """Routes with a halffull policy (``policy`` in ``request_router_kwargs``); see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._self_actor_id = kwargs.get("self_actor_id") or ""
        self._setup("sal", None, None)
        self._max_stats_age_s: float | None = MAX_STATS_AGE_S
        self._last_error_log = -_LOG_EVERY_S
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop routing runs on (set on first call)
        completions.register(self)
        peers.register(self)

    def initialize_state(self, policy: str = "sal", policy_params: Mapping[str, Any] | None = None,
                         seed: int | None = None, max_stats_age_s: float | None = MAX_STATS_AGE_S,
                         **unknown: Any) -> None:
        if unknown:
            raise ValueError(f"unknown request_router_kwargs {sorted(unknown)}; valid: policy, policy_params, seed, "
                             "max_stats_age_s")
        if max_stats_age_s is not None and (isinstance(max_stats_age_s, bool) or not isinstance(
                max_stats_age_s, (int, float)) or not max_stats_age_s > 0):
            raise ValueError(f"max_stats_age_s must be a number > 0 or None, got {max_stats_age_s!r}")
        self._setup(policy, policy_params, seed)
        self._max_stats_age_s = max_stats_age_s
        logger.info("halffull router: policy %s params %s", policy, dict(policy_params or {}))

    def _setup(self, policy: str, policy_params: Mapping[str, Any] | None, seed: int | None) -> None:
        self.policy = make_policy(policy, policy_params)
        self._rng = random.Random(None if seed is None else f"{seed}/{self._self_actor_id}")
        self.accounting = RouterAccounting()
        # what this router records for a request it routes (net of sal's prefix credit, as in the simulator)
        self._expected_decode, self._uncached = routed_estimates(self.policy)
        self._inflight: dict[str, _InFlight] = {}  # internal request id -> where it went
        self._reserved: dict[str, _Reserved] = {}  # internal request id -> first choice, not yet accepted
        self._awaiting: dict[str, _Awaiting] = {}  # request id -> completed, output count not yet reported
        self._replica_ids: set[str] = set()
        self._on_stats = getattr(self.policy, "on_stats", None)  # optional for a policy from elsewhere
        self._stats_seen: dict[str, float] = {}  # replica -> stats_time of its last publication seen
        self.delivery_delays: deque[float] = deque(maxlen=_MAX_DELAYS)  # seconds, newest last
        self._delays_logged = 0  # delivery_delays appended as of the last log line (a running count)
        self._delays_seen = 0
        self._last_delay_log = time.monotonic()
        self._delay_log_every_s = float(os.environ.get(DELAY_LOG_ENV, DELAY_LOG_EVERY_S))
        self.counts_observed = 0  # completions whose output count reached the policy
        self._shares = peers.shares_bookings(self.policy)  # broadcast bookings and take the peers' (router/peers.py)
        self.peer_lags: deque[float] = deque(maxlen=_MAX_DELAYS)  # seconds from a peer's decision to its arrival
        self._peer_inbox: deque[tuple[list, float]] = deque(maxlen=MAX_PEER_BATCHES)  # (batch, arrived), any thread
        self.peer_bookings_applied = 0
        self._peer_lags_logged = 0

    # ---- routing ---------------------------------------------------------------------------------------
    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        self._loop = asyncio.get_running_loop()
        if pending_request is not None:
            # Retry with backoff when every tier rejected (otherwise Ray loops without sleeping).
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        try:
            return self._rank(candidate_replicas, pending_request)
        except Exception:
            self._log_error("halffull router: policy failed; falling back to the candidates in given order")
            return [[r] for r in candidate_replicas]

    def _rank(self, candidates: Sequence[RunningReplica], pending_request: Optional[PendingRequest]):
        if self._shares:
            self._take_peer_bookings()
        now = time.time()
        view = request_view(pending_request, now)
        internal_id = pending_request.metadata.internal_request_id if pending_request is not None else ""
        if self._reserved:
            self._release(internal_id)  # ranked again: its last choice rejected it
            self._expire_reservations(now)
        by_id = {r.replica_id.unique_id: r for r in candidates}
        # (RouterAccounting reuses a replica's snapshot while its stats object and this router's accounting
        # for it are unchanged.)
        max_age = self._max_stats_age_s
        snapshots = self.accounting.snapshots(
            [(rid, _trusted(r.routing_stats, now, max_age)) for rid, r in by_id.items()], self._on_stats)
        tiers = self.policy.choose(view, snapshots, now=now, rng=self._rng)
        ranked, seen = [], set()
        for tier in tiers:
            if len(tier) == 1:  # the policies' contract: singleton tiers (fast path)
                rid = tier[0]
                replica = by_id.get(rid)
                if replica is not None and rid not in seen:
                    seen.add(rid)
                    ranked.append([replica])
                continue
            replicas = [by_id[rid] for rid in tier if rid in by_id and rid not in seen]
            seen.update(tier)
            if replicas:
                ranked.append(replicas)
        if len(seen) < len(by_id):  # a policy that left candidates out: keep them reachable, last
            ranked.append([r for rid, r in by_id.items() if rid not in seen])
        if internal_id and ranked:
            try:
                self._reserve(internal_id, view, ranked[0][0].replica_id.unique_id, now)
            except Exception:  # the ranking stands; on_request_routed accounts for the request instead
                self._reserved.pop(internal_id, None)
                self._log_error("halffull router: reserving the first choice failed")
        return ranked

    def _reserve(self, internal_id: str, view: RequestView, replica_id: str, now: float) -> None:
        self._book(internal_id, view, replica_id, now)
        self._reserved[internal_id] = _Reserved(replica_id, now)

    def _book(self, internal_id: str, view: RequestView, replica_id: str, now: float) -> None:
        """Account for a request sent to ``replica_id``, in the policy, the accounting and the peers' view."""
        prompt = self._uncached(view, replica_id)  # (before on_routed, which inserts the request's own prefix)
        decode = self._expected_decode(view)
        self.policy.on_routed(view, replica_id, now=now)
        self.accounting.on_routed(internal_id, replica_id, now=now, prompt_tokens=prompt, decode_tokens=decode)
        if self._shares:
            peers.post(peers.booking(replica_id, now, prompt, decode, view.prefix_hashes))

    def _release(self, internal_id: str) -> Optional[_Reserved]:
        reserved = self._reserved.pop(internal_id, None)
        if reserved is not None:
            self.accounting.on_finished(internal_id)
        return reserved

    def _expire_reservations(self, now: float) -> None:
        stale = [k for k, v in self._reserved.items() if now - v.at > RESERVATION_TTL_S]
        for internal_id in stale:
            self._release(internal_id)

    # ---- lifecycle hooks -------------------------------------------------------------------------------
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        try:
            now = time.time()
            view = request_view(pending_request, now)
            rid = replica_id.unique_id
            internal_id = pending_request.metadata.internal_request_id
            reserved = self._reserved.get(internal_id)
            if reserved is None or reserved.replica_id != rid:
                self._release(internal_id)  # Ray used another tier: the accounting moves there
                self._book(internal_id, view, rid, now)
            self._reserved.pop(internal_id, None)
            self._inflight[internal_id] = _InFlight(rid, view.request_id or internal_id, view.num_prompt_tokens)
        except Exception:
            self._log_error("halffull router: on_request_routed failed")

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        try:
            entry = self._inflight.get(internal_request_id)
            if entry is None or entry.replica_id != replica_id.unique_id:
                return  # a rejected attempt, or a request this router did not route
            del self._inflight[internal_request_id]
            self.accounting.on_finished(internal_request_id)
            count = completions.take_note(entry.request_id)
            if count is not None:
                self._finish(entry.request_id, entry.replica_id, entry.num_prompt_tokens, count, time.time())
                return
            self._awaiting[entry.request_id] = _Awaiting(entry.replica_id, entry.num_prompt_tokens, time.time())
            self._expire_awaiting()
        except Exception:
            self._log_error("halffull router: on_request_completed failed")

    def _note_arrived(self, request_id: str) -> None:
        """report_completion came after on_request_completed (called from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._apply_late_note, request_id)

    def _apply_late_note(self, request_id: str) -> None:
        waiting = self._awaiting.pop(request_id, None)
        if waiting is None:
            return  # on_request_completed will take the note
        count = completions.take_note(request_id)
        if count is not None:
            self._finish(request_id, waiting.replica_id, waiting.num_prompt_tokens, count, time.time())

    def _peer_bookings(self, batch: list, arrived: float) -> None:
        """Peers' bookings that reached this process at ``arrived`` (router/peers.py ``deliver``, from any thread):
        queued for this router's next decision (bounded: the oldest go first, the stats supersede them)."""
        if self._shares:
            self._peer_inbox.append((batch, arrived))

    def _take_peer_bookings(self) -> None:
        """Before a decision: everything the peers sent that reached this process, applied."""
        try:
            peers.poll()
        except Exception:
            self._log_error("halffull router: polling peer bookings failed")
        inbox = self._peer_inbox
        while inbox:
            self._apply_peers(*inbox.popleft())

    def _apply_peers(self, batch: list, arrived: float) -> None:
        try:
            lags = self.peer_lags
            self.peer_bookings_applied += peers.apply(batch, self.accounting, self.policy, arrived,
                                                      self._replica_ids.__contains__,
                                                      lambda at: lags.append(arrived - at))
        except Exception:
            self._log_error("halffull router: applying peer bookings failed")

    def _expire_awaiting(self) -> None:
        deadline = time.time() - COMPLETION_GRACE_S
        for request_id in [k for k, v in self._awaiting.items() if v.finish_time < deadline]:
            del self._awaiting[request_id]

    def _finish(self, request_id: str, replica_id: str, num_prompt: int, num_output: int, now: float) -> None:
        self.counts_observed += 1
        try:
            self.policy.on_finished(Completion(request_id, replica_id, num_prompt, num_output, now))
        except Exception:
            self._log_error("halffull router: policy.on_finished failed")

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget([replica_id.unique_id])

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        current = {r.replica_id.unique_id for r in replicas}
        self._forget(self._replica_ids - current)
        self._replica_ids = current
        try:
            self._record_delivery(replicas, time.time())
        except Exception:
            self._log_error("halffull router: recording the stats delivery delay failed")

    def _record_delivery(self, replicas: Sequence[RunningReplica], now: float) -> None:
        seen = self._stats_seen
        for r in replicas:
            stats = r.routing_stats
            published = stats.get("stats_time") if isinstance(stats, Mapping) else None
            if type(published) is not float:
                continue
            rid = r.replica_id.unique_id
            if seen.get(rid) != published:
                seen[rid] = published
                self.delivery_delays.append(now - published)
                self._delays_seen += 1
        for rid in [k for k in seen if k not in self._replica_ids]:
            del seen[rid]
        if time.monotonic() - self._last_delay_log >= self._delay_log_every_s:
            self._log_delays()

    def _log_delays(self) -> None:
        """One INFO line: the delivery delays of the publications seen since the last line (bounded)."""
        self._last_delay_log = time.monotonic()
        new = min(self._delays_seen - self._delays_logged, len(self.delivery_delays))
        self._delays_logged = self._delays_seen
        if new < 1:
            return
        recent = list(self.delivery_delays)[-new:]
        ordered = sorted(recent)
        sample = " ".join(str(round(d * 1000)) for d in recent[-_DELAY_LOG_SAMPLE:])
        logger.info("halffull router: stats delivery delay over %d publications: median %.4f p90 %.4f max %.4f s; "
                    "output counts observed %d; ms: %s", new, ordered[new // 2], ordered[min(new - 1, int(0.9 * new))],
                    ordered[-1], self.counts_observed, sample)
        lags = min(self.peer_bookings_applied - self._peer_lags_logged, len(self.peer_lags))
        self._peer_lags_logged = self.peer_bookings_applied
        if lags >= 1:
            recent = list(self.peer_lags)[-lags:]
            ordered = sorted(recent)
            logger.info("halffull router: peer bookings applied %d (total %d): lag median %.4f p90 %.4f max %.4f s; "
                        "in transit %.3f; ms: %s", lags, self.peer_bookings_applied, ordered[lags // 2],
                        ordered[min(lags - 1, int(0.9 * lags))], ordered[-1], self.accounting.transit.value,
                        " ".join(str(round(d * 1000, 1)) for d in recent[-_DELAY_LOG_SAMPLE:]))

    def _forget(self, replica_ids: Iterable[str]) -> None:
        for rid in replica_ids:
            self._replica_ids.discard(rid)
            try:
                self.policy.on_replica_removed(rid)
            except Exception:
                self._log_error("halffull router: policy.on_replica_removed failed")
            for internal_id in self.accounting.on_replica_removed(rid):
                self._inflight.pop(internal_id, None)
                self._reserved.pop(internal_id, None)

    def _log_error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= _LOG_EVERY_S:
            self._last_error_log = now
            logger.exception(message)
