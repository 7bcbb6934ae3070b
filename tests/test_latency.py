"""Tests for the simulated engine's latency models: the roofline (replicas/sim/latency.py, a10g/l4 and any
directly built LatencyModel) and the per-operator model (replicas/sim/operators.py, calibrated GPUs)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.replicas.sim.latency import GpuSpec, LatencyModel, ModelSpec, list_profiles, load_profiles

from halffull.replicas.sim.profile_model import latency_model
from halffull.replicas.sim.operators import GROUPS, OperatorLatencyModel


def h100_8b(**overrides) -> LatencyModel:
    return latency_model("h100", "llama3-8b", **overrides)


def roofline(gpu: str = "h100", model: str = "llama3-8b", tp: int = 1) -> LatencyModel:
    """The whole-step roofline with a profile's constants (what latency_model gives uncalibrated GPUs)."""
    profiles = load_profiles()
    return LatencyModel(profiles.gpus[gpu], profiles.models[model], tp)


def build(profile: tuple[str, str]) -> LatencyModel:
    """latency_model, or the roofline for a ("roofline-<gpu>", model) profile."""
    gpu, model = profile
    return roofline(gpu.removeprefix("roofline-"), model) if gpu.startswith("roofline-") else \
        latency_model(gpu, model)


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
    other = latency_model(gpu, model).step_time(1, 129, 129)
    h100 = latency_model("h100", model).step_time(1, 129, 129)
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
    lm = roofline()
    compute, memory = lm.compute_time(num_tokens, attn_pairs), lm.memory_time(kv)
    assert (compute > memory) == (bound == "compute")
    assert lm.step_time(num_tokens, attn_pairs, kv) == pytest.approx(max(compute, memory) + lm.step_overhead_s)


def test_zero_tokens_take_no_time():
    assert h100_8b().step_time(0, 0, 5000) == 0.0


def test_tp_adds_allreduce_latency_to_each_step():
    lm = roofline("h100", "llama3-70b", tp=4)
    overhead = lm.step_time(1, 10, 10) - lm.memory_time(10)
    assert overhead > lm.step_overhead_s
    assert overhead == pytest.approx(lm.step_overhead_s + 2 * 80 * load_profiles().engine["allreduce_latency_s"])


@pytest.mark.parametrize(
    "vary",
    ["num_tokens", "attn_pairs", "kv_tokens_read"],
)
@pytest.mark.parametrize("profile", [("h100", "llama3-8b"), ("a10g", "llama3-70b")], ids=["h100-8b", "a10g-70b"])
def test_more_work_is_never_faster(vary, profile):
    lm = latency_model(*profile)
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
    (("roofline-h100", "llama3-8b"), 400, 400, 3000, math.inf),  # compute -> memory crossover inside
    (("roofline-h100", "llama3-8b"), 400, 400, 3000, 10.0),  # crossover, then deadline in memory part
    (("roofline-h100", "llama3-8b"), 400, 400, 3000, 0.3),  # deadline in the compute part
    (("h100", "llama3-8b"), 400, 400, 3000, 0.3),
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
    lm = build(profile)
    k, elapsed = lm.decode_run(batch, context, max_steps, deadline)
    ref_k, ref_elapsed = loop_decode_run(lm, batch, context, max_steps, deadline)
    assert k == ref_k
    assert elapsed == pytest.approx(ref_elapsed, rel=1e-9)


def test_decode_run_grid_includes_a_crossover_and_a_cut():
    lm = roofline()
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
    lm = latency_model(*profile)
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
    lm = latency_model(gpu, model)
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
    assert latency_model(gpu, model).tp == tp


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
        latency_model(**kwargs)


def test_70b_on_one_a10g_does_not_fit():
    with pytest.raises(ValueError, match=r"llama3-70b does not fit on 1x a10g"):
        latency_model("a10g", "llama3-70b", tp=1)


def test_unknown_override_fails():
    with pytest.raises(TypeError):
        latency_model(step_overhead=0.0)


def test_direct_construction():
    gpu = GpuSpec("toy", peak_flops=1e12, hbm_bw=1e11, memory_bytes=10**10, mfu=1.0, bw_eff=1.0)
    model = ModelSpec("toy", 1e8, 2, 64, 4, 2, 16, 2, 128)
    lm = LatencyModel(gpu, model, step_overhead_s=0.0, activation_reserve_bytes_per_gpu=0)
    assert lm.step_time(1, 1, 0) == pytest.approx(2e8 / 1e11)  # memory-bound: weights / bandwidth
    assert lm.num_kv_blocks(1) == math.floor((0.9e10 - 2e8) / model.kv_bytes_per_token)


