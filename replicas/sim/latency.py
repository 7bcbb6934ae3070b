"""Latency model of one vLLM engine step, per (GPU, model, tensor-parallel degree) profile.

The simulated engine (DESIGN.md §5) advances its clock by `LatencyModel.step_time`. All constants (GPU
datasheet numbers, efficiencies, model shapes, overheads, fitted calibrations) live in `profiles.yaml` next
to this file; nothing here is tuned in code.

Two step models. GPUs with a ``calibration`` entry in profiles.yaml (a100, h100, h200) get the per-operator
model of operators.py (``OperatorLatencyModel``, fitted to measured operator timings by calibrate.py);
``profile_model.latency_model`` picks it. The others (a10g, l4: uncalibrated) keep the whole-step roofline below, which is
also what ``LatencyModel(...)`` built directly computes.

Notation (one engine step, all scheduled requests together):
    n      num_tokens      tokens computed this step (prefill chunks + one per decoding request)
    seqs   num_seqs        requests scheduled this step (the per-operator model's LM head; the roofline
                           ignores it)
    pairs  attn_pairs      sum over computed tokens of how many tokens each attends to (causal, itself
                           included): a prefill of p tokens from scratch has p(p+1)/2, a decode token at
                           context c (after the step) has c
    kv     kv_tokens_read  KV tokens read: sum over scheduled requests of their context after the step
    P params, L layers, Hq query heads, Hkv KV heads, D head dim, s dtype bytes  (ModelSpec)
    F peak FLOP/s, BW peak bytes/s, mfu, bw_eff, M memory bytes                 (GpuSpec, per GPU)
    tp tensor-parallel degree: weights, KV and FLOPs split evenly over tp GPUs

Roofline step time:
    compute   = (2*P*n + 4*L*Hq*D*pairs) / (tp * F * mfu)     # GEMMs + attention (QK^T and AV)
    memory    = (P*s + kv_bytes_per_token * kv) / (tp * BW * bw_eff)
    allreduce = 2 * L * allreduce_latency_s  if tp > 1 else 0  # 2 all-reduces per layer (after
                # attention and after the MLP), latency-bound; their bandwidth term is ignored, which
                # is fair on NVLink (<~10% of a large prefill) but optimistic on PCIe GPUs (a10g, l4)
    step_time = max(compute, memory) + step_overhead_s + allreduce ;  0 when n == 0
    kv_bytes_per_token = 2 (K and V) * L * Hkv * D * s

KV capacity (what vLLM allocates at startup):
    kv_room  = tp * M * gpu_memory_utilization - P*s - tp * activation_reserve_bytes_per_gpu
    num_kv_blocks(block_size) = floor(kv_room / (block_size * kv_bytes_per_token))
    A profile whose kv_room holds fewer than max_model_len tokens is rejected (vLLM refuses to start).

Decode runs (`decode_run`): B sequences holding C computed tokens in total decode together; step i
(0-based) has n = B and pairs = kv = C + B*(i+1). Both roofline terms are then linear in i, so the step
time is max(two lines) + constant: split the run at the lines' crossover and sum each part as an
arithmetic series; the deadline cut solves the quadratic prefix sum, then corrects by +-1 step.

Sanity (tests/test_latency.py): Llama-3-8B on one H100 decodes a single sequence in 6-8 ms per step,
prefills 1,000 tokens in 25-50 ms, and holds a few hundred thousand KV tokens at 0.9 utilisation.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import yaml

PROFILES_PATH = Path(__file__).with_name("profiles.yaml")
_ENGINE_KEYS = frozenset(
    {"step_overhead_s", "allreduce_latency_s", "activation_reserve_bytes_per_gpu", "gpu_memory_utilization"}
)
_COST_RATIO_PREFILL_TOKENS = 1024  # decode_cost_ratio's reference prefill (part of its definition)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU: dense bf16 peak FLOP/s, peak memory bytes/s, memory bytes, achieved fractions of peak."""

    name: str
    peak_flops: float
    hbm_bw: float
    memory_bytes: int
    mfu: float
    bw_eff: float


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer with grouped-query attention."""

    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_model_len: int
    ffn_size: int = 0  # MLP intermediate size and vocabulary: the per-operator model's shapes
    vocab_size: int = 0

    @property
    def weight_bytes(self) -> float:
        """num_params * dtype_bytes (whole model, all tp shards together)."""
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) * num_layers * num_kv_heads * head_dim * dtype_bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Profiles:
    """profiles.yaml, parsed: GPUs, models, default tp per model (per-GPU exceptions), engine constants, and
    the per-GPU fitted calibrations (raw entries; operators.GpuCalibration parses them)."""

    gpus: Mapping[str, GpuSpec]
    models: Mapping[str, ModelSpec]
    default_tp: Mapping[str, Mapping[str, int]]
    engine: Mapping[str, float]
    calibration: Mapping[str, Mapping]


def _spec(cls: type, name: str, entry: dict):
    """Build a GpuSpec/ModelSpec from a YAML entry, coercing numbers; unknown or missing keys fail."""
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "name"}
    if set(entry) != set(fields):
        raise ValueError(
            f"{PROFILES_PATH.name}: {cls.__name__} {name!r} has unknown keys {sorted(set(entry) - set(fields))}"
            f" and misses {sorted(set(fields) - set(entry))}"
        )
    return cls(name=name, **{key: typ(float(entry[key])) for key, typ in fields.items()})


@functools.cache
def load_profiles() -> Profiles:
    """Read and validate profiles.yaml (cached; the result is read-only)."""
    raw = yaml.safe_load(PROFILES_PATH.read_text())
    engine = {key: float(value) for key, value in raw["engine"].items()}
    if set(engine) != _ENGINE_KEYS:
        raise ValueError(f"{PROFILES_PATH.name}: engine keys must be {sorted(_ENGINE_KEYS)}, got {sorted(engine)}")
    models = {name: _spec(ModelSpec, name, entry) for name, entry in raw["models"].items()}
    if set(raw["default_tp"]) != set(models):
        raise ValueError(f"{PROFILES_PATH.name}: default_tp must name exactly the models {sorted(models)}")
    return Profiles(
        gpus=MappingProxyType({name: _spec(GpuSpec, name, entry) for name, entry in raw["gpus"].items()}),
        models=MappingProxyType(models),
        default_tp=MappingProxyType({m: MappingProxyType(t) for m, t in raw["default_tp"].items()}),
        engine=MappingProxyType(engine),
        calibration=MappingProxyType(_calibration_section(raw, set(raw["gpus"]))),
    )


def _calibration_section(raw: dict, gpus: set[str]) -> dict:
    """profiles.yaml's ``calibration`` entries (GPU -> fitted constants); each must name a known GPU."""
    section = raw.get("calibration") or {}
    if not set(section) <= gpus:
        raise ValueError(f"{PROFILES_PATH.name}: calibration for unknown GPUs {sorted(set(section) - gpus)}")
    return section


