"""The one place load-balancing policies are named (DESIGN.md §4.1).

    make_policy(name, params) -> RoutingPolicy

``name`` is one of ``POLICY_NAMES``; ``params`` a plain dict (from YAML, CLI or a Serve config) of fields of
that policy's frozen params dataclass, whose defaults are the only defaults. Unknown names, unknown keys and
ill-typed values raise ``ValueError`` naming what is valid; range checks live in each params dataclass.

Type rules for values (YAML-friendly but strict): ``bool`` fields take only ``True``/``False``; ``int`` fields
take ints (not bools); ``float`` fields take ints or floats (not bools), stored as float; ``str`` fields take strings (their
dataclass checks the allowed values); ``X | None`` fields also take ``None``.
"""

from __future__ import annotations

import dataclasses
import typing
from types import NoneType, UnionType
from typing import Any, Callable, Mapping

from halffull.router.policies import least_requests, pow2, prefix_aware, random_choice, round_robin, sal
from halffull.router.types import RoutingPolicy

# name -> (params dataclass, policy class taking an instance of it)
_POLICIES: dict[str, tuple[type, Callable[[Any], RoutingPolicy]]] = {
    round_robin.NAME: (round_robin.RoundRobinParams, round_robin.RoundRobinPolicy),
    random_choice.NAME: (random_choice.RandomParams, random_choice.RandomPolicy),
    pow2.NAME: (pow2.Pow2Params, pow2.Pow2Policy),
    least_requests.NAME: (least_requests.LeastRequestsParams, least_requests.LeastRequestsPolicy),
    prefix_aware.NAME: (prefix_aware.PrefixAwareParams, prefix_aware.PrefixAwarePolicy),
    sal.NAME: (sal.SalParams, sal.SalPolicy),
}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def params_class(name: str) -> type:
    """The frozen params dataclass of policy ``name``."""
    return _lookup(name)[0]


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> RoutingPolicy:
    """A fresh policy object (with its own state) for ``name``, configured by ``params``."""
    params_cls, policy_cls = _lookup(name)
    return policy_cls(build_params(params_cls, params or {}, name))


def build_params(params_cls: type, values: Mapping[str, Any], name: str = "") -> Any:
    """``params_cls(**values)`` after checking every key and value type; ValueError otherwise."""
    if not isinstance(values, Mapping):
        raise ValueError(f"params for policy {name!r} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(params_cls)
    fields = [f.name for f in dataclasses.fields(params_cls)]
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise ValueError(f"unknown params {unknown} for policy {name!r}; valid: {fields or 'none'}")
    kwargs = {key: _coerce(key, value, hints[key], name) for key, value in values.items()}
    return params_cls(**kwargs)


def _lookup(name: str) -> tuple[type, Callable[[Any], RoutingPolicy]]:
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; valid: {list(POLICY_NAMES)}") from None


def _coerce(key: str, value: Any, hint: Any, name: str) -> Any:
    allowed = hint.__args__ if isinstance(hint, UnionType) else (hint,)
    if value is None and NoneType in allowed:
        return None
    is_bool = isinstance(value, bool)
    if bool in allowed and is_bool:
        return value
    if int in allowed and isinstance(value, int) and not is_bool:
        return value
    if float in allowed and isinstance(value, (int, float)) and not is_bool:
        return float(value)
    if str in allowed and isinstance(value, str):
        return value
    expected = " | ".join("None" if t is NoneType else getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"param {key!r} of policy {name!r} must be {expected}, got {value!r}")
