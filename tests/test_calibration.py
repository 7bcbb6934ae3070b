"""The per-operator latency model against Vidur's measured tables (replicas/sim/calibrate.py, vidur.py)."""

import filecmp
from pathlib import Path

import pytest

from halffull.replicas.sim import calibrate, vidur
from halffull.replicas.sim.latency import PROFILES_PATH, LatencyModel, load_profiles
from halffull.replicas.sim.profile_model import latency_model

FULL_TABLES = Path(__file__).resolve().parents[1].parent / "shared" / "calibration" / "vidur"
REGIMES = [(regime, fit) for regime in ("prefill", "decode B<=32", "decode B>32") for fit in (True, False)]
BOUND = {True: 0.10, False: 0.15}  # fit rows within 10%, held-back rows within 15%


# GPUs fitted on Llama-3-8B tables of their own: A100 (Vidur's), and H100 / H200 once op_timing.py's are shipped
OWN_TABLES = [gpu for gpu in calibrate.OWN_TABLE_GPUS if vidur.has_tables(f"{gpu}_llama3-8b")]


@pytest.fixture(scope="module", params=OWN_TABLES)
def compared(request) -> list[calibrate.Compared]:
    gpu, profiles = request.param, load_profiles()
    old = LatencyModel(profiles.gpus[gpu], profiles.models["llama3-8b"])
    return calibrate.compare(latency_model(gpu, "llama3-8b"), old, name=f"{gpu}_llama3-8b")


@pytest.mark.parametrize("regime, fit", REGIMES, ids=[f"{r}-{'fit' if f else 'held'}" for r, f in REGIMES])
def test_model_is_within_bound_of_every_measured_row(compared, regime, fit):
    rows = [c for c in compared if c.regime == regime and c.fit == fit]
    assert rows
    worst = max(rows, key=lambda c: abs(c.ops_err))
    assert abs(worst.ops_err) <= BOUND[fit], f"{worst.row.label}: {worst.ops_err:+.1%}"
    assert max(abs(c.new_err) for c in rows) <= BOUND[fit]


def test_fit_and_held_back_rows_cover_the_brief(compared):
    fit = [c.row for c in compared if c.fit]
    prefill = sorted(r.num_tokens for r in fit if r.regime == "prefill")
    decode = sorted(r.num_tokens for r in fit if r.regime == "decode")
    assert (prefill[0], prefill[-1]) == (128, 8192) and (decode[0], decode[-1]) == (1, 256)
    held = [c.row for c in compared if not c.fit]
    assert {r.context for r in held if r.regime == "decode"} >= {544, 576, 608, 640, 1984, 2112}
    assert max(r.num_tokens for r in held if r.regime == "prefill") > 8192


def test_the_new_model_beats_the_roofline_in_every_regime(compared):
    for regime, fit in REGIMES:
        rows = [c for c in compared if c.regime == regime and c.fit == fit]
        assert sum(abs(c.new_err) for c in rows) < sum(abs(c.old_err) for c in rows), (regime, fit)


def test_profiles_yaml_holds_what_the_fit_computes():
    text = PROFILES_PATH.read_text()
    assert calibrate.replace_block(text, calibrate.yaml_block(calibrate.fit_all())) == text


def test_shipped_slices_are_small():
    total = sum(f.stat().st_size for f in vidur.SHIPPED_DIR.iterdir())
    assert total < 150_000 + 100_000 * (len(OWN_TABLES) - 1)  # Vidur's slices; a GPU's own tables add ~70 KB
    assert (vidur.SHIPPED_DIR / "LICENSE").read_text().find("MIT License") >= 0


@pytest.mark.skipif(not FULL_TABLES.is_dir(), reason="full Vidur tables not at ../shared/calibration/vidur")
def test_shipped_slices_are_cut_from_the_full_tables(tmp_path):
    vidur.make_slices(FULL_TABLES, tmp_path)
    for path in tmp_path.iterdir():
        assert filecmp.cmp(path, vidur.SHIPPED_DIR / path.name, shallow=False), path.name


@pytest.mark.parametrize("knot", [1, 4096])
def test_h100_carries_the_llama2_ratio(knot):
    """H100 Llama-3-8B linear efficiency = A100's times the H100/A100 ratio fitted on Llama-2-7B."""
    cal = load_profiles().calibration
    i = cal["a100"]["linear_tokens"].index(knot)
    ratio = calibrate.llama2_ratios()["u"][i]
    assert cal["h100"]["linear_inv_eff"][i] == pytest.approx(max(1.0, cal["a100"]["linear_inv_eff"][i] * ratio),
                                                             rel=2e-3)


def test_reference_row_composition():
    """A decode row: linear and elementwise at n = B, decode attention x1.1, KV save, all times 32 layers."""
    ops = vidur.read_ops("a100_llama3-8b")[32]
    att = next(a for a in vidur.read_attention() if not a["is_prefill"] and a["batch_size"] == 32
               and a["kv_cache_size"] == 2048)
    row = next(r for r in vidur.reference_rows() if r.label == "decode B=32 c=2048")
    assert (row.num_tokens, row.attn_pairs, row.kv_tokens, row.num_seqs) == (32, 32 * 2049, 32 * 2049, 32)
    assert row.measured["attention"] == pytest.approx(32 * 1.1 * att["attn_decode"])
    assert row.measured["kv_write"] == pytest.approx(32 * att["attn_kv_cache_save"])
    assert row.measured["linear"] == pytest.approx(32 * sum(ops[o] for o in vidur.LINEAR_OPS))
