"""Load-balancing policies (DESIGN.md §4.1) and the few helpers they share.

One module per policy; its docstring is the policy's full spec and its frozen ``Params`` dataclass holds every
default. ``halffull.router.registry`` names them (``make_policy``, ``POLICY_NAMES``).

Common contract of every ``choose(request, replicas, *, now, rng)``:

* every candidate appears exactly once, each in its own singleton tier, best first, so a caller can fall back
  to the next tier when the first replica rejects; no candidates -> ``[]``;
* ties are broken by the passed-in ``rng`` only (a seeded ``random.Random`` makes the ranking deterministic
  for the same inputs in the same order);
* it never mutates state: persistent state changes only in ``on_routed`` / ``on_finished`` /
  ``on_replica_removed`` / ``on_stats``.

Speed: ``choose`` is on the request path of every call. The helpers below do one C-level ``sort`` on
precomputed keys; ``rng.random()`` per candidate is the tie-break key (cheaper than ``rng.shuffle``, which
draws in Python).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from halffull.router.types import Completion, ReplicaSnapshot, RequestView, Rng, Tiers

# ReplicaSnapshot.outstanding_requests as a plain function: ``map(outstanding, replicas)`` is cheaper than
# attribute access to the property in a Python loop, and keeps types.py the one definition.
outstanding = ReplicaSnapshot.outstanding_requests.fget


def rank_ascending(keys: Sequence[float], ids: Sequence[str], rng: Rng) -> Tiers:
    """Singleton tiers of ``ids`` by ascending ``keys``; equal keys in uniformly random order."""
    rnd = rng.random
    ranked = sorted(zip(keys, [rnd() for _ in ids], ids))
    return [[t[2]] for t in ranked]


def rank_random(ids: Sequence[str], rng: Rng) -> Tiers:
    """Singleton tiers of ``ids`` in uniformly random order."""
    rnd = rng.random
    ranked = sorted(zip([rnd() for _ in ids], ids))
    return [[t[1]] for t in ranked]


def water_level(values: Sequence[float], budget: float) -> float:
    """Water level L over ascending ``values``: sum of (L - v)+ equals ``budget`` (> 0)."""
    total = 0.0
    n = len(values)
    for k in range(n):
        total += values[k]
        level = (budget + total) / (k + 1)
        if k + 1 == n or level <= values[k + 1]:
            return level
    return 0.0


def waterfill_pick(keys: Sequence, values: Sequence[float], budget: float, rng: Rng):
    """One of ``keys`` (their ``values`` ascending): with L = ``water_level(values, budget)``, key i with
    probability (L - value_i)+ / ``budget``. N routers that each draw so, on the same view, fill the level in
    expectation instead of all landing on the minimum."""
    level = water_level(values, budget)
    x = rng.random() * budget
    pick = keys[0]
    for key, value in zip(keys, values):
        gap = level - value
        if gap <= 0:
            break
        pick = key
        x -= gap
        if x <= 0:
            break
    return pick


class Stateless:
    """Hooks of a policy that keeps no state between calls (all no-ops)."""

    __slots__ = ()

    def on_routed(self, request: RequestView, replica_id: str, *, now: float) -> None:
        pass

    def on_finished(self, completion: Completion) -> None:
        pass

    def on_replica_removed(self, replica_id: str) -> None:
        pass

    def on_stats(self, replica_id: str, stats: Mapping[str, Any]) -> None:
        pass
