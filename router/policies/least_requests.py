"""``least_requests``: fewest outstanding requests over all candidates.

Rule: rank all candidates by ascending ``outstanding_requests`` (``ReplicaSnapshot.outstanding_requests``:
published running + waiting + routed since the stats, at least this router's own outstanding count; only the
local count when ``stats_known`` is False). Ties in uniformly random order drawn from ``rng``.

State: none. Params: none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from halffull.router.policies import Stateless, outstanding, rank_ascending
from halffull.router.types import ReplicaSnapshot, RequestView, Rng, Tiers

NAME = "least_requests"


@dataclass(frozen=True, slots=True)
class LeastRequestsParams:
    """least_requests has no parameters."""


class LeastRequestsPolicy(Stateless):
    """Ascending outstanding requests, random tie-break."""

    __slots__ = ("params",)
    name = NAME

    def __init__(self, params: LeastRequestsParams | None = None) -> None:
        self.params = params or LeastRequestsParams()

    def choose(
        self, request: RequestView, replicas: Sequence[ReplicaSnapshot], *, now: float, rng: Rng
    ) -> Tiers:
        return rank_ascending(list(map(outstanding, replicas)), [r.replica_id for r in replicas], rng)