# --- per-operator model (calibrated GPUs) ---------------------------------------------------------


@pytest.mark.parametrize("gpu, calibrated", [("a100", True), ("h100", True), ("h200", True), ("a10g", False),
                                             ("l4", False)])
def test_calibrated_gpus_get_the_operator_model(gpu, calibrated):
    assert isinstance(latency_model(gpu, "llama3-8b"), OperatorLatencyModel) == calibrated


@pytest.mark.parametrize("gpu", ["a100", "h100", "h200", "a10g", "l4"])
def test_the_roofline_step_model_is_there_for_every_gpu_with_the_same_kv_capacity(gpu):
    roofline, calibrated = latency_model(gpu, "llama3-8b", step_model="roofline"), latency_model(gpu, "llama3-8b")
    assert type(roofline) is LatencyModel
    assert roofline.num_kv_blocks(16) == calibrated.num_kv_blocks(16)
    assert "roofline" in roofline.describe() and gpu in roofline.describe()
    assert ("per-operator" in calibrated.describe()) == isinstance(calibrated, OperatorLatencyModel)


def test_a_prefill_step_differs_between_the_two_step_models():
    # the calibration moves step times (docs/results/calibration.md): the knob must reach the step time
    roofline, calibrated = latency_model("h100", step_model="roofline"), latency_model("h100")
    assert roofline.step_time(512, 512 * 513 // 2, 512) != calibrated.step_time(512, 512 * 513 // 2, 512)


def test_an_unknown_step_model_fails_with_the_valid_ones():
    with pytest.raises(ValueError, match="calibrated, roofline"):
        latency_model("h100", step_model="vidur")


STEPS = [
    # (num_tokens, attn_pairs, kv_read, num_seqs)
    (1, 129, 129, 1),  # one decode
    (256, 256 * 2049, 256 * 2049, 256),  # large decode batch
    (4096, 4096 * 4097 // 2, 4096, 1),  # one prefill
    (2048 + 64, 1024 * 1024 + 1024 * 1025 // 2 + 64 * 3001, 2048 + 64 * 3001, 65),  # chunk + decodes
]


@pytest.mark.parametrize("step", STEPS, ids=["decode-1", "decode-256", "prefill-4096", "mixed"])
@pytest.mark.parametrize("profile", [("a100", "llama3-8b"), ("h100", "llama3-70b")], ids=["a100-8b", "h100-70b"])
def test_step_time_is_the_sum_of_its_operators(step, profile):
    lm = latency_model(*profile)
    parts = lm.breakdown(*step)
    assert set(parts) == set(GROUPS) and all(v >= 0 for v in parts.values())
    assert lm.step_time(*step) == pytest.approx(sum(parts.values()), rel=1e-12)


def test_lm_head_runs_on_sampled_tokens_only():
    lm = latency_model("a100", "llama3-8b")
    one, every = lm.breakdown(4096, 4096 * 4097 // 2, 4096, 1), lm.breakdown(4096, 4096 * 4097 // 2, 4096, 4096)
    assert every["lm_head"] > 10 * one["lm_head"]
    assert {k: v for k, v in one.items() if k != "lm_head"} == {k: v for k, v in every.items() if k != "lm_head"}


def test_decode_step_defaults_to_every_token_sampled():
    lm = latency_model("a100", "llama3-8b")
    assert lm.step_time(32, 32 * 600, 32 * 600) == lm.step_time(32, 32 * 600, 32 * 600, 32)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_allreduce_is_two_per_layer_from_the_table(tp):
    lm = latency_model("h100", "llama3-70b", tp=tp)
    latency, bandwidth = lm.calibration.allreduce[tp]
    n = 512
    expected = 80 * 2 * (latency + n * 8192 * 2 / bandwidth)
    assert lm.breakdown(n, n * (n + 1) // 2, n, 1)["allreduce"] == pytest.approx(expected)
    assert latency_model("h100", "llama3-8b").breakdown(n, 0, 0, 1)["allreduce"] == 0.0


def test_tp_without_an_allreduce_calibration_fails():
    with pytest.raises(ValueError, match="no all-reduce calibration for tp=16"):
        latency_model("h100", "llama3-70b", tp=16)


@pytest.mark.parametrize("profile", [("a100", "llama3-8b"), ("h200", "llama3-70b")], ids=["a100-8b", "h200-70b"])
def test_decode_run_is_one_line(profile):
    run = latency_model(*profile).decode_run_times(64, 64 * 700, 500)
    assert run.split == run.steps and (run.a1, run.b1) == (run.a2, run.b2) and run.b1 > 0


@pytest.mark.parametrize("batch", [1, 64, 200])
def test_gemm_steps_up_past_a_tile(batch):
    """Tokens are rounded up to whole GEMM tiles: 129..256 tokens cost the same as 256."""
    lm = latency_model("a100", "llama3-8b")
    tile = lm.calibration.linear_tile_tokens
    n = tile + batch if tile + batch <= 2 * tile else 2 * tile
    assert lm.breakdown(n, 0, 0, 0)["linear"] == lm.breakdown(2 * tile, 0, 0, 0)["linear"]


def test_h200_is_h100_compute_with_more_bandwidth():
    h100, h200 = (latency_model(g, "llama3-8b") for g in ("h100", "h200"))
    assert h200.breakdown(1, 129, 129)["linear"] < h100.breakdown(1, 129, 129)["linear"]
    big = 16384  # compute-bound GEMMs: same chip, same efficiency
    assert h200.breakdown(big, 0, 0, 0)["linear"] == pytest.approx(h100.breakdown(big, 0, 0, 0)["linear"])


# --- step-time memo (operators.py): a hit is the very float the uncached formula gives ----------------


def uncached_step_time(lm: OperatorLatencyModel, n: int, pairs: int, kv: int, seqs: int | None = None) -> float:
    """step_time as written before its memo: the same operations in the same order, nothing looked up."""
    if n <= 0:
        return 0.0
    t = lm._tokens_part(n) + lm._seqs_part(n if seqs is None else seqs) + lm._s_kv_read * kv
    extra = pairs - kv
    if extra > 0:
        sh = lm.shapes
        t += sh.layers * sh.attn_flops_per_pair * extra / lm.gpu.peak_flops * lm.calibration.u_attn_prefill(extra)
    return t


MEMO_STEPS = STEPS + [
    # (num_tokens, attn_pairs, kv_read, num_seqs)
    (0, 0, 0, None),  # empty step
    (7, 7 * 301, 7 * 301, None),  # decode, seqs defaulted
    (7, 7 * 301, 7 * 301, 7),  # the same decode, seqs given: one memo entry
    (300, 300 * 301 // 2 + 100 * 300, 400, 0),  # chunk after 100 cached tokens, nothing sampled
    (8192, 8192 * 8193 // 2, 8192, 1),  # the largest default batch
    (3, 3 * 2.5, 3 * 2.5, None),  # float terms (decode_cost_ratio's mean context)
]


@pytest.mark.parametrize("step", MEMO_STEPS, ids=[str(s) for s in MEMO_STEPS])
@pytest.mark.parametrize("profile", [("h100", "llama3-8b"), ("a100", "llama3-8b"), ("h100", "llama3-70b")],
                         ids=["h100-8b", "a100-8b", "h100-70b"])
def test_memoised_step_time_is_exactly_the_uncached_value(step, profile):
    lm, fresh = latency_model(*profile), latency_model(*profile)
    expected = uncached_step_time(fresh, *step)
    assert [lm.step_time(*step), lm.step_time(*step)] == [expected, expected]  # a miss, then a hit


@pytest.mark.parametrize("batch, context", [(1, 128), (7, 7 * 300), (256, 256 * 2048)])
def test_memoised_decode_run_starts_at_the_uncached_step_time(batch, context):
    lm = h100_8b()
    for _ in range(2):  # a miss, then a hit
        run = lm.decode_run_times(batch, context, 10)
        kv = context + batch
        assert run.a1 == uncached_step_time(h100_8b(), batch, kv, kv)
        assert run.b1 == lm._s_kv_read * batch


def test_step_time_memo_is_bounded(monkeypatch):
    from halffull.replicas.sim import operators

    monkeypatch.setattr(operators, "MEMO_LIMIT", 4)
    lm, fresh = h100_8b(), h100_8b()
    for p in range(10, 30):
        step = (p + 3, p * (p + 1) // 2 + 3 * 500, p + 3 * 500, 4)  # a prefill chunk and three decodes
        assert lm.step_time(*step) == uncached_step_time(fresh, *step)
    assert len(lm._by_shape) <= 4 and len(lm._by_extra_pairs) <= 4
