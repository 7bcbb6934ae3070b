"""Tests for the simulated engine's roofline latency model (replicas/sim/latency.py)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.replicas.sim.latency import GpuSpec, LatencyModel, ModelSpec, list_profiles, load_profiles


def h100_8b(**overrides) -> LatencyModel:
    return LatencyModel.from_profile("h100", "llama3-8b", **overrides)


def loop_decode_run(lm: LatencyModel, batch: int, context: int, max_steps: int, deadline: float):
    """Reference for decode_run: step_time one step at a time."""
    elapsed, k = 0.0, 0
    for i in range(max_steps):
        if elapsed >= deadline:
            break
        kv = context + batch * (i + 1)
        elapsed += lm.step_time(batch, kv, kv)
        k += 1
    return k, elapsed


# --- sanity targets (measured vLLM ranges) ---------------------------------------------------------


def test_h100_8b_single_sequence_decode_is_6_to_8_ms():
    assert 6e-3 <= h100_8b().step_time(1, 129, 129) <= 8e-3


def test_h100_8b_1000_token_prefill_is_25_to_50_ms():
    assert 25e-3 <= h100_8b().prefill_time(1000) <= 50e-3


def test_h100_8b_kv_capacity_is_a_few_hundred_thousand_tokens():
    # vLLM at gpu_memory_utilization=0.9 reports a few hundred thousand KV tokens for Llama-3-8B on
    # one H100-80GB (16 GB of weights, 128 KiB of KV per token): accept 200k-600k.
    assert 200_000 <= h100_8b().num_kv_blocks(1) <= 600_000


@pytest.mark.parametrize("gpu, relation", [("a100", "slower"), ("h200", "faster")], ids=["a100-slower", "h200-faster"])
@pytest.mark.parametrize("model", ["llama3-8b", "llama3-70b"])
def test_decode_vs_h100(gpu, relation, model):
    other = LatencyModel.from_profile(gpu, model).step_time(1, 129, 129)
    h100 = LatencyModel.from_profile("h100", model).step_time(1, 129, 129)
    assert (other > h100) if relation == "slower" else (other < h100)


# --- formulas ------------------------------------------------------------------------------------


def test_kv_bytes_per_token_llama3_8b():
    assert load_profiles().models["llama3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB


@pytest.mark.parametrize(
    "num_tokens, attn_pairs, kv, bound",
    [(1, 100, 100, "memory"), (4096, 4096 * 4097 // 2, 4096, "compute")],
    ids=["decode-memory-bound", "prefill-compute-bound"],
)
def test_step_time_is_roofline_max_plus_overhead(num_tokens, attn_pairs, kv, bound):
    lm = h100_8b()
    compute, memory = lm.compute_time(num_tokens, attn_pairs), lm.memory_time(kv)
    assert (compute > memory) == (bound == "compute")
    assert lm.step_time(num_tokens, attn_pairs, kv) == pytest.approx(max(compute, memory) + lm.step_overhead_s)


def test_zero_tokens_take_no_time():
    assert h100_8b().step_time(0, 0, 5000) == 0.0


def test_tp_adds_allreduce_latency_to_each_step():
    lm = LatencyModel.from_profile("h100", "llama3-70b", tp=4)
    overhead = lm.step_time(1, 10, 10) - lm.memory_time(10)
    assert overhead > lm.step_overhead_s
    assert overhead == pytest.approx(lm.step_overhead_s + 2 * 80 * load_profiles().engine["allreduce_latency_s"])


@pytest.mark.parametrize(
    "vary",
    ["num_tokens", "attn_pairs", "kv_tokens_read"],
)
@pytest.mark.parametrize("profile", [("h100", "llama3-8b"), ("a10g", "llama3-70b")], ids=["h100-8b", "a10g-70b"])
def test_more_work_is_never_faster(vary, profile):
    lm = LatencyModel.from_profile(*profile)
    base = {"num_tokens": 1, "attn_pairs": 1, "kv_tokens_read": 1}
    times = [lm.step_time(**(base | {vary: x})) for x in (1, 8, 64, 512, 4096, 32768, 1 << 24)]
    assert times == sorted(times)
    assert times[-1] > times[0]


def test_prefill_time_grows_with_length():
    lm = h100_8b()
    times = [lm.prefill_time(n) for n in (1, 16, 256, 1024, 4096, 8192)]
    assert times == sorted(times)


# --- decode_run ----------------------------------------------------------------------------------


def crossover_inside(lm: LatencyModel, batch: int, context: int, max_steps: int) -> bool:
    """Whether the bound (compute vs memory) differs between the run's first and last step."""

    def compute_bound(i):
        kv = context + batch * (i + 1)
        return lm.compute_time(batch, kv) > lm.memory_time(kv)

    return compute_bound(0) != compute_bound(max_steps - 1)


