"""HalffullScheduler: halffull's engine policies inside vLLM's V1 scheduler (real vLLM, CPU build).

Three layers:
* pure pieces with no engine: policy selection, the waiting queue (against vLLM's own FCFS queue);
* the scheduler built directly (no model) and stepped by the parity harness's fake runner: victims anywhere
  in the running list, refused admissions, the Admission it hands the policy;
* real in-process engines on the tiny random Llama under forced memory pressure (VLLM_CPU.md): vLLM's
  default scheduler, HalffullScheduler(fcfs) and HalffullScheduler(larry), preemptions read from vLLM's
  own Prometheus counter.
"""

from __future__ import annotations

import math
import random
import time

import pytest

from tests.vllm_support import require_vllm, shutdown_llm

require_vllm()

from vllm import LLM, SamplingParams  # noqa: E402  (the module's one vLLM import, after the skip check)
from vllm.v1.core.sched.request_queue import FCFSRequestQueue  # noqa: E402

from halffull.replicas.engine.policies import Admission, EnginePolicy, FcfsPolicy, make_engine_policy  # noqa: E402
from halffull.replicas.vllm import parity  # noqa: E402
from halffull.replicas.vllm.scheduler import (  # noqa: E402
    ADMISSION_FIELDS,
    HalffullScheduler,
    PolicyRequestQueue,
    policy_from_config,
)
from halffull.replicas.vllm.tiny_model import make_tiny_model  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


# ---- policy selection ------------------------------------------------------------------------------------
class _Cfg:
    def __init__(self, extra):
        self.additional_config = extra


@pytest.mark.parametrize(
    "extra, env, name, params",
    [
        ({}, {}, "fcfs", {}),
        ({}, {"HALFFULL_ENGINE_POLICY": "larry"}, "larry", {"tau": 0.05}),
        ({}, {"HALFFULL_ENGINE_POLICY": "larry", "HALFFULL_ENGINE_PARAMS": '{"tau": 0.2, "u_low": 0.5}'}, "larry",
         {"tau": 0.2, "u_low": 0.5}),
        ({"halffull": {"engine_policy": "priority"}}, {"HALFFULL_ENGINE_POLICY": "larry"}, "priority", {}),
        ({"halffull": {"engine_policy": "larry", "engine_params": {"max_wait_s": 9.0}}}, {}, "larry",
         {"max_wait_s": 9.0}),
        ({"other_plugin": {"x": 1}}, {}, "fcfs", {}),
    ],
    ids=["default-fcfs", "env-name", "env-params", "additional-config-wins", "additional-config-params",
         "foreign-additional-config"],
)
def test_policy_from_config(extra, env, name, params):
    policy = policy_from_config(_Cfg(extra), environ=env)
    described = policy.describe()
    assert described["name"] == name
    for key, value in params.items():
        assert described[key] == value


@pytest.mark.parametrize(
    "extra, env, match",
    [
        ({}, {"HALFFULL_ENGINE_POLICY": "lary"}, "unknown engine policy"),
        ({}, {"HALFFULL_ENGINE_POLICY": "larry", "HALFFULL_ENGINE_PARAMS": '{"taux": 1}'}, "unknown parameter"),
        ({}, {"HALFFULL_ENGINE_PARAMS": "[1, 2]"}, "JSON object"),
        ({"halffull": {"policy": "larry"}}, {}, "unknown key"),
    ],
    ids=["bad-name", "bad-param", "params-not-object", "bad-additional-config-key"],
)
def test_policy_from_config_fails_loudly(extra, env, match):
    with pytest.raises(ValueError, match=match):
        policy_from_config(_Cfg(extra), environ=env)


def test_admission_adapter_fills_every_field():
    # A field added to Admission must be filled by HalffullScheduler._admission (else it keeps its default).
    from dataclasses import fields

    assert {f.name for f in fields(Admission)} == ADMISSION_FIELDS


# ---- the waiting queue -----------------------------------------------------------------------------------
class _Req:
    def __init__(self, i: int):
        self.request_id = f"q{i}"
        self.arrival_time = float(i)

    def __repr__(self):
        return self.request_id


class _NewestFirst(EnginePolicy):
    name = "newest_first"

    def __init__(self):
        self.calls = 0

    def order_waiting(self, waiting, view):
        self.calls += 1
        return sorted(waiting, key=lambda r: -r.arrival_time)


