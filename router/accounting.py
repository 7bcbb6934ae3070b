"""A router's own view of its replicas: published stats merged with its local in-flight accounting.

One router lives in every process that holds a handle (DESIGN.md §3), so what it counts locally is partial;
replica-published stats are the shared truth but stale. ``snapshot`` merges the two:

* published fields come from the replica's last stats dict (``replicas/engine/stats.py``), validated: a
  missing, malformed or non-finite value makes the snapshot ``stats_known=False`` (policies fall back to
  request counts), never an exception;
* ``delta_*`` fields count the requests routed *after* the stats' ``stats_time`` (not yet in them) that this
  router knows of: its own, plus the bookings its peers broadcast (``on_peer_routed``, router/peers.py);
  ``local_outstanding`` counts this router's own requests at the replica that have not finished;
* ``traffic_share`` is the share of the fleet's traffic this router knows of (router/share.py), learned from
  each new publication's ``num_received`` (router/feed.py) against its own sends and its peers' bookings: 1/N
  with N routers that share nothing, about 1 when every peer's bookings arrive. ``snapshots`` hands every new
  publication to ``on_new_stats`` too (the policies' ``on_stats``: published prefix hashes).

Peer bookings are kept per replica, oldest first, until a publication's ``stats_time`` passes them (the stats
then include them), and at most ``MAX_PEER_BOOKINGS`` per replica (oldest dropped): a replica that stops
publishing cannot make them grow.

The same class runs in the offline simulator and in the Ray Serve adapter.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Mapping
from typing import Any, Callable, Iterable

from halffull.router.estimate import OutputLengthEstimator
from halffull.router.feed import published_received
from halffull.router.peers import InTransit
from halffull.router.share import ShareParams, TrafficShare
from halffull.router.types import ReplicaSnapshot, RequestView

_INT_FIELDS = ("num_running", "num_waiting", "num_waiting_prompt_tokens", "num_free_blocks", "num_total_blocks",
               "block_size", "num_preemptions")
_FLOAT_FIELDS = ("num_decode_tokens_remaining", "decode_cost_ratio", "stats_time")
# The published fields in ReplicaSnapshot's order, so that a snapshot is built positionally (several times
# cheaper than by keyword, and a router builds one per replica per request).
_PUBLISHED = tuple(f for f in ReplicaSnapshot._fields if f in _INT_FIELDS or f in _FLOAT_FIELDS)
_CHECKS = tuple((key, _PUBLISHED.index(key), key in _INT_FIELDS) for key in _INT_FIELDS + _FLOAT_FIELDS)
_STATS_TIME, _BLOCK_SIZE, _RATIO, _DECODE = map(_PUBLISHED.index, (
    "stats_time", "block_size", "decode_cost_ratio", "num_decode_tokens_remaining"))
_LOCAL = ("stats_known", "local_outstanding", "delta_requests", "delta_prompt_tokens", "delta_decode_tokens",
          "traffic_share", "peers_in_transit")
if list(ReplicaSnapshot._fields) != ["replica_id", *_PUBLISHED, *_LOCAL]:
    raise TypeError("RouterAccounting.snapshot builds ReplicaSnapshot positionally: update it with the fields")


# One routed, unfinished request: (request_id, routed_time, prompt_tokens, decode_tokens). A plain tuple, not
# a dataclass: one is built per routed request, and a tuple is built without a Python-level __init__ call.
_Routed = tuple[str, float, int, float]


def parse_stats(stats: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validated published fields, or None when the stats cannot be trusted."""
    values = _published_values(stats)
    return None if values is None else {key: values[position] for key, position, _ in _CHECKS}


_GET_PUBLISHED = operator.itemgetter(*_PUBLISHED)
_GET_INTS = operator.itemgetter(*(_PUBLISHED.index(key) for key in _INT_FIELDS))
_EXACT_TYPES = tuple(int if key in _INT_FIELDS else float for key in _PUBLISHED)
if {_PUBLISHED.index(key) for key in _FLOAT_FIELDS} != {_DECODE, _RATIO, _STATS_TIME}:
    raise TypeError("_published_values' fast path sums exactly these float fields: update it with the fields")


def _published_values(stats: Mapping[str, Any] | None) -> tuple | None:
    """``parse_stats`` as a tuple in ``_PUBLISHED`` order.

    Checks: every field present, a real number (not bool), finite; the int fields >= 0 (and converted to int),
    block_size >= 1, decode_cost_ratio and num_decode_tokens_remaining >= 0.
    """
    if type(stats) is dict:
        # Fast path for what replicas publish (a dict, ints and floats where they belong): the types hold, so
        # only the ranges are left. Finite floats have a finite sum (else the general checks decide).
        try:
            values = _GET_PUBLISHED(stats)
        except KeyError:
            return None
        if (tuple(map(type, values)) == _EXACT_TYPES and min(_GET_INTS(values)) >= 0
                and math.isfinite(values[_DECODE] + values[_RATIO] + values[_STATS_TIME])
                and values[_BLOCK_SIZE] >= 1 and values[_RATIO] >= 0 and values[_DECODE] >= 0):
            return values
    return _checked_values(stats)


