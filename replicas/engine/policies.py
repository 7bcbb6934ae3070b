"""Engine scheduling policies: three small hooks the step scheduler calls.

=============  ========================  ==============================================  ==================
name           order_waiting             can_admit                                       pick_victim
=============  ========================  ==============================================  ==================
fcfs           queue order (preempted    always (the allocation itself checks the fit    last admitted
               requests at the front)    and vLLM's watermark)                           (``running[-1]``)
priority       (priority, arrival)       as fcfs                                         max (priority,
                                                                                         arrival)
no_preempt     queue order               prompt + max_tokens blocks fit on top of what   never
                                         the running requests have reserved
larry          see replicas/engine/larry.py
=============  ========================  ==============================================  ==================

fcfs and priority are vLLM V1's two policies, reproduced decision for decision. no_preempt is the
conservative engine (TGI, TensorRT-LLM's guaranteed-no-evict): memory for the whole output is reserved at
admission, so running requests never run out and nothing is ever preempted, at the price of idle memory.

Policies see the engine through ``EngineView`` and requests through ``RequestLike`` only, so the same objects
run in halffull's engine core and inside vLLM's scheduler.
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

    def describe(self) -> dict[str, Any]:
        params = getattr(self, "params", None)
        out: dict[str, Any] = {"name": self.name}
        if params is not None:
            out.update({f.name: getattr(params, f.name) for f in fields(params)})
        return out


class FcfsPolicy(EnginePolicy):
    """vLLM's default: arrival order, greedy admission, preempt the last admitted."""

    name = "fcfs"


class PriorityPolicy(EnginePolicy):
    """vLLM's priority scheduling: lower ``priority`` value first, then earlier arrival."""

    name = "priority"

    def order_waiting(self, waiting, view):
        return sorted(waiting, key=_priority_key)

    def pick_victim(self, running, view):
        return max(running, key=_priority_key)


def _priority_key(request: RequestLike) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class NoPreemptPolicy(EnginePolicy):
    """Reserve prompt + max_tokens at admission; never preempt."""

    name = "no_preempt"

    def can_admit(self, admission, view):
        return admission.blocks_full + outstanding_reservation(view) <= view.num_free_blocks

    def pick_victim(self, running, view):
        return None


def outstanding_reservation(view: EngineView) -> int:
    """Blocks the running requests may still claim before reaching prompt + max_tokens."""
    bs, cap = view.block_size, view.max_model_len
    total = 0
    for r in view.running:
        full = -(-min(r.num_prompt_tokens + r.max_tokens, cap) // bs)
        total += max(full - view.num_blocks_of(r), 0)
    return total


_POLICIES: dict[str, type] = {"fcfs": FcfsPolicy, "priority": PriorityPolicy, "no_preempt": NoPreemptPolicy}


def register(cls: type) -> type:
    _POLICIES[cls.name] = cls
    return cls


def engine_policy_names() -> list[str]:
    _load_optional()
    return sorted(_POLICIES)


def make_engine_policy(name: str, params: dict[str, Any] | None = None) -> EnginePolicy:
    """Build an engine policy by name; unknown names and parameters fail loudly."""
    _load_optional()
    if name not in _POLICIES:
        raise ValueError(f"unknown engine policy {name!r}; valid: {', '.join(sorted(_POLICIES))}")
    cls = _POLICIES[name]
    params = dict(params or {})
    params_cls = getattr(cls, "Params", None)
    if params_cls is None:
        if params:
            raise ValueError(f"engine policy {name!r} takes no parameters, got {sorted(params)}")
        return cls()
    valid = {f.name for f in fields(params_cls)}
    unknown = set(params) - valid
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for engine policy {name!r}; valid: {sorted(valid)}")
    return cls(params_cls(**params))


def _load_optional() -> None:
    # LARRY lives in its own module and registers itself on import.
    try:
        import halffull.replicas.engine.larry  # noqa: F401
    except ImportError:  # pragma: no cover - module not written yet
        pass
