"""``round_robin``: cycle through the replicas.

Rule: order the candidate ids lexicographically; the first choice is the first id strictly after the last
replica this policy routed to (wrapping around), then the following ids in cyclic order:

    ids = sorted(candidate ids);  start = bisect_right(ids, last_routed)  (0 if past the end)
    tiers = ids[start:] + ids[:start]

The cursor is a replica *id*, not an index, so it survives changes of the replica set: a removed replica is
simply skipped, a new one gets its turn when the cursor passes its id. Before anything was routed the start
is drawn with ``rng`` (so many routers, one per Serve proxy, do not all start on the same replica).

State: ``last_routed`` (the cursor), updated only by ``on_routed``; a fallback to the second tier moves the
cursor to the replica actually used. ``rng`` is otherwise unused: there are no ties.

Params: none.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

from halffull.router.policies import Stateless
from halffull.router.types import ReplicaSnapshot, RequestView, Rng, Tiers

NAME = "round_robin"


@dataclass(frozen=True, slots=True)
class RoundRobinParams:
    """round_robin has no parameters."""


class RoundRobinPolicy(Stateless):
    """Cycle over the sorted replica ids, resuming after the last one routed to."""

    __slots__ = ("params", "last_routed")
    name = NAME

    def __init__(self, params: RoundRobinParams | None = None) -> None:
        self.params = params or RoundRobinParams()
        self.last_routed: str | None = None

    def choose(
        self, request: RequestView, replicas: Sequence[ReplicaSnapshot], *, now: float, rng: Rng
    ) -> Tiers:
        ids = sorted([r.replica_id for r in replicas])
        if not ids:
            return []
        if self.last_routed is None:
            start = rng.randrange(len(ids))
        else:
            start = bisect_right(ids, self.last_routed)  # == len(ids) wraps to 0 below
        return [[rid] for rid in ids[start:]] + [[rid] for rid in ids[:start]]

    def on_routed(self, request: RequestView, replica_id: str, *, now: float) -> None:
        self.last_routed = replica_id
