"""The data a load-balancing policy sees: one request view and one snapshot per candidate replica.

Both are frozen. A snapshot merges two sources (DESIGN.md §3):

* published stats: what the replica reported at ``stats_time`` (authoritative but stale), and
* local deltas: what *this* router routed to the replica after ``stats_time`` and so is not yet in the stats
  (fresh but local to one router process), plus this router's exact count of its own outstanding requests.

With perfect information (simulator ``--stats-period 0``) the deltas are zero and the stats are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Protocol, Sequence


class RequestView(NamedTuple):
    """What the router knows of a request before it runs (immutable; a named tuple, like the snapshots).

    ``prefix_hashes`` are chained hashes of the prompt's full blocks of ``prefix_block_size`` tokens: two
    requests whose first k hashes agree share their first ``k * prefix_block_size`` prompt tokens.
    """

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float = 0.0
    prefix_hashes: tuple[int, ...] = ()
    prefix_block_size: int = 512


class ReplicaSnapshot(NamedTuple):
    """One candidate replica as a policy sees it (immutable; a named tuple because routers build one per
    replica per request, and a tuple is built several times faster than a frozen dataclass).

    Published fields (as of ``stats_time``):
      num_running, num_waiting         requests in the engine
      num_waiting_prompt_tokens        prompt tokens routed there and not yet prefilled (net of cache hits)
      num_decode_tokens_remaining      expected remaining decode tokens of its requests
                                       (online mean output length capped by max_tokens, minus generated)
      num_free_blocks, num_total_blocks, block_size
                                       paged KV cache; free counts evictable prefix-cached blocks
      decode_cost_ratio                cost of one decode token in prefill-token equivalents at the
                                       replica's current batch (from its latency model)
      num_preemptions                  preemptions so far
    Local fields (this router only):
      local_outstanding                this router's requests at the replica not yet finished (exact)
      delta_requests, delta_prompt_tokens, delta_decode_tokens
                                       this router's requests routed after stats_time (not in the stats)
      traffic_share                    this router's estimated share of the fleet's traffic, in (0, 1]
                                       (router/share.py; 1.0 = alone or not yet known): with N routers the
                                       others send about (1/share - 1) times this router's deltas
                                       (peers' bookings count as known: about 1 when they all arrive)
      peers_in_transit                 how many peers' decisions one of this router's decisions cannot see
                                       (made within the peers' booking lag of it; router/peers.py
                                       ``InTransit``, learned from the bookings that arrive); 0 without peers
    ``stats_known`` is False when the replica published nothing usable; policies then fall back to
    request counts from local accounting.
    """

    replica_id: str
    num_running: int = 0
    num_waiting: int = 0
    num_waiting_prompt_tokens: int = 0
    num_decode_tokens_remaining: float = 0.0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    block_size: int = 16
    decode_cost_ratio: float = 1.0
    num_preemptions: int = 0
    stats_time: float = 0.0
    stats_known: bool = True
    local_outstanding: int = 0
    delta_requests: int = 0
    delta_prompt_tokens: int = 0
    delta_decode_tokens: float = 0.0
    traffic_share: float = 1.0
    peers_in_transit: float = 0.0

    @property
    def outstanding_requests(self) -> int:
        """Best estimate of requests at the replica: published count plus what was routed since."""
        if not self.stats_known:
            return self.local_outstanding
        return max(self.num_running + self.num_waiting + self.delta_requests, self.local_outstanding)


# Ranked tiers, best first; maps 1:1 onto Ray Serve's ``choose_replicas`` return value.
Tiers = list[list[str]]


class Rng(Protocol):
    """The subset of ``random.Random`` policies may use (passed in, never global)."""

    def random(self) -> float: ...

    def randrange(self, stop: int) -> int: ...

    def shuffle(self, x: list) -> None: ...


@dataclass(slots=True)
class Completion:
    """What a router learns when a request it routed finishes."""

    request_id: str
    replica_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_time: float = 0.0


class RoutingPolicy(Protocol):
    """A load-balancing policy: a pure decision plus explicit persistent state.

    ``choose`` must not mutate anything except through ``on_routed`` / ``on_finished``, which the caller
    invokes after the decision is acted upon.
    """

    name: str

    def choose(
        self, request: RequestView, replicas: Sequence[ReplicaSnapshot], *, now: float, rng: Rng
    ) -> Tiers: ...

    def on_routed(self, request: RequestView, replica_id: str, *, now: float) -> None: ...

    def on_finished(self, completion: Completion) -> None: ...

    def on_replica_removed(self, replica_id: str) -> None: ...

    def on_stats(self, replica_id: str, stats: Mapping[str, Any]) -> None:
        """A new publication of ``replica_id`` reached this router (router/feed.py keys included)."""