def _checked_values(stats: Mapping[str, Any] | None) -> tuple | None:
    """``_published_values`` field by field, for any mapping."""
    if type(stats) is not dict and not isinstance(stats, Mapping):  # (the exact type first: the ABC check is slow)
        return None
    out: list[Any] = [None] * len(_PUBLISHED)
    isfinite = math.isfinite
    try:
        for key, position, is_int in _CHECKS:
            value = stats[key]
            kind = type(value)
            if kind is not int and kind is not float:  # the common case skips the isinstance checks
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    return None
            if not isfinite(value):
                return None
            if is_int:
                if value < 0:
                    return None
                out[position] = value if kind is int else int(value)
            else:
                out[position] = value if kind is float else float(value)
    except KeyError:
        return None
    if out[_BLOCK_SIZE] < 1 or out[_RATIO] < 0 or out[_DECODE] < 0:
        return None
    return tuple(out)


_new_snapshot = tuple.__new__


def _coarse(value: float) -> float:
    """``value`` on a grid of 1/16 of its power of two (within 1/16 of it): the in-transit estimate moves with
    every decision, and a snapshot is reused only while it holds the same value; the spread it sets needs no
    finer."""
    if value <= 0.0:
        return 0.0
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * 16) / 16, exponent)


MAX_PEER_BOOKINGS = 4096  # per replica; far above what arrives between two publications at any rate we serve


def routed_estimates(policy: Any) -> tuple[Callable[[RequestView], float], Callable[[RequestView, str], int]]:
    """(expected decode tokens of a request, its uncached prompt tokens on a replica): what a router records for
    a request it routes, in its own deltas and in its peers' bookings. The policy's own estimates where it has
    them (sal: ``expected_decode_tokens``, and ``uncached_prompt_tokens``, net of its prefix credit, so deltas
    are net of cache hits like the published waiting tokens), else an output-length estimator's prior and the
    whole prompt. One definition for the simulator and the Ray adapter."""
    expected = getattr(policy, "expected_decode_tokens", None)
    if expected is None:
        fallback = OutputLengthEstimator()

        def expected(view: RequestView) -> float:
            return fallback.expected_remaining(view.max_tokens, 0)

    uncached = getattr(policy, "uncached_prompt_tokens", None)
    if uncached is None:

        def uncached(view: RequestView, replica_id: str) -> int:
            return view.num_prompt_tokens

    return expected, uncached