def _random_ops(queue_a, queue_b, seed: int, steps: int = 400) -> None:
    rng = random.Random(seed)
    counter = 0
    held: list[_Req] = []
    for _ in range(steps):
        op = rng.choice(["add", "add", "pop", "peek", "prepend", "prepend_many", "remove", "remove_many"])
        if op == "add":
            r = _Req(counter)
            counter += 1
            queue_a.add_request(r)
            queue_b.add_request(r)
        elif op in ("pop", "peek") and queue_a:
            a = getattr(queue_a, f"{op}_request")()
            b = getattr(queue_b, f"{op}_request")()
            assert a is b
            if op == "pop":
                held.append(a)
        elif op == "prepend" and held:
            r = held.pop(rng.randrange(len(held)))
            queue_a.prepend_request(r)
            queue_b.prepend_request(r)
        elif op == "prepend_many" and held:
            batch = [held.pop() for _ in range(min(len(held), rng.randint(1, 3)))]
            queue_a.prepend_requests(list(batch))
            queue_b.prepend_requests(list(batch))
        elif op in ("remove", "remove_many") and queue_a:
            items = list(queue_b)
            batch = rng.sample(items, min(len(items), 1 if op == "remove" else 3))
            if op == "remove":
                queue_a.remove_request(batch[0])
                queue_b.remove_request(batch[0])
            else:
                queue_a.remove_requests(batch)
                queue_b.remove_requests(batch)
        assert len(queue_a) == len(queue_b) and bool(queue_a) == bool(queue_b)
        assert list(queue_a) == list(queue_b)


@pytest.mark.parametrize("seed", range(5))
def test_fcfs_queue_behaves_exactly_like_vllms(seed):
    _random_ops(PolicyRequestQueue(FcfsPolicy(), view=None), FCFSRequestQueue(), seed)


def test_policy_order_is_computed_once_per_step_and_after_changes():
    policy = _NewestFirst()
    q = PolicyRequestQueue(policy, view=None)
    reqs = [_Req(i) for i in range(4)]
    for r in reqs:
        q.add_request(r)
    q.new_step()
    assert q.peek_request() is reqs[3]
    assert q.pop_request() is reqs[3]
    assert q.peek_request() is reqs[2]  # the step's order is kept while vLLM pops from it
    assert policy.calls == 1
    q.prepend_request(reqs[3])  # a preemption or a skipped request changes the queue: new order
    assert q.peek_request() is reqs[3] and policy.calls == 2
    q.add_request(_Req(9))
    assert q.peek_request().request_id == "q9" and policy.calls == 3
    q.new_step()
    q.peek_request()
    assert policy.calls == 4
    assert [r.request_id for r in q] == ["q9", "q3", "q2", "q1", "q0"]
    with pytest.raises(IndexError):
        PolicyRequestQueue(policy, view=None).peek_request()


# ---- the scheduler built directly, stepped by the parity harness ----------------------------------------
@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return parity.write_model_config(str(tmp_path_factory.mktemp("tiny-config")))


class _FirstRunningVictim(FcfsPolicy):
    """Preempts the *first* running request: one already scheduled earlier in the same step."""

    name = "first_victim"

    def pick_victim(self, running, view):
        return running[0]


class _RecordingGate(FcfsPolicy):
    """Admits nothing while ``closed``; records every Admission it is shown."""

    name = "gate"

    def __init__(self):
        self.closed = False
        self.seen: list[Admission] = []

    def can_admit(self, admission, view):
        self.seen.append(admission)
        return not self.closed


def _direct(config_dir, policy, **overrides):
    cfg = parity.ParityConfig(**{"num_requests": 150, **overrides})
    workload = parity.make_workload(cfg)
    side = parity.VllmSide(cfg, workload, HalffullScheduler, config_dir, engine_policy=policy)
    return cfg, workload, side


def _drive(side, workload, max_steps=20_000):
    added = 0
    steps = []
    for step in range(max_steps):
        for rid, ids, out in workload.arrivals.get(step, ()):
            side.add(rid, ids, out, float(step))
            added += 1
        if added == workload.num_requests and not side.has_work():
            return steps
        steps.append(side.step(float(step)))
    raise AssertionError("workload did not finish")


