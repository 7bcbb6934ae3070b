"""Parity: halffull's engine core makes vLLM's V1 scheduler decisions, step for step (replicas/vllm/parity.py).

vLLM's real scheduler runs without a model (fake runner output); each case is a few thousand steps with
hundreds of preemptions. Both engines run vLLM 0.32's defaults (prefix caching, the full-ISL admission gate)
unless a case says otherwise. The last case checks the harness is not vacuous: a planted difference must show.
"""

from __future__ import annotations

import pytest

from tests.vllm_support import require_vllm

require_vllm()

import vllm  # noqa: E402,F401  (the module's one vLLM import, after the skip check)

from halffull.replicas.vllm.parity import LARRY_LIFETIME, ParityConfig, run_parity, write_model_config  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return write_model_config(str(tmp_path_factory.mktemp("tiny-config")))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(enable_prefix_caching=False),
        dict(),
        dict(reserve_full_isl=False),
        dict(shared_prefix_fraction=0.5, seed=1),
        dict(seed=2, num_gpu_blocks=65, max_num_batched_tokens=128),
        dict(vllm_scheduler="halffull"),
        dict(policy="larry"),
        dict(policy="larry", vllm_scheduler="halffull_async"),
        dict(policy="priority", enable_prefix_caching=False, vllm_scheduler="halffull"),
        dict(policy="larry", policy_params=LARRY_LIFETIME),
        dict(policy="larry", policy_params={**LARRY_LIFETIME, "lifetime_reserve": False}),
    ],
    ids=["fcfs-no-prefix-cache", "fcfs-vllm-defaults", "fcfs-full-isl-off", "fcfs-shared-prefixes",
         "fcfs-small-pool", "fcfs-via-halffull-scheduler", "larry", "larry-async-scheduler", "priority",
         "larry-lifetime", "larry-memory-time-no-reserve"],
)
def test_identical_decisions(config_dir, overrides):
    result = run_parity(ParityConfig(**overrides), config_dir)
    print(f"\n{result.summary()}")
    assert result.num_steps >= 2000
    if overrides.get("policy", "fcfs") == "fcfs":
        assert result.vllm_preemptions >= 100, "the stream must force preemptions"
    else:
        # the victim code must run; LARRY's memory-time victim (9 here) and lifetime reserve (2) preempt less
        params = overrides.get("policy_params", {})
        minimum = 1 if params.get("lifetime_reserve") else 5 if params.get("memory_time_victim") else 10
        assert result.vllm_preemptions >= minimum
    assert result.rate >= 0.99, result.summary()
    assert result.vllm_preemptions == result.halffull_preemptions


def test_harness_sees_a_planted_difference(config_dir, monkeypatch):
    # halffull keeps the full-ISL admission gate while vLLM runs without it: admissions must differ.
    import halffull.replicas.vllm.parity as parity

    real = parity.SchedulerConfig
    monkeypatch.setattr(parity, "SchedulerConfig", lambda **kw: real(**{**kw, "reserve_full_isl": True}))
    result = run_parity(ParityConfig(reserve_full_isl=False), config_dir)
    assert result.first_divergence is not None
    assert "admitted" in result.divergences[0][1]
    assert result.rate < 0.9