def lookup(table: Mapping, kind: str, name: str):
    """table[name], or a ValueError listing the valid names."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def default_tp(gpu: str, model: str) -> int:
    """The profile's default tensor-parallel degree for `model` on `gpu`."""
    profiles = load_profiles()
    lookup(profiles.gpus, "gpu", gpu)
    per_gpu = lookup(profiles.default_tp, "model", model)
    return int(per_gpu.get(gpu, per_gpu["default"]))


def list_profiles() -> list[tuple[str, str, int]]:
    """Every (gpu, model, default tp) combination in profiles.yaml, sorted."""
    profiles = load_profiles()
    return [(g, m, default_tp(g, m)) for g in sorted(profiles.gpus) for m in sorted(profiles.models)]


def _prefix(j: int, split: int, a1: float, b1: float, a2: float, b2: float) -> float:
    """Start time of step j: line (a1, b1) for steps < split, line (a2, b2) from split on.

    The sum of the step costs before j, in closed form: sum_{i<j} (a1 + b1*i) while j <= split, else
    sum_{i<split} (a1 + b1*i) + sum_{split<=i<j} (a2 + b2*i) (m*a + b*(lo + hi - 1)*m/2 for m steps lo..hi-1).
    """
    if j <= split:
        return j * a1 + b1 * (j - 1) * j * 0.5 if j > 0 else 0.0
    first = split * a1 + b1 * (split - 1) * split * 0.5 if split > 0 else 0.0
    m = j - split
    return first + (m * a2 + b2 * (split + j - 1) * m * 0.5)