def test_victim_scheduled_earlier_in_the_step_is_unscheduled_cleanly(config_dir):
    cfg, workload, side = _direct(config_dir, _FirstRunningVictim(), num_gpu_blocks=49)
    steps = _drive(side, workload)
    preempting = [d for d in steps if d.preempted]
    assert len(preempting) > 10, "the workload must force preemptions"
    for d in preempting:
        # vLLM's PRIORITY branch took the victim's tokens back: it is not in this step's batch.
        assert not (d.preempted & set(d.scheduled)), d
    sched = side.sched
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == cfg.num_gpu_blocks - 1  # nothing leaked
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched._marked_victim is None


def test_victims_keep_their_priority(config_dir):
    _, workload, side = _direct(config_dir, make_engine_policy("larry"), num_gpu_blocks=49)
    seen = {}
    original = side.sched._preempt_request

    def preempt(request, *args, **kwargs):
        original(request, *args, **kwargs)
        seen[request.request_id] = request.priority

    side.sched._preempt_request = preempt
    _drive(side, workload)
    assert seen and set(seen.values()) == {0}


def test_refused_admission_blocks_the_queue_and_admission_counts(config_dir):
    gate = _RecordingGate()
    cfg, workload, side = _direct(config_dir, gate, num_requests=3, arrivals_per_step=1.0)
    gate.closed = True
    for rid, ids, out in workload.arrivals[0]:
        side.add(rid, ids, out, 0.0)
    first = side.step(0.0)
    assert first.scheduled == {} and len(gate.seen) == 1  # head-of-line: the first refusal ends admission
    adm = gate.seen[0]
    request = adm.request
    bs, budget = cfg.block_size, cfg.max_num_batched_tokens
    chunk = min(request.num_tokens, budget)
    assert (adm.num_hit_tokens, adm.num_new_tokens) == (0, chunk)
    assert adm.blocks_now == -(-chunk // bs)
    assert adm.blocks_prompt == -(-request.num_tokens // bs)
    assert adm.blocks_full == -(-min(request.num_prompt_tokens + request.max_tokens, cfg.max_model_len) // bs)
    gate.closed = False
    assert side.step(1.0).scheduled  # open again: admitted


# ---- real engines under memory pressure -----------------------------------------------------------------
NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 16, 20, 200
ENGINE_ARGS = dict(
    kv_cache_memory_bytes=64 << 20,  # bound the KV cache (else vLLM reserves 92% of RAM)
    num_gpu_blocks_override=24,  # 23 usable blocks of 32 tokens: 3 requests at full length
    block_size=32,
    max_model_len=224,
    enforce_eager=True,
    disable_log_stats=False,  # LLM.get_metrics needs stats
    seed=0,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


def test_make_tiny_model_subcommand_is_deterministic(model_dir, tmp_path):
    import argparse
    import hashlib
    import os

    from halffull.replicas.vllm.tiny_model import register

    parser = argparse.ArgumentParser(prog="halffull")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["make-tiny-model", str(tmp_path / "again"), "--seed", "0"])
    assert args.func(args) == 0

    def digest(d):
        return {name: hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest() for name in os.listdir(d)}

    assert digest(str(tmp_path / "again")) == digest(model_dir)
    config = open(os.path.join(model_dir, "config.json")).read()
    assert '"hidden_size": 128' in config and '"vocab_size": 512' in config


def _prompts():
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(PROMPT_LEN)]} for _ in range(NUM_REQUESTS)]


def _preemptions(llm) -> int:
    for metric in llm.get_metrics():
        if metric.name in ("vllm:num_preemptions", "vllm:num_preemptions_total"):
            return int(metric.value)
    raise AssertionError("vLLM reported no preemption counter")


