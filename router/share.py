"""This router's share of the fleet's traffic, learned from the replicas' ``num_received`` (router/feed.py).

With N routers each acting on the same stale stats, every router's own deltas are about 1/N of what reached
a replica since its stats: the others send about as much, on the same view (Mitzenmacher, "How useful is old
information?"). ``share`` lets a policy scale its deltas by 1/share and know whether it is alone.

Estimate. For replica r, two consecutive publications (t1, n1) and (t2, n2) (``stats_time``,
``num_received``) give one sample:

    mine_r  = the sends to r this router knows of with t1 < send time <= t2: its own, and its peers' bookings
              (router/peers.py; ``on_sent`` is called for both), so with every booking arriving share ~ 1
    total_r = n2 - n1                                   (every router's sends that r received in between)

and the share is a decayed ratio over all samples of all replicas:

    M <- decay * M + mine_r,   T <- decay * T + total_r
    share = clamp(M / T, min_share, 1)   once T >= min_total, else 1.0 (alone until shown otherwise)

It follows autoscaling of the ingress (more routers -> smaller share) within a few stats periods and needs no
peer channel (a router whose peers fall silent sees it drop to its own share). Send times and ``stats_time``
are wall-clock seconds from different processes: a send that is still in flight at ``t2`` counts as mine but
not yet as received, a bias of one request per sample that the decayed sums average out.

Edge cases: a replica whose ``num_received`` went down restarted (new baseline, no sample); a replica without
``num_received`` gives no samples; a replica that stops publishing keeps at most ``max_pending`` send times
(oldest dropped), and ``forget`` drops a replica that left.

Params (``ShareParams``):
  decay       float in (0, 1), default 0.95   per sample; with R replicas publishing every period p the
                                              memory is about p * R / (1 - decay) ... 20 samples: 2.5 s at 4
                                              replicas x 0.5 s
  min_total   float > 0, default 8.0          received requests needed before the estimate is used
  min_share   float in (0, 1], default 1/32   floor (deltas are scaled by at most 32)
  max_pending int >= 1, default 4096          send times kept per replica between two publications
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ShareParams:
    """Memory, warm-up and floor of the share estimate (module docstring)."""

    decay: float = 0.95
    min_total: float = 8.0
    min_share: float = 1.0 / 32
    max_pending: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if not self.min_total > 0:
            raise ValueError(f"min_total must be > 0, got {self.min_total}")
        if not 0 < self.min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {self.min_share}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")


class TrafficShare:
    """Decayed ratio of this router's sends to what the replicas received (module docstring)."""

    __slots__ = ("params", "share", "_mine", "_total", "_sent", "_last")

    def __init__(self, params: ShareParams | None = None) -> None:
        self.params = params or ShareParams()
        self.share = 1.0
        self._mine = 0.0
        self._total = 0.0
        self._sent: dict[str, deque[float]] = {}  # replica -> my send times after its last publication
        self._last: dict[str, tuple[float, int]] = {}  # replica -> (stats_time, num_received) of it

    def on_sent(self, replica_id: str, now: float) -> None:
        sent = self._sent.get(replica_id)
        if sent is None:
            sent = self._sent[replica_id] = deque(maxlen=self.params.max_pending)
        sent.append(now)

    def on_published(self, replica_id: str, stats_time: float, num_received: int) -> None:
        """A new publication of ``replica_id``; updates ``share``."""
        last = self._last.get(replica_id)
        if last is not None and stats_time <= last[0]:
            return  # the same or an older publication (stats can arrive out of order)
        self._last[replica_id] = (stats_time, num_received)
        mine = self._take_sent(replica_id, stats_time)
        if last is None or num_received < last[1]:
            return  # first sight, or the replica restarted: a baseline only
        p = self.params
        self._mine = p.decay * self._mine + mine
        self._total = p.decay * self._total + (num_received - last[1])
        if self._total >= p.min_total:
            # clamp(ratio, min_share, 1) as min(1.0, max(min_share, ratio)) would give it, without the two
            # builtin calls (their argument parsing dominates this hook, run for every publication)
            ratio = self._mine / self._total
            self.share = 1.0 if ratio >= 1.0 else (ratio if ratio > p.min_share else p.min_share)

    def forget(self, replica_id: str) -> None:
        self._sent.pop(replica_id, None)
        self._last.pop(replica_id, None)

    def _take_sent(self, replica_id: str, until: float) -> int:
        """Remove and count this router's sends to ``replica_id`` at or before ``until``."""
        sent = self._sent.get(replica_id)
        n = 0
        while sent and sent[0] <= until:
            sent.popleft()
            n += 1
        return n

    def num_pending(self) -> int:
        """Send times held (tests: bounded)."""
        return sum(map(len, self._sent.values()))