def _first_reaching(deadline: float, j0: int, s0: float, a: float, b: float) -> int:
    """Smallest j >= j0 with s0 + sum_{i=j0}^{j-1}(a + b*i) >= deadline, from the continuous root.

    With m = j - j0 and p = a + b*j0 - b/2 the sum is p*m + (b/2)*m^2; its root is solved in the
    cancellation-free form m = 2R / (p + sqrt(p^2 + 2bR)), R = deadline - s0. The caller fixes rounding.
    """
    rest = deadline - s0
    p = a + b * j0 - 0.5 * b
    return j0 + math.ceil(2.0 * rest / (p + math.sqrt(p * p + 2.0 * b * rest)))


def _deadline_steps(
    deadline: float, split: int, a1: float, b1: float, a2: float, b2: float, last: int
) -> tuple[int, float]:
    """Smallest j in [1, last] whose start time is >= deadline (given that start(last) >= deadline),
    and that start time."""
    if split >= last:
        # One line (decode runs are memory-bound throughout): the general code below with _prefix and
        # _first_reaching(deadline, 0, 0.0, a1, b1) written out, the same operations in the same order.
        p = a1 - 0.5 * b1
        j = math.ceil(2.0 * deadline / (p + math.sqrt(p * p + 2.0 * b1 * deadline)))
        j = 1 if j < 1 else (last if j > last else j)
        while j > 1 and (j - 1) * a1 + b1 * (j - 2) * (j - 1) * 0.5 >= deadline:
            j -= 1
        while True:
            start = j * a1 + b1 * (j - 1) * j * 0.5
            if start >= deadline:
                return j, start
            j += 1
    at_split = _prefix(split, split, a1, b1, a2, b2) if split < last else deadline
    if at_split < deadline:
        j = _first_reaching(deadline, split, at_split, a2, b2)
    else:
        j = _first_reaching(deadline, 0, 0.0, a1, b1)
    j = min(max(j, 1), last)
    while j > 1 and _prefix(j - 1, split, a1, b1, a2, b2) >= deadline:  # rounding fix-ups: +-1 step
        j -= 1
    while True:
        start = _prefix(j, split, a1, b1, a2, b2)
        if start >= deadline:
            return j, start
        j += 1


class DecodeRunTimes:
    """Start times, from the run's start, of the steps of one decode run: ``LatencyModel.decode_run``'s lines."""

    __slots__ = ("steps", "split", "a1", "b1", "a2", "b2", "last_start")

    def __init__(self, steps: int, split: int, a1: float, b1: float, a2: float, b2: float):
        self.steps, self.split, self.a1, self.b1, self.a2, self.b2 = steps, split, a1, b1, a2, b2
        # start(steps - 1), asked of every run, often repeatedly; _prefix written out for one line
        j = steps - 1
        if j <= split:
            self.last_start = j * a1 + b1 * (j - 1) * j * 0.5 if j > 0 else 0.0
        else:
            self.last_start = _prefix(j, split, a1, b1, a2, b2)

    def start(self, j: int) -> float:
        """Start of step j (0 <= j <= steps; ``start(steps)`` is the run's duration)."""
        return _prefix(j, self.split, self.a1, self.b1, self.a2, self.b2)

    def cut(self, deadline: float) -> tuple[int, float]:
        """(k, start(k)): how many steps start before ``deadline`` (> 0; at least 1, since step 0 starts at
        0), and how long they take."""
        k = self.steps
        if deadline != math.inf and self.last_start >= deadline:
            return _deadline_steps(deadline, self.split, self.a1, self.b1, self.a2, self.b2, k - 1)
        return k, self.start(k)


