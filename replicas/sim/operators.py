"""Per-operator latency model of one vLLM engine step, fitted to measured GPU operator timings.

Replaces the whole-step roofline (latency.py) on every GPU that profiles.yaml gives a ``calibration`` entry
(fitted by calibrate.py; docs/results/calibration.md has the fit and its errors). The step is the SUM of its
operators -- matmuls, attention's KV reads and the rest run one after the other -- not a max over the step.

Step terms (as in latency.py, plus one): n tokens computed, pairs attention pairs, kv KV tokens read, and
seqs = requests scheduled (vLLM computes logits at each request's last scheduled position, partial prefills
included, so seqs tokens go through the LM head). X = pairs - kv: the attention pairs beyond one per KV token
read, 0 for a pure decode step, (p-1)p/2 for a prefill of p tokens from scratch.

Shapes, per GPU (tp GPUs split heads and the MLP; norms and residuals are replicated):
    W   = h(Hq + 2 Hkv)D + Hq D h + 3 h F     linear weights per layer (qkv, o, gated up, down), / tp
    Wh  = h V                                 LM head weights, / tp
    Bkv = 2 max(1, Hkv/tp) D s                KV bytes per token per layer (K and V)
    Be  = s (7h + 2 (Hq + Hkv) D / tp + 3 F / tp)   elementwise bytes per token per layer: two RMS norms
          (read, write: 2h each), residual add (3h), rotary on q and k (read, write), SiLU-and-mul (3F)
    roof(W, n) = max(2 W n / F_peak, W s / BW)   one GEMM's roofline, F_peak / BW the GPU's datasheet peaks

Per layer:
    linear(n)      = roof(W, q(n)) * u_lin(q(n))          u_lin = 1 / efficiency, piecewise linear in log2
                                                          between the fitted knots, constant outside;
                     q(n) = n up to one tile, else n rounded up to whole tiles (GEMM wave quantization:
                     measured times step up just past each multiple of ``linear_tile_tokens``)
    elementwise(n) = sqrt(e_fixed^2 + (Be n / (BW e_eff))^2)   launch-bound floor, then bandwidth-bound
    attention      = a_fixed + kv Bkv / (BW a_eff) + [X > 0] 4 (Hq/tp) D X / F_peak * u_pre(X)
                     (u_pre piecewise linear in log2(X) over knots at X = p(p-1)/2)
    kv_write(n)    = w_fixed + n Bkv / (BW w_eff)
    allreduce(n)   = 2 (ar_latency + n h s / ar_bandwidth)    tp > 1 only: after attention and after the MLP
Per step:
    step = overhead + L (linear + elementwise + attention + kv_write + allreduce)
           + n 2 h s / (BW e_eff)          (embedding lookup)
           + roof(Wh, q(seqs)) u_lin(q(seqs))   (LM head on the sampled tokens)
    0 when n == 0.

Decode runs: step i of B sequences at C computed tokens has n = seqs = B, X = 0, kv = C + B(i+1): the step
time is one line a + b i (b = L B Bkv / (BW a_eff)), so ``DecodeRunTimes`` sums runs exactly in closed form.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from halffull.replicas.sim.latency import DecodeRunTimes, GpuSpec, LatencyModel, ModelSpec, load_profiles

GROUPS = ("linear", "elementwise", "attention", "kv_write", "allreduce", "lm_head", "overhead")
MEMO_LIMIT = 1 << 16  # entries per step-time memo keyed by more than a batch size (bounds long runs' memory)


@dataclass(frozen=True)
class Knots:
    """A curve y(x), piecewise linear in log2(x) through (xs, ys), constant beyond the first and last knot."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __post_init__(self):
        if len(self.xs) != len(self.ys) or not self.xs or list(self.xs) != sorted(set(self.xs)) or self.xs[0] <= 0:
            raise ValueError(f"knots need increasing positive xs matching ys, got {self.xs} / {self.ys}")
        object.__setattr__(self, "_logs", tuple(math.log2(x) for x in self.xs))

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, x)
        logs = self._logs
        w = (math.log2(x) - logs[i - 1]) / (logs[i] - logs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])

    def weights(self, x: float) -> list[float]:
        """The interpolation weights of each knot at x (y(x) = sum(w_k * ys[k])): what a linear fit solves."""
        w = [0.0] * len(self.xs)
        if x <= self.xs[0] or x >= self.xs[-1]:
            w[0 if x <= self.xs[0] else -1] = 1.0
            return w
        i = bisect.bisect_right(self.xs, x)
        frac = (math.log2(x) - self._logs[i - 1]) / (self._logs[i] - self._logs[i - 1])
        w[i - 1], w[i] = 1.0 - frac, frac
        return w


