"""A router's own view of its replicas: published stats merged with its local in-flight accounting.

One router lives in every process that holds a handle (DESIGN.md §3), so what it counts locally is partial;
replica-published stats are the shared truth but stale. ``snapshot`` merges the two:

* published fields come from the replica's last stats dict (``replicas/engine/stats.py``), validated: a
  missing, malformed or non-finite value makes the snapshot ``stats_known=False`` (policies fall back to
  request counts), never an exception;
* ``delta_*`` fields count this router's requests routed *after* the stats' ``stats_time`` (not yet in
  them); ``local_outstanding`` counts this router's requests at the replica that have not finished.

The same class runs in the offline simulator and in the Ray Serve adapter.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

from router.types import ReplicaSnapshot

_INT_FIELDS = ("num_running", "num_waiting", "num_waiting_prompt_tokens", "num_free_blocks", "num_total_blocks",
               "block_size", "num_preemptions")
_FLOAT_FIELDS = ("num_decode_tokens_remaining", "decode_cost_ratio", "stats_time")


@dataclass(slots=True)
class _Routed:
    request_id: str
    routed_time: float
    prompt_tokens: int
    decode_tokens: float


def parse_stats(stats: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validated published fields, or None when the stats cannot be trusted."""
    if not isinstance(stats, Mapping):
        return None
    out: dict[str, Any] = {}
    try:
        for key in _INT_FIELDS:
            value = stats[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                return None
            out[key] = int(value)
        for key in _FLOAT_FIELDS:
            value = stats[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return None
            out[key] = float(value)
    except KeyError:
        return None
    if out["block_size"] < 1 or out["decode_cost_ratio"] < 0 or out["num_decode_tokens_remaining"] < 0:
        return None
    return out


class RouterAccounting:
    def __init__(self) -> None:
        self._routed: dict[str, deque[_Routed]] = {}  # replica -> this router's unfinished requests, by time
        self._where: dict[str, str] = {}  # request id -> replica id
        self._parsed: dict[str, tuple[object, dict | None]] = {}  # replica -> (last stats object, parsed)

    def on_routed(self, request_id: str, replica_id: str, *, now: float, prompt_tokens: int, decode_tokens: float) -> None:
        self._routed.setdefault(replica_id, deque()).append(_Routed(request_id, now, prompt_tokens, decode_tokens))
        self._where[request_id] = replica_id

    def on_finished(self, request_id: str) -> str | None:
        """Forget a finished request; returns the replica it was on (None if unknown)."""
        replica_id = self._where.pop(request_id, None)
        if replica_id is None:
            return None
        queue = self._routed.get(replica_id)
        if queue:
            if queue[0].request_id == request_id:
                queue.popleft()
            else:
                for i, item in enumerate(queue):
                    if item.request_id == request_id:
                        del queue[i]
                        break
        return replica_id

    def on_replica_removed(self, replica_id: str) -> list[str]:
        """Drop a dead replica's accounting; returns the request ids that were in flight there."""
        queue = self._routed.pop(replica_id, deque())
        self._parsed.pop(replica_id, None)
        for item in queue:
            self._where.pop(item.request_id, None)
        return [item.request_id for item in queue]

    def outstanding(self, replica_id: str) -> int:
        return len(self._routed.get(replica_id, ()))

    def snapshot(self, replica_id: str, stats: Mapping[str, Any] | None) -> ReplicaSnapshot:
        queue = self._routed.get(replica_id, ())
        cached = self._parsed.get(replica_id)
        # Stats change every period while snapshots are taken per request: parse each published dict once.
        if cached is not None and cached[0] is stats:
            parsed = cached[1]
        else:
            parsed = parse_stats(stats)
            self._parsed[replica_id] = (stats, parsed)
        if parsed is None:
            return ReplicaSnapshot(replica_id=replica_id, stats_known=False, local_outstanding=len(queue))
        since = parsed["stats_time"]
        n = prompt = 0
        decode = 0.0
        # Newest first: stop at the first request the stats already include.
        for item in reversed(queue):
            if item.routed_time < since:
                break
            n += 1
            prompt += item.prompt_tokens
            decode += item.decode_tokens
        return ReplicaSnapshot(
            replica_id=replica_id, local_outstanding=len(queue), delta_requests=n,
            delta_prompt_tokens=prompt, delta_decode_tokens=decode, **parsed,
        )
