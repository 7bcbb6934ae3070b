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
run in halffull's engine core and inside vLLM's scheduler. Those types and the base class ``EnginePolicy`` are in
replicas/engine/policy_base.py (re-exported here); this module holds the baseline policies and the registry.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from halffull.replicas.engine.larry import LarryPolicy
from halffull.replicas.engine.policy_base import Admission, EnginePolicy, EngineView, RequestLike

__all__ = ["Admission", "EnginePolicy", "EngineView", "RequestLike", "FcfsPolicy", "PriorityPolicy",
           "NoPreemptPolicy", "outstanding_reservation", "register", "engine_policy_names", "make_engine_policy"]


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


_POLICIES: dict[str, type] = {
    "fcfs": FcfsPolicy, "priority": PriorityPolicy, "no_preempt": NoPreemptPolicy, "larry": LarryPolicy,
}


def register(cls: type) -> type:
    """Add a policy class under its ``name`` (for policies defined outside this package)."""
    _POLICIES[cls.name] = cls
    return cls


def engine_policy_names() -> list[str]:
    return sorted(_POLICIES)


def make_engine_policy(name: str, params: dict[str, Any] | None = None) -> EnginePolicy:
    """Build an engine policy by name; unknown names and parameters fail loudly."""
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