DECODE_RUNS = [
    # (profile, B, C, max_steps, deadline)
    (("h100", "llama3-8b"), 1, 0, 1, math.inf),
    (("h100", "llama3-8b"), 1, 500, 300, math.inf),
    (("h100", "llama3-8b"), 8, 8000, 2000, math.inf),
    (("h100", "llama3-8b"), 8, 8000, 2000, 0.5),  # deadline cuts mid-run
    (("h100", "llama3-8b"), 32, 100, 5000, 1e-9),  # first step always starts
    (("h100", "llama3-8b"), 400, 400, 3000, math.inf),  # compute -> memory crossover inside
    (("h100", "llama3-8b"), 400, 400, 3000, 10.0),  # crossover, then deadline in memory part
    (("h100", "llama3-8b"), 400, 400, 3000, 0.3),  # deadline in the compute part
    (("a100", "llama3-8b"), 256, 1000, 4000, 7.3),
    (("h100", "llama3-70b"), 64, 64 * 2000, 1000, 2.0),
    (("l4", "llama3-8b"), 3, 10, 100, 0.75),
    (("h100", "llama3-8b"), 16, 0, 50, 100.0),  # deadline past the end: capped at max_steps
]


@pytest.mark.parametrize(
    "profile, batch, context, max_steps, deadline",
    DECODE_RUNS,
    ids=[f"{p[0]}-{p[1]}-B{b}-C{c}-n{n}-d{d}" for p, b, c, n, d in DECODE_RUNS],
)
def test_decode_run_equals_step_loop(profile, batch, context, max_steps, deadline):
    lm = LatencyModel.from_profile(*profile)
    k, elapsed = lm.decode_run(batch, context, max_steps, deadline)
    ref_k, ref_elapsed = loop_decode_run(lm, batch, context, max_steps, deadline)
    assert k == ref_k
    assert elapsed == pytest.approx(ref_elapsed, rel=1e-9)


def test_decode_run_grid_includes_a_crossover_and_a_cut():
    lm = h100_8b()
    assert crossover_inside(lm, 400, 400, 3000)
    assert lm.decode_run(8, 8000, 2000, 0.5)[0] < 2000


@settings(max_examples=300, deadline=None)
@given(
    profile=st.sampled_from([(g, m) for g, m, _ in list_profiles()]),
    batch=st.integers(1, 2000),
    context=st.integers(0, 300_000),
    max_steps=st.integers(1, 400),
    deadline=st.one_of(st.just(math.inf), st.floats(1e-6, 30.0)),
)
def test_decode_run_equals_step_loop_property(profile, batch, context, max_steps, deadline):
    lm = LatencyModel.from_profile(*profile)
    k, elapsed = lm.decode_run(batch, context, max_steps, deadline)
    ref_k, ref_elapsed = loop_decode_run(lm, batch, context, max_steps, deadline)
    assert k == ref_k
    assert elapsed == pytest.approx(ref_elapsed, rel=1e-9)


@pytest.mark.parametrize("step", [1, 7, 100, 1234, 2999], ids=lambda s: f"step{s}")
@pytest.mark.parametrize("offset", [0.25, 0.5, 0.999], ids=lambda o: f"at{o}")
def test_decode_run_deadline_inside_each_step(step, offset):
    """A deadline a fraction into step j's duration lets exactly steps 0..j start."""
    lm = h100_8b()
    start = loop_decode_run(lm, 400, 400, step, math.inf)[1]
    kv = 400 + 400 * (step + 1)
    deadline = start + offset * lm.step_time(400, kv, kv)
    k, elapsed = lm.decode_run(400, 400, 3000, deadline)
    assert k == step + 1
    assert elapsed == pytest.approx(loop_decode_run(lm, 400, 400, step + 1, math.inf)[1], rel=1e-9)