@dataclass(frozen=True)
class GpuCalibration:
    """One GPU's fitted constants (profiles.yaml ``calibration``; the module docstring defines each)."""

    source: str
    u_linear: Knots  # over tokens
    linear_tile_tokens: int
    elementwise_eff: float
    elementwise_fixed_s: float
    attn_decode_eff: float
    attn_fixed_s: float
    u_attn_prefill: Knots  # over X = p(p-1)/2, stored by p
    kv_write_eff: float
    kv_write_fixed_s: float
    allreduce: Mapping[int, tuple[float, float]]  # tp -> (latency s, bandwidth bytes/s)

    @classmethod
    def from_yaml(cls, gpu: str, entry: Mapping) -> GpuCalibration:
        """Parse a profiles.yaml calibration entry; unknown or missing keys fail."""
        keys = {"source", "linear_tokens", "linear_inv_eff", "linear_tile_tokens", "elementwise_eff", "elementwise_fixed_s",
                "attn_decode_eff", "attn_fixed_s", "attn_prefill_tokens", "attn_prefill_inv_eff", "kv_write_eff",
                "kv_write_fixed_s", "allreduce"}
        if set(entry) != keys:
            raise ValueError(f"calibration {gpu!r}: unknown keys {sorted(set(entry) - keys)}, "
                             f"missing {sorted(keys - set(entry))}")
        prefill_p = [float(p) for p in entry["attn_prefill_tokens"]]
        return cls(
            source=str(entry["source"]),
            u_linear=Knots(tuple(float(n) for n in entry["linear_tokens"]),
                           tuple(float(u) for u in entry["linear_inv_eff"])),
            u_attn_prefill=Knots(tuple(prefill_pairs(p) for p in prefill_p),
                                 tuple(float(u) for u in entry["attn_prefill_inv_eff"])),
            linear_tile_tokens=int(entry["linear_tile_tokens"]),
            allreduce={int(tp): (float(v[0]), float(v[1])) for tp, v in entry["allreduce"].items()},
            **{k: float(entry[k]) for k in ("elementwise_eff", "elementwise_fixed_s", "attn_decode_eff",
                                            "attn_fixed_s", "kv_write_eff", "kv_write_fixed_s")},
        )