class LatencyModel:
    """Step times and KV capacity of one engine replica (see the module docstring for the formulas)."""

    def __init__(
        self,
        gpu: GpuSpec,
        model: ModelSpec,
        tp: int = 1,
        *,
        step_overhead_s: float = load_profiles().engine["step_overhead_s"],
        gpu_memory_utilization: float = load_profiles().engine["gpu_memory_utilization"],
        allreduce_latency_s: float = load_profiles().engine["allreduce_latency_s"],
        activation_reserve_bytes_per_gpu: float = load_profiles().engine["activation_reserve_bytes_per_gpu"],
    ):
        if tp < 1 or not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"need tp >= 1 and 0 < gpu_memory_utilization <= 1, got {tp}, {gpu_memory_utilization}")
        self.gpu, self.model, self.tp = gpu, model, tp
        self.step_overhead_s = step_overhead_s
        self.gpu_memory_utilization = gpu_memory_utilization
        self.activation_reserve_bytes = tp * activation_reserve_bytes_per_gpu
        flops = tp * gpu.peak_flops * gpu.mfu
        bandwidth = tp * gpu.hbm_bw * gpu.bw_eff
        # Seconds per unit: per computed token, per attention pair, for the weights, per KV token read.
        self._s_token = 2.0 * model.num_params / flops
        self._s_pair = 4.0 * model.num_layers * model.num_q_heads * model.head_dim / flops
        self._s_weights = model.weight_bytes / bandwidth
        self._s_kv = model.kv_bytes_per_token / bandwidth
        allreduce = 2 * model.num_layers * allreduce_latency_s if tp > 1 else 0.0
        self._s_fixed = step_overhead_s + allreduce
        self._check_fits()
        self._prefill_s_per_token = self.prefill_time(_COST_RATIO_PREFILL_TOKENS) / _COST_RATIO_PREFILL_TOKENS

    def _kv_room_bytes(self) -> float:
        """tp * memory * utilisation - weight bytes - activation reserve (all tp GPUs together)."""
        total = self.tp * self.gpu.memory_bytes * self.gpu_memory_utilization
        return total - self.model.weight_bytes - self.activation_reserve_bytes

    def _check_fits(self) -> None:
        """Refuse, as vLLM does, a profile whose KV room cannot hold one max_model_len sequence."""
        kv_tokens = self._kv_room_bytes() / self.model.kv_bytes_per_token
        if kv_tokens < self.model.max_model_len:
            raise ValueError(
                f"{self.model.name} does not fit on {self.tp}x {self.gpu.name}: weights "
                f"{self.model.weight_bytes / 1e9:.1f} GB + reserve {self.activation_reserve_bytes / 1e9:.1f} GB "
                f"leave room for {max(kv_tokens, 0):.0f} KV tokens < max_model_len {self.model.max_model_len}"
                f" (gpu_memory_utilization {self.gpu_memory_utilization}); use a larger tp"
            )

    def compute_time(self, num_tokens: float, attn_pairs: float) -> float:
        """(2*P*num_tokens + 4*L*Hq*D*attn_pairs) / (tp * peak_flops * mfu)."""
        return self._s_token * num_tokens + self._s_pair * attn_pairs

    def memory_time(self, kv_tokens_read: float) -> float:
        """(weight_bytes + kv_bytes_per_token * kv_tokens_read) / (tp * hbm_bw * bw_eff)."""
        return self._s_weights + self._s_kv * kv_tokens_read

    def step_time(self, num_tokens: int, attn_pairs: int, kv_tokens_read: int, num_seqs: int | None = None) -> float:
        """max(compute_time, memory_time) + step overhead (+ all-reduce latency if tp > 1); 0 if no tokens.
        (num_seqs: the per-operator model's LM head; the roofline ignores it.)"""
        if num_tokens <= 0:
            return 0.0
        compute = self._s_token * num_tokens + self._s_pair * attn_pairs
        memory = self._s_weights + self._s_kv * kv_tokens_read
        return (compute if compute > memory else memory) + self._s_fixed

    def prefill_time(self, num_tokens: int) -> float:
        """One request's prefill from scratch: step_time(n, n*(n+1)/2, n)."""
        return self.step_time(num_tokens, num_tokens * (num_tokens + 1) // 2, num_tokens)

    def decode_run(
        self, num_seqs: int, context_tokens: int, max_steps: int, deadline: float = math.inf
    ) -> tuple[int, float]:
        """(k, elapsed) of up to max_steps pure-decode steps; step i has n=B, pairs=kv=C+B*(i+1).

        k counts the steps whose start time (from the run's start) is < deadline, capped at max_steps;
        elapsed is their total duration. Closed form, equal to looping step_time up to rounding.
        """
        if max_steps <= 0 or deadline <= 0.0:
            return 0, 0.0
        if num_seqs <= 0:  # every step is empty and takes 0 s, so all of them start at t=0
            return max_steps, 0.0
        return self.decode_run_times(num_seqs, context_tokens, max_steps).cut(deadline)

    def decode_run_times(self, batch: int, context: int, num_steps: int) -> DecodeRunTimes:
        """The step start times of a decode run (batch >= 1 sequences holding ``context`` computed tokens,
        num_steps >= 1), for callers that ask ``decode_run``'s questions of one run again and again.

        Step i costs a1 + b1*i for i < split and a2 + b2*i after (overheads included): compute(i) = ac + bc*i
        and memory(i) = am + bm*i; whichever is larger at i=0 holds until the lines cross, at i > (gap at 0)
        / (difference of slopes), if the other line is steeper.
        """
        first_kv = context + batch
        ac = self._s_token * batch + self._s_pair * first_kv + self._s_fixed
        bc = self._s_pair * batch
        am = self._s_weights + self._s_kv * first_kv + self._s_fixed
        bm = self._s_kv * batch
        (a1, b1), (a2, b2) = ((ac, bc), (am, bm)) if ac > am else ((am, bm), (ac, bc))
        if b2 <= b1:
            return DecodeRunTimes(num_steps, num_steps, a1, b1, a2, b2)
        cross = (a1 - a2) / (b2 - b1)  # line 2 is larger for i > cross
        split = num_steps if cross >= num_steps else math.floor(cross) + 1
        return DecodeRunTimes(num_steps, split, a1, b1, a2, b2)

    def decode_cost_ratio(self, batch_size: int, mean_context: float) -> float:
        """(decode step at batch B, context c per sequence) / B, over the per-token time of a 1024-token prefill.

        The decode step has n = B and pairs = kv = B * (c + 1) (each sequence's context after the step).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        after = batch_size * (mean_context + 1.0)
        return self.step_time(batch_size, after, after) / batch_size / self._prefill_s_per_token

    def num_kv_blocks(self, block_size: int) -> int:
        """floor(kv_room / (block_size * kv_bytes_per_token)), kv_room as in `_kv_room_bytes`."""
        return max(0, math.floor(self._kv_room_bytes() / (block_size * self.model.kv_bytes_per_token)))

    STEP_MODEL = "whole-step roofline step model"

    def describe(self) -> str:
        """One line: gpu, model, tp, KV capacity, step model."""
        tokens = self.num_kv_blocks(1)
        return (
            f"{self.model.name} on {self.tp}x {self.gpu.name}: KV capacity {tokens:,} tokens "
            f"({tokens * self.model.kv_bytes_per_token / 1e9:.1f} GB at gpu_memory_utilization "
            f"{self.gpu_memory_utilization}); {self.STEP_MODEL}"
        )

    def __repr__(self) -> str:
        return f"LatencyModel({self.describe()})"