class RouterAccounting:
    def __init__(self, share: ShareParams | None = None) -> None:
        self.share = TrafficShare(share)
        self.transit = InTransit()
        self._routed: dict[str, deque[_Routed]] = {}  # replica -> this router's unfinished requests, by time
        self._where: dict[str, str] = {}  # request id -> replica id
        self._parsed: dict[str, tuple[object, tuple | None]] = {}  # replica -> (last stats object, parsed)
        # replica -> (the stats object it was built from, its last snapshot); dropped when the replica's
        # queue changes, so a hit is exact. Between refreshes most replicas see no change between requests.
        self._last: dict[str, tuple[object, ReplicaSnapshot]] = {}
        # replica -> peers' bookings (routed_time, prompt_tokens, decode_tokens) not yet covered by its stats
        self._peers: dict[str, deque[tuple[float, int, float]]] = {}

    def on_peer_routed(self, replica_id: str, *, at: float, prompt_tokens: int, decode_tokens: float,
                       now: float) -> None:
        """A peer router sent a request to ``replica_id`` at ``at`` (its clock), and the booking arrived here at
        ``now``; counted in the deltas until the replica's stats pass ``at``."""
        self.transit.on_booking(at, now)
        queue = self._peers.get(replica_id)
        if queue is None:
            queue = self._peers[replica_id] = deque(maxlen=MAX_PEER_BOOKINGS)
        queue.append((at, prompt_tokens, decode_tokens))
        self._last.pop(replica_id, None)
        self.share.on_sent(replica_id, at)

    def num_peer_bookings(self) -> int:
        """Peer bookings held (tests: bounded)."""
        return sum(map(len, self._peers.values()))

    def on_routed(self, request_id: str, replica_id: str, *, now: float, prompt_tokens: int, decode_tokens: float) -> None:
        queue = self._routed.get(replica_id)
        if queue is None:  # (not setdefault: that would build a deque per call)
            queue = self._routed[replica_id] = deque()
        queue.append((request_id, now, prompt_tokens, decode_tokens))
        self._where[request_id] = replica_id
        self._last.pop(replica_id, None)
        self.share.on_sent(replica_id, now)
        self.transit.on_sent(now)

    def on_finished(self, request_id: str) -> str | None:
        """Forget a finished request; returns the replica it was on (None if unknown)."""
        replica_id = self._where.pop(request_id, None)
        if replica_id is None:
            return None
        self._last.pop(replica_id, None)
        queue = self._routed.get(replica_id)
        if queue:
            if queue[0][0] == request_id:
                queue.popleft()
            else:
                for i, item in enumerate(queue):
                    if item[0] == request_id:
                        del queue[i]
                        break
        return replica_id

    def on_replica_removed(self, replica_id: str) -> list[str]:
        """Drop a dead replica's accounting; returns the request ids that were in flight there."""
        queue = self._routed.pop(replica_id, deque())
        self._peers.pop(replica_id, None)
        self._parsed.pop(replica_id, None)
        self._last.pop(replica_id, None)
        self.share.forget(replica_id)
        for request_id, _, _, _ in queue:
            self._where.pop(request_id, None)
        return [request_id for request_id, _, _, _ in queue]

    def outstanding(self, replica_id: str) -> int:
        return len(self._routed.get(replica_id, ()))

    def snapshot(self, replica_id: str, stats: Mapping[str, Any] | None) -> ReplicaSnapshot:
        """This router's view of one replica whose last published stats are ``stats``."""
        return self.snapshots(((replica_id, stats),))[0]

    def snapshots(self, published: Iterable[tuple[str, Mapping[str, Any] | None]],
                  on_new_stats: Callable[[str, Mapping[str, Any]], None] | None = None) -> list[ReplicaSnapshot]:
        """``snapshot`` of every (replica id, stats) pair, in order (one call per routing decision).

        ``on_new_stats(replica_id, stats)`` is called once per new, valid publication (before its snapshot is
        built). A share (or in-transit estimate) learned from it applies from the next call: this call's snapshots
        share one value.
        """
        out = []
        last_of, parsed_of, routed, peers_of = self._last, self._parsed, self._routed, self._peers
        share = self.share.share
        transit = _coarse(self.transit.value)
        for replica_id, stats in published:
            last = last_of.get(replica_id)
            if last is not None and last[0] is stats and last[1][-2] == share and last[1][-1] == transit:
                out.append(last[1])
                continue
            queue = routed.get(replica_id, ())
            cached = parsed_of.get(replica_id)
            # Stats change every period while snapshots are taken per request: parse each published dict once.
            if cached is not None and cached[0] is stats:
                values = cached[1]
            else:
                values = _published_values(stats)
                parsed_of[replica_id] = (stats, values)
                if values is not None:
                    self._observe(replica_id, stats, values[_STATS_TIME], on_new_stats)
            if values is None:
                snap = ReplicaSnapshot(replica_id=replica_id, stats_known=False, local_outstanding=len(queue),
                                       traffic_share=share, peers_in_transit=transit)
            else:
                since = values[_STATS_TIME]
                n = prompt = 0
                decode = 0.0
                # Newest first: stop at the first request the stats already include (often the newest one).
                if queue and queue[-1][1] >= since:
                    for _, routed_time, prompt_tokens, decode_tokens in reversed(queue):
                        if routed_time < since:
                            break
                        n += 1
                        prompt += prompt_tokens
                        decode += decode_tokens
                peers = peers_of.get(replica_id)
                if peers:
                    while peers and peers[0][0] < since:
                        peers.popleft()  # the stats include it
                    # (a booking that arrived out of time order can sit behind a newer one: counted only if new)
                    for at, prompt_tokens, decode_tokens in peers:
                        if at >= since:
                            n += 1
                            prompt += prompt_tokens
                            decode += decode_tokens
                # tuple.__new__: the named tuple's own __new__ is a Python function around exactly this call
                snap = _new_snapshot(ReplicaSnapshot, (replica_id, *values, True, len(queue), n, prompt, decode,
                                                       share, transit))
            last_of[replica_id] = (stats, snap)
            out.append(snap)
        return out

    def _observe(self, replica_id: str, stats: Mapping[str, Any], stats_time: float,
                 on_new_stats: Callable[[str, Mapping[str, Any]], None] | None) -> None:
        received = published_received(stats)
        if received is not None:
            self.share.on_published(replica_id, stats_time, received)
        self.transit.on_tick(stats_time)  # peers silent since: their rate decays
        if on_new_stats is not None:
            on_new_stats(replica_id, stats)