def _run_engine(model_dir, **kwargs):
    start = time.perf_counter()
    llm = LLM(model=model_dir, **ENGINE_ARGS, **kwargs)
    try:
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        params = SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True, temperature=0.0)
        outputs = llm.generate(_prompts(), params, use_tqdm=False)
        return {
            "preemptions": _preemptions(llm),
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "scheduler": type(sched).__name__,
            "policy": sched.engine_policy.describe() if hasattr(sched, "engine_policy") else None,
            "wall_s": time.perf_counter() - start,
        }
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="module")
def engine_runs(model_dir):
    runs = {"vllm": _run_engine(model_dir)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HALFFULL_ENGINE_POLICY", "fcfs")  # chosen through the environment
        runs["fcfs"] = _run_engine(model_dir, scheduler_cls="halffull.replicas.vllm.scheduler.HalffullScheduler")
    larry = {"halffull": {"engine_policy": "larry", "engine_params": {"tau": 0.05}}}  # through vLLM's config
    runs["larry"] = _run_engine(model_dir, scheduler_cls=HalffullScheduler, additional_config=larry)
    summary = ", ".join(f"{k}: {v['preemptions']} preemptions ({v['wall_s']:.1f}s)" for k, v in runs.items())
    print(f"\n[vllm] {NUM_REQUESTS} requests x {OUTPUT_LEN} tokens, 23 blocks x 32: {summary}")
    return runs


def test_policies_reach_the_engine(engine_runs):
    assert engine_runs["vllm"]["scheduler"] == "Scheduler"
    assert engine_runs["fcfs"]["scheduler"] == engine_runs["larry"]["scheduler"] == "HalffullScheduler"
    assert engine_runs["fcfs"]["policy"]["name"] == "fcfs"
    assert engine_runs["larry"]["policy"]["name"] == "larry"


def test_every_request_completes(engine_runs):
    for name, run in engine_runs.items():
        assert [len(t) for t in run["tokens"]] == [OUTPUT_LEN] * NUM_REQUESTS, name


def test_vllm_default_preempts_under_pressure(engine_runs):
    assert engine_runs["vllm"]["preemptions"] >= 5


def test_fcfs_subclass_is_vllms_default(engine_runs):
    vllm, fcfs = engine_runs["vllm"], engine_runs["fcfs"]
    assert fcfs["preemptions"] == vllm["preemptions"]
    assert fcfs["tokens"] == vllm["tokens"]  # same schedule, same batches, same greedy tokens


def test_larry_preempts_less_than_vllm(engine_runs):
    vllm, larry = engine_runs["vllm"]["preemptions"], engine_runs["larry"]["preemptions"]
    assert larry < vllm, f"larry {larry} vs vLLM default {vllm}"


# ---- long outputs (reasoning-shaped): varied, mostly long outputs behind short prompts -------------------
# 24 requests, 12-token prompts, max_tokens drawn once from a lognormal (median 60, sigma 1, capped at 200):
# long and varied outputs, so memory fills as running requests grow, the regime LARRY's lifetime planning
# (replicas/engine/larry.py, elements 4-6) is for. Preemptions are vLLM's own counter.
LONG_PROMPT_LEN, LONG_NUM = 12, 24


def _long_requests():
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(LONG_PROMPT_LEN)]} for _ in range(LONG_NUM)]
    outputs = [max(1, min(200, round(rng.lognormvariate(math.log(60), 1.0)))) for _ in range(LONG_NUM)]
    return prompts, outputs


def _run_long(model_dir, **kwargs):
    prompts, outputs = _long_requests()
    llm = LLM(model=model_dir, **ENGINE_ARGS, **kwargs)
    try:
        params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in outputs]
        done = llm.generate(prompts, params, use_tqdm=False)
        return {"preemptions": _preemptions(llm), "lengths": [len(o.outputs[0].token_ids) for o in done]}
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="module")
def long_runs(model_dir):
    lifetime = {"lifetime_reserve": True}
    runs = {
        "vllm": _run_long(model_dir),
        "larry": _run_long(model_dir, scheduler_cls=HalffullScheduler,
                           additional_config={"halffull": {"engine_policy": "larry"}}),
        "larry_lifetime": _run_long(model_dir, scheduler_cls=HalffullScheduler, additional_config={
            "halffull": {"engine_policy": "larry", "engine_params": lifetime}}),
    }
    print("\n[vllm long outputs] " + ", ".join(f"{k}: {v['preemptions']} preemptions" for k, v in runs.items()))
    return runs


def test_long_outputs_complete(long_runs):
    _, outputs = _long_requests()
    # 288 prompt + 1,558 output tokens against 23 blocks x 32 = 736 slots: 2.5x the cache
    assert LONG_NUM * LONG_PROMPT_LEN + sum(outputs) > 2 * 23 * 32, "the requests must outgrow the KV cache"
    assert max(outputs) > 10 * LONG_PROMPT_LEN, "outputs much longer than prompts"
    for name, run in long_runs.items():
        assert run["lengths"] == outputs, name


def test_long_outputs_vllm_default_thrashes(long_runs):
    assert long_runs["vllm"]["preemptions"] >= 5


@pytest.mark.parametrize("name", ["larry", "larry_lifetime"])
def test_long_outputs_larry_preempts_less_than_vllm(long_runs, name):
    assert long_runs[name]["preemptions"] < long_runs["vllm"]["preemptions"], long_runs
