"""``random``: a uniformly random order of the candidates.

Rule: each candidate gets an independent key ``rng.random()``; tiers are the candidates by ascending key,
i.e. a uniformly random permutation drawn from the passed-in ``rng`` (seeded -> reproducible).

State: none. Params: none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from halffull.router.policies import Stateless, rank_random
from halffull.router.types import ReplicaSnapshot, RequestView, Rng, Tiers

NAME = "random"


@dataclass(frozen=True, slots=True)
class RandomParams:
    """random has no parameters."""


class RandomPolicy(Stateless):
    """Uniformly random ranking."""

    __slots__ = ("params",)
    name = NAME

    def __init__(self, params: RandomParams | None = None) -> None:
        self.params = params or RandomParams()

    def choose(
        self, request: RequestView, replicas: Sequence[ReplicaSnapshot], *, now: float, rng: Rng
    ) -> Tiers:
        return rank_random([r.replica_id for r in replicas], rng)
