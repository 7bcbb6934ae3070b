"""What a replica publishes about the requests it *received*, so that N routers learn what the others sent.

One router lives in every ingress process (DESIGN.md §3), and each sees only its own sends. Two facts cross
processes here, through the routing stats the replica already publishes (so with exactly their delay, no peer
channel, no central ledger):

    num_received            int, cumulative count of requests this replica received (routed to it by any
                            router); a router compares it with its own sends to learn its share of the
                            traffic (router/share.py)
    recent_prefix_hashes    list of int, the router-level prefix hashes (``RequestView.prefix_hashes``) of the
                            requests received in the last ``window_s`` seconds, distinct, most recent last, at
                            most ``max_hashes``; every router merges them into its prefix index, so a
                            conversation routed by router A is found on its replica by router B

Why every hash of the chain, not only the deepest: a follow-up turn's chain does not contain the previous
turn's deepest hash when that block was partial (Mooncake hashes partial tail blocks), so the shallower
hashes are what it matches. Distinct: shared heads (system prompts, earlier turns) are published once.

Why a window and not "what is new since the last publication": Serve's controller hands routers only the
latest stats, and a router may skip one; a window of several stats periods loses nothing.

Cost (measured with ``halffull simulate --trace mooncake_conv --rate-scale 4.5``, 4 replicas, 0.5 s period):
see docs/results/routers.md (hashes per publication, bytes, messages per request).

Params (``FeedParams``):
  window_s     float > 0, default 2.0    four stats periods of 0.5 s: a router that misses up to three
                                         publications in a row still sees every hash
  max_hashes   int >= 1, default 2048    bound on one publication (and on the feed's memory)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

NUM_RECEIVED = "num_received"
RECENT_PREFIX_HASHES = "recent_prefix_hashes"


@dataclass(frozen=True, slots=True)
class FeedParams:
    """Window and bound of a replica's received-requests feed (module docstring)."""

    window_s: float = 2.0
    max_hashes: int = 2048

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.max_hashes < 1:
            raise ValueError(f"max_hashes must be >= 1, got {self.max_hashes}")


class ReceivedFeed:
    """Replica side: counts received requests and remembers their recent prefix hashes (bounded)."""

    __slots__ = ("params", "num_received", "_seen")

    def __init__(self, params: FeedParams | None = None) -> None:
        self.params = params or FeedParams()
        self.num_received = 0
        self._seen: OrderedDict[int, float] = OrderedDict()  # hash -> last received time, oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def on_received(self, prefix_hashes: Sequence[int], now: float) -> None:
        self.num_received += 1
        seen = self._seen
        for h in prefix_hashes:
            if h in seen:
                seen.move_to_end(h)
            seen[h] = now
        while len(seen) > self.params.max_hashes:
            seen.popitem(last=False)

    def publish(self, now: float) -> dict[str, Any]:
        """The feed's keys of the routing stats as of ``now`` (drops hashes older than the window)."""
        seen, horizon = self._seen, now - self.params.window_s
        while seen:
            h, at = next(iter(seen.items()))
            if at >= horizon:
                break
            del seen[h]
        return {NUM_RECEIVED: self.num_received, RECENT_PREFIX_HASHES: list(seen)}


def _is_mapping(stats: Any) -> bool:
    # The exact type first: what replicas publish is a dict, and the ABC check is a slow Python-level call
    # (these run for every publication a router sees).
    return type(stats) is dict or isinstance(stats, Mapping)


def published_received(stats: Mapping[str, Any] | None) -> int | None:
    """``num_received`` of a stats dict, or None when absent or malformed (an older replica: no share)."""
    value = stats.get(NUM_RECEIVED) if _is_mapping(stats) else None
    if type(value) is not int or value < 0:
        return None
    return value


def published_prefixes(stats: Mapping[str, Any] | None) -> Sequence[int]:
    """``recent_prefix_hashes`` of a stats dict; () when absent or malformed (never raises)."""
    value = stats.get(RECENT_PREFIX_HASHES) if _is_mapping(stats) else None
    if type(value) is not list and type(value) is not tuple:
        return ()
    for h in value:
        if type(h) is not int:
            return ()
    return value


def merge_published(index: Any, replica_id: str, stats: Mapping[str, Any]) -> None:
    """Insert ``replica_id``'s published prefix hashes into a router's ``PrefixIndex``, most recent last (so
    it is the most recently inserted; ``insert`` walks a chain deepest, i.e. last, first)."""
    hashes = published_prefixes(stats)
    if hashes:
        index.insert(hashes[::-1], replica_id)
