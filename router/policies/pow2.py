"""``pow2``: power of two choices on outstanding requests (Ray Serve's default; the practical baseline).

Rule: draw two distinct candidates a, b uniformly with ``rng``; rank first the one with fewer
``outstanding_requests`` (``ReplicaSnapshot.outstanding_requests``: published running + waiting + routed since
the stats, at least this router's own outstanding count; only the local count when ``stats_known`` is False),
then the other, then all remaining candidates in uniformly random order (the fallback tiers).

    a, b = two distinct uniform draws
    tiers = [min(a, b by outstanding)], [the other], *random order of the rest

Ties (equal outstanding): the first draw wins; the draws are uniform, so that is a uniform tie-break.
One candidate -> that candidate.

State: none. Params: none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from halffull.router.policies import Stateless, outstanding, rank_random
from halffull.router.types import ReplicaSnapshot, RequestView, Rng, Tiers

NAME = "pow2"


@dataclass(frozen=True, slots=True)
class Pow2Params:
    """pow2 has no parameters."""


class Pow2Policy(Stateless):
    """Sample two, fewer outstanding requests first, the rest at random."""

    __slots__ = ("params",)
    name = NAME

    def __init__(self, params: Pow2Params | None = None) -> None:
        self.params = params or Pow2Params()

    def choose(
        self, request: RequestView, replicas: Sequence[ReplicaSnapshot], *, now: float, rng: Rng
    ) -> Tiers:
        n = len(replicas)
        if n <= 1:
            return [[r.replica_id] for r in replicas]
        i = rng.randrange(n)
        j = rng.randrange(n - 1)
        if j >= i:  # a distinct second draw, uniform over the other n - 1
            j += 1
        a, b = replicas[i], replicas[j]
        if outstanding(b) < outstanding(a):
            a, b = b, a
        rest = [r.replica_id for k, r in enumerate(replicas) if k != i and k != j]
        return [[a.replica_id], [b.replica_id], *rank_random(rest, rng)]