def tile_tokens(n: int, tile: int) -> int:
    """q(n): n up to one tile, else n rounded up to a whole number of tiles."""
    return n if n <= tile else -(-n // tile) * tile


def prefill_pairs(p: float) -> float:
    """X of a prefill of p tokens from an empty cache: p(p+1)/2 pairs minus p KV tokens read = p(p-1)/2."""
    return p * (p - 1) / 2


@dataclass(frozen=True)
class Shapes:
    """Per-GPU sizes of one model at tensor-parallel degree tp (module docstring)."""

    layers: int
    linear_params: float  # W
    head_params: float  # Wh
    kv_bytes: float  # Bkv
    elementwise_bytes: float  # Be
    embedding_bytes: float  # 2 h s, per token
    attn_flops_per_pair: float  # 4 (Hq/tp) D
    allreduce_bytes: float  # h s, per token
    dtype_bytes: int

    @classmethod
    def of(cls, m: ModelSpec, tp: int) -> Shapes:
        if m.ffn_size <= 0 or m.vocab_size <= 0:
            raise ValueError(f"model {m.name!r} needs ffn_size and vocab_size for the per-operator model")
        h, d, s = m.hidden_size, m.head_dim, m.dtype_bytes
        per_layer = h * (m.num_q_heads + 2 * m.num_kv_heads) * d + m.num_q_heads * d * h + 3 * h * m.ffn_size
        return cls(
            layers=m.num_layers,
            linear_params=per_layer / tp,
            head_params=h * m.vocab_size / tp,
            kv_bytes=2 * max(1.0, m.num_kv_heads / tp) * d * s,
            elementwise_bytes=s * (7 * h + 2 * (m.num_q_heads + m.num_kv_heads) * d / tp + 3 * m.ffn_size / tp),
            embedding_bytes=2 * h * s,
            attn_flops_per_pair=4 * m.num_q_heads / tp * d,
            allreduce_bytes=h * s,
            dtype_bytes=s,
        )


class OperatorLatencyModel(LatencyModel):
    """``LatencyModel`` with the per-operator step time (module docstring); KV capacity is unchanged."""

    STEP_MODEL = "per-operator step model (calibrated)"

    def __init__(self, gpu: GpuSpec, model: ModelSpec, tp: int = 1, *, calibration: GpuCalibration, **engine):
        cal, shapes = calibration, Shapes.of(model, tp)
        if tp > 1 and tp not in cal.allreduce:
            raise ValueError(f"no all-reduce calibration for tp={tp} on {gpu.name}; have {sorted(cal.allreduce)}")
        self.calibration, self.shapes = cal, shapes
        self._ar = cal.allreduce[tp] if tp > 1 else None
        # seconds per KV token read (all layers), per the rest of the step by n and by seqs (memoised: a
        # simulation sees few distinct batch sizes)
        self._s_kv_read = shapes.layers * shapes.kv_bytes / (gpu.hbm_bw * cal.attn_decode_eff)
        self._by_tokens: dict[int, float] = {}
        self._by_seqs: dict[int, float] = {}
        # step_time's hot path, memoised on its exact arguments (pure functions of them, so a hit returns the
        # very float a miss computes): the n and seqs terms together, by n for a decode step (seqs = n) and
        # by (n, seqs) otherwise, and the prefill attention term by X. A run of the Azure conversation trace
        # asks ~48k step times of ~5.5k shapes and ~2.4k X values.
        self._by_decode: dict[int, float] = {}
        self._by_shape: dict[tuple[int, int], float] = {}
        self._by_extra_pairs: dict[int, float] = {}
        super().__init__(gpu, model, tp, **engine)

    # --- operators (seconds) ---------------------------------------------------------------------------

    def _gemm(self, params: float, n: int) -> float:
        """roof(params, q(n)) * u_lin(q(n))."""
        n = tile_tokens(n, self.calibration.linear_tile_tokens)
        compute = 2.0 * params * n / self.gpu.peak_flops
        memory = params * self.shapes.dtype_bytes / self.gpu.hbm_bw
        return (compute if compute > memory else memory) * self.calibration.u_linear(n)

    def breakdown(self, num_tokens: int, attn_pairs: int, kv_tokens_read: int,
                  num_seqs: int | None = None) -> dict[str, float]:
        """Seconds per operator group of one step (``GROUPS``; the embedding counts as elementwise)."""
        n, seqs = num_tokens, num_tokens if num_seqs is None else num_seqs
        if n <= 0:
            return dict.fromkeys(GROUPS, 0.0)
        cal, sh, bw, L = self.calibration, self.shapes, self.gpu.hbm_bw, self.shapes.layers
        extra_pairs = attn_pairs - kv_tokens_read
        prefill = 0.0
        if extra_pairs > 0:
            prefill = sh.attn_flops_per_pair * extra_pairs / self.gpu.peak_flops * cal.u_attn_prefill(extra_pairs)
        elementwise = math.hypot(cal.elementwise_fixed_s, sh.elementwise_bytes * n / (bw * cal.elementwise_eff))
        allreduce = 0.0
        if self._ar is not None:
            allreduce = 2.0 * (self._ar[0] + n * sh.allreduce_bytes / self._ar[1])
        return {
            "linear": L * self._gemm(sh.linear_params, n),
            "elementwise": L * elementwise + n * sh.embedding_bytes / (bw * cal.elementwise_eff),
            "attention": L * (cal.attn_fixed_s + prefill) + self._s_kv_read * kv_tokens_read,
            "kv_write": L * (cal.kv_write_fixed_s + n * sh.kv_bytes / (bw * cal.kv_write_eff)),
            "allreduce": L * allreduce,
            "lm_head": self._gemm(sh.head_params, seqs) if seqs > 0 else 0.0,
            "overhead": self.step_overhead_s,
        }

    # --- the step time, as the simulator asks it -------------------------------------------------------

    def _tokens_part(self, n: int) -> float:
        """Every term that depends on n alone (overhead included), memoised."""
        t = self._by_tokens.get(n)
        if t is None:
            b = self.breakdown(n, 0, 0, 0)
            t = self._by_tokens[n] = sum(b.values())
        return t

    def _seqs_part(self, seqs: int) -> float:
        """The LM head on ``seqs`` sampled tokens, memoised."""
        t = self._by_seqs.get(seqs)
        if t is None:
            t = self._by_seqs[seqs] = self._gemm(self.shapes.head_params, seqs) if seqs > 0 else 0.0
        return t

    def _fixed_part(self, num_tokens: int, num_seqs: int) -> float:
        """_tokens_part(n) + _seqs_part(seqs): the step minus its KV-read and prefill-attention terms."""
        key = (num_tokens, num_seqs)
        t = self._by_shape.get(key)
        if t is None:
            t = self._tokens_part(num_tokens) + self._seqs_part(num_seqs)
            if len(self._by_shape) < MEMO_LIMIT:
                self._by_shape[key] = t
        return t

    def _decode_part(self, batch: int) -> float:
        """_fixed_part(batch, batch): every scheduled token is sampled."""
        t = self._by_decode.get(batch)
        if t is None:
            t = self._by_decode[batch] = self._tokens_part(batch) + self._seqs_part(batch)
        return t

    def _prefill_attention(self, extra_pairs: int) -> float:
        """The attention FLOPs of X = extra_pairs pairs beyond one per KV token read, all layers."""
        t = self._by_extra_pairs.get(extra_pairs)
        if t is None:
            sh = self.shapes
            t = (sh.layers * sh.attn_flops_per_pair * extra_pairs / self.gpu.peak_flops
                 * self.calibration.u_attn_prefill(extra_pairs))
            if len(self._by_extra_pairs) < MEMO_LIMIT:
                self._by_extra_pairs[extra_pairs] = t
        return t

    def step_time(self, num_tokens: int, attn_pairs: int, kv_tokens_read: int, num_seqs: int | None = None) -> float:
        """Sum of the operator times (module docstring); 0 if no tokens. num_seqs defaults to num_tokens
        (a pure decode step: every scheduled token is sampled)."""
        if num_tokens <= 0:
            return 0.0
        # (the memo lookups of _decode_part and _fixed_part inlined: this runs for every step not in a run)
        if num_seqs is None or num_seqs == num_tokens:
            fixed = self._by_decode.get(num_tokens)
            if fixed is None:
                fixed = self._decode_part(num_tokens)
        else:
            fixed = self._by_shape.get((num_tokens, num_seqs))
            if fixed is None:
                fixed = self._fixed_part(num_tokens, num_seqs)
        t = fixed + self._s_kv_read * kv_tokens_read
        extra_pairs = attn_pairs - kv_tokens_read
        if extra_pairs > 0:  # a prefill chunk is in the step (a decode token attends to exactly its KV)
            prefill = self._by_extra_pairs.get(extra_pairs)
            t += self._prefill_attention(extra_pairs) if prefill is None else prefill
        return t

    def decode_run_times(self, batch: int, context: int, num_steps: int) -> DecodeRunTimes:
        """Step i costs a + b*i: a = step_time(B, C+B, C+B), b = (seconds per KV token read) * B."""
        fixed = self._by_decode.get(batch)
        if fixed is None:
            fixed = self._decode_part(batch)
        s_kv = self._s_kv_read
        a = fixed + s_kv * (context + batch)
        b = s_kv * batch
        return DecodeRunTimes(num_steps, num_steps, a, b, a, b)


@functools.cache
def calibration_for(gpu: str) -> GpuCalibration:
    """profiles.yaml's calibration entry of ``gpu``, parsed (cached)."""
    return GpuCalibration.from_yaml(gpu, load_profiles().calibration[gpu])