@pytest.mark.parametrize(
    "max_steps, deadline, expected",
    [(0, 1.0, (0, 0.0)), (10, 0.0, (0, 0.0)), (10, -1.0, (0, 0.0))],
    ids=["no-steps", "zero-deadline", "past-deadline"],
)
def test_decode_run_empty(max_steps, deadline, expected):
    assert h100_8b().decode_run(4, 100, max_steps, deadline) == expected


# --- derived quantities --------------------------------------------------------------------------


def test_decode_cost_ratio_definition():
    lm = h100_8b()
    per_prefill_token = lm.prefill_time(1024) / 1024
    decode = lm.step_time(32, 32 * 501, 32 * 501) / 32
    assert lm.decode_cost_ratio(32, 500) == pytest.approx(decode / per_prefill_token)


def test_decode_cost_ratio_falls_with_batch():
    lm = h100_8b()
    ratios = [lm.decode_cost_ratio(b, 1000) for b in (1, 8, 64, 256)]
    assert ratios == sorted(ratios, reverse=True)


@pytest.mark.parametrize("gpu, model, tp", list_profiles(), ids=[f"{g}-{m}-tp{t}" for g, m, t in list_profiles()])
def test_every_profile_has_kv_capacity(gpu, model, tp):
    lm = LatencyModel.from_profile(gpu, model)
    assert lm.tp == tp
    assert lm.num_kv_blocks(16) * 16 >= lm.model.max_model_len
    assert gpu in lm.describe() and model in lm.describe()


@pytest.mark.parametrize(
    "gpu, model, tp",
    [
        ("h100", "llama3-8b", 1),
        ("h100", "llama3-70b", 4),
        ("a100", "llama3-70b", 4),
        ("a10g", "llama3-70b", 8),
        ("l4", "llama3-70b", 8),
    ],
    ids=lambda v: str(v),
)
def test_default_tp(gpu, model, tp):
    assert LatencyModel.from_profile(gpu, model).tp == tp


def test_num_kv_blocks_formula():
    lm = h100_8b(gpu_memory_utilization=0.5)
    room = 0.5 * lm.gpu.memory_bytes - lm.model.weight_bytes - lm.activation_reserve_bytes
    assert lm.num_kv_blocks(16) == math.floor(room / (16 * lm.model.kv_bytes_per_token))
    assert lm.num_kv_blocks(16) < h100_8b().num_kv_blocks(16)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, valid",
    [({"gpu": "b200"}, "h100"), ({"model": "llama3-405b"}, "llama3-70b")],
    ids=["unknown-gpu", "unknown-model"],
)
def test_unknown_names_list_valid_ones(kwargs, valid):
    with pytest.raises(ValueError, match=valid):
        LatencyModel.from_profile(**kwargs)


def test_70b_on_one_a10g_does_not_fit():
    with pytest.raises(ValueError, match=r"llama3-70b does not fit on 1x a10g"):
        LatencyModel.from_profile("a10g", "llama3-70b", tp=1)


def test_unknown_override_fails():
    with pytest.raises(TypeError):
        LatencyModel.from_profile(step_overhead=0.0)


def test_direct_construction():
    gpu = GpuSpec("toy", peak_flops=1e12, hbm_bw=1e11, memory_bytes=10**10, mfu=1.0, bw_eff=1.0)
    model = ModelSpec("toy", 1e8, 2, 64, 4, 2, 16, 2, 128)
    lm = LatencyModel(gpu, model, step_overhead_s=0.0, activation_reserve_bytes_per_gpu=0)
    assert lm.step_time(1, 1, 0) == pytest.approx(2e8 / 1e11)  # memory-bound: weights / bandwidth
    assert lm.num_kv_blocks(1) == math.floor((0.9e10 - 2e8) / model.kv_bytes_per_token)
