"""The interface of engine scheduling policies: what a policy sees and the hooks it implements.

Three decision hooks (``order_waiting``, ``can_admit``, ``pick_victim``) and one learning hook
(``on_finished``: a request finished normally; the only place a policy may learn output lengths). Optional:
``order_stable_until`` and ``decode_steps_stable`` tell the simulator how long a decision cannot change.

``EnginePolicy`` is the base class (its hooks are vLLM's FCFS); a policy reads the engine through ``EngineView``
and requests through ``RequestLike`` only, so the same object runs in halffull's engine core
(replicas/engine/scheduler.py) and inside vLLM's scheduler (replicas/vllm/scheduler.py). ``Admission`` is one
admission attempt as the scheduler computed it.

The policies themselves and their registry are in replicas/engine/policies.py (fcfs, priority, no_preempt) and
replicas/engine/larry.py; both build on this module, and the registry imports LARRY, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol, Sequence


class RequestLike(Protocol):
    request_id: str
    num_prompt_tokens: int
    num_computed_tokens: int
    max_tokens: int
    arrival_time: float
    priority: int

    @property
    def num_tokens(self) -> int: ...


class EngineView(Protocol):
    """What a policy may read of the engine at decision time."""

    now: float
    block_size: int
    num_total_blocks: int
    max_model_len: int

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def running(self) -> Sequence[RequestLike]: ...

    def num_blocks_of(self, request: RequestLike) -> int: ...

    def prompt_blocks(self, request: RequestLike) -> int:
        """Blocks a waiting request needs to hold its tokens, after prefix-cache hits."""
        ...


@dataclass(slots=True)
class Admission:
    """One admission attempt, as the scheduler computed it.

    ``blocks_now``: free blocks this step's allocation consumes (prefix hits counted as vLLM does);
    ``blocks_prompt``: free blocks needed to hold all its current tokens (the whole prompt, after hits),
    whatever this step's chunk; ``blocks_full``: free blocks needed to hold prompt + max_tokens (after hits).
    """

    request: RequestLike
    num_hit_tokens: int
    num_new_tokens: int
    blocks_now: int
    blocks_full: int
    blocks_prompt: int = 0


class EnginePolicy:
    """Base: vLLM's FCFS. Subclasses override the hooks they change.

    ``stable_order``: the waiting order and admission verdicts change only on arrivals, finishes and
    preemptions (not with time or memory use). The simulator may then jump over runs of identical decode
    steps while requests wait; a policy that is not stable limits those runs to one block allocation.
    """

    name = "fcfs"
    stable_order = True

    def order_waiting(self, waiting: Sequence[RequestLike], view: EngineView) -> Sequence[RequestLike]:
        return waiting

    def can_admit(self, admission: Admission, view: EngineView) -> bool:
        return True

    def pick_victim(self, running: Sequence[RequestLike], view: EngineView) -> RequestLike | None:
        return running[-1]

    def on_finished(self, request: RequestLike) -> None:
        """A request finished normally (not aborted): what a policy may learn output lengths from."""

    def describe(self) -> dict[str, Any]:
        params = getattr(self, "params", None)
        out: dict[str, Any] = {"name": self.name}
        if params is not None:
            out.update({f.name: getattr(params, f.name) for f in fields(params)})
        return out
