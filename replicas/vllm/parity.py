"""Scheduler parity: halffull's engine core against vLLM's real V1 scheduler, decision for decision.

Both schedulers get the same request stream: the same prompt lengths with the same random token ids (so
prefix hashing agrees), the same output lengths (vLLM: ``max_tokens`` + ``ignore_eos``), arrivals at the same
steps. They also get the same limits: block size, KV blocks (vLLM's ``num_gpu_blocks`` = halffull's + 1, for
vLLM's null block), ``max_num_batched_tokens``, ``max_num_seqs``, ``max_model_len``. No model runs: vLLM's
scheduler is built from a VllmConfig of the tiny Llama (its config.json only) and a one-group
KVCacheConfig. It is stepped with a fake ``ModelRunnerOutput`` that samples the workload's next token for
every request whose computed tokens caught up.

Compared every step: tokens scheduled per request, admissions (with their prefix-hit tokens), preemptions,
finished requests, and free KV blocks after the step. A step matches when all of these are equal.

    python -m halffull.replicas.vllm.parity              # the standard matrix (below), about 30 s
    python -m halffull.replicas.vllm.parity --single [--policy larry] [--no-full-isl] [--no-prefix-caching] ...

Both engines run vLLM 0.32's defaults unless a row says otherwise: prefix caching on and the
``scheduler_reserve_full_isl`` admission gate (halffull: ``SchedulerConfig.reserve_full_isl``). The standard
matrix and its result are printed by the command above and quoted in the README.

Two divergences this harness found were fixed in halffull's engine (not emulated here):

1. Free-queue order (vLLM ``v1/core/block_pool.py``, ``BlockPool.free_blocks``): freed blocks without a block
   hash are prepended (reused first), hashed ones appended (LRU); vLLM hashes every block as it fills, so a
   finished request's computed blocks go to the tail. halffull appended everything and hashed private blocks
   only at preemption, so its decode allocations evicted cached blocks a preempted request was about to find
   again (first seen at step 131 of the default stream: r36 re-found 176 cached tokens instead of 192).
2. Admission gate ``scheduler_reserve_full_isl`` (vLLM 0.32 ``SchedulerConfig``, default True): the WAITING
   loop admits a request only if blocks for its whole current sequence (after hits, plus the watermark) fit;
   halffull checked only the chunk scheduled now (first seen at step 124: it admitted r36's 246-token chunk
   into 16 free blocks, vLLM refused its 271-token prompt, and halffull preempted r36 a step later).

Things that agree by construction and are worth knowing: vLLM's usable blocks are ``num_gpu_blocks - 1``;
vLLM applies the watermark when ``self.running`` is non-empty, halffull when something is scheduled this
step (the same thing whenever the WAITING loop runs).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

from halffull.replicas.engine.policies import EnginePolicy, make_engine_policy
from halffull.replicas.engine.request import Request as HfRequest
from halffull.replicas.engine.scheduler import Scheduler as HfScheduler
from halffull.replicas.engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class ParityConfig:
    """A request stream and engine limits. ``num_gpu_blocks`` counts vLLM's null block."""

    num_requests: int = 800
    arrivals_per_step: float = 0.25
    min_prompt: int = 4
    max_prompt: int = 512
    min_output: int = 1
    max_output: int = 256
    num_gpu_blocks: int = 129
    block_size: int = 16
    max_num_batched_tokens: int = 256
    max_num_seqs: int = 32
    max_model_len: int = 1024
    shared_prefix_fraction: float = 0.0  # requests that start with one of a few shared system prompts
    num_shared_prefixes: int = 4
    shared_prefix_len: int = 96
    policy: str = "fcfs"
    policy_params: dict[str, Any] = field(default_factory=dict)
    reserve_full_isl: bool = True  # vLLM 0.32's scheduler_reserve_full_isl (its default), in both engines
    enable_prefix_caching: bool = True
    # vLLM side: "vllm" (its own Scheduler; fcfs only), "halffull" (HalffullScheduler), "halffull_async"
    # (HalffullAsyncScheduler, stepped synchronously), "auto" ("vllm" for fcfs, else "halffull").
    vllm_scheduler: str = "auto"
    step_seconds: float = 0.02  # the clock both engines see (LARRY's aging)
    max_steps: int = 200_000
    seed: int = 0


@dataclass(frozen=True)
class Workload:
    arrivals: dict[int, list[tuple[str, list[int], int]]]  # step -> [(request id, prompt ids, output len)]
    output_tokens: dict[str, list[int]]  # the token each request samples, in order

    @property
    def num_requests(self) -> int:
        return len(self.output_tokens)


def make_workload(cfg: ParityConfig) -> Workload:
    """Log-uniform prompt and output lengths, Bernoulli arrivals per step, distinct random token ids."""
    rng = random.Random(cfg.seed)
    arrivals: dict[int, list] = {}
    outputs: dict[str, list[int]] = {}
    prefixes = [[rng.randrange(3, 512) for _ in range(cfg.shared_prefix_len)] for _ in range(cfg.num_shared_prefixes)]
    step = 0
    for i in range(cfg.num_requests):
        while rng.random() > cfg.arrivals_per_step:
            step += 1
        prompt = _log_uniform(rng, cfg.min_prompt, cfg.max_prompt)
        out = _log_uniform(rng, cfg.min_output, cfg.max_output)
        rid = f"r{i}"
        ids = []
        if prefixes and rng.random() < cfg.shared_prefix_fraction:
            ids = list(prefixes[rng.randrange(len(prefixes))])
            prompt = max(prompt, len(ids) + 1)
        ids += [rng.randrange(3, 512) for _ in range(prompt - len(ids))]
        out = min(out, cfg.max_model_len - prompt)
        arrivals.setdefault(step, []).append((rid, ids, out))
        outputs[rid] = [rng.randrange(3, 512) for _ in range(out)]
    return Workload(arrivals, outputs)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    import math

    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


@dataclass(frozen=True)
class StepDecision:
    scheduled: dict[str, int]  # request id -> tokens scheduled
    admitted: dict[str, int]  # request id -> prefix-hit tokens at admission
    preempted: frozenset[str]
    finished: frozenset[str]
    num_free_blocks: int

    def kinds_differing(self, other: "StepDecision") -> list[str]:
        return [k for k in ("scheduled", "admitted", "preempted", "finished", "num_free_blocks")
                if getattr(self, k) != getattr(other, k)]


# ---- the two engines -----------------------------------------------------------------------------------
class HalffullSide:
    def __init__(self, cfg: ParityConfig, policy: EnginePolicy):
        self.sched = HfScheduler(
            SchedulerConfig(
                num_blocks=cfg.num_gpu_blocks - 1, block_size=cfg.block_size,
                max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                max_model_len=cfg.max_model_len, enable_prefix_caching=cfg.enable_prefix_caching,
                reserve_full_isl=cfg.reserve_full_isl,
            ),
            policy,
        )
        self.cfg = cfg
        self.num_preemptions = 0

    def add(self, rid: str, ids: list[int], out: int, now: float) -> None:
        self.sched.add_request(HfRequest(rid, len(ids), out, now, prompt_token_ids=ids))

    def step(self, now: float) -> StepDecision:
        s = self.sched
        out = s.schedule(now)
        finished = s.update_from_output(out, now)
        self.num_preemptions += len(out.preempted)
        return StepDecision(
            scheduled={r.request_id: n for r, n in out.num_scheduled_tokens.items()},
            admitted={r.request_id: out.computed_before[r] for r in out.admitted},
            preempted=frozenset(r.request_id for r in out.preempted),
            finished=frozenset(r.request_id for r in finished),
            num_free_blocks=s.pool.num_free_blocks,
        )

    def has_work(self) -> bool:
        return self.sched.has_work()


class VllmSide:
    """vLLM's real scheduler, no model: a fake runner samples the workload's next token per request."""

    def __init__(self, cfg: ParityConfig, workload: Workload, scheduler_cls: type, model_dir: str, **kwargs: Any):
        import torch
        from vllm.engine.arg_utils import EngineArgs
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager

        from halffull.replicas.vllm import tiny_model

        self._Request, self._SamplingParams, self._ModelRunnerOutput = Request, SamplingParams, ModelRunnerOutput
        vllm_config = EngineArgs(
            model=model_dir, skip_tokenizer_init=True, block_size=cfg.block_size, max_model_len=cfg.max_model_len,
            max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
            num_gpu_blocks_override=cfg.num_gpu_blocks, enforce_eager=True, async_scheduling=False,
            scheduler_reserve_full_isl=cfg.reserve_full_isl, enable_prefix_caching=cfg.enable_prefix_caching,
        ).create_engine_config()
        vllm_config.cache_config.num_gpu_blocks = cfg.num_gpu_blocks
        spec = FullAttentionSpec(
            block_size=cfg.block_size, num_kv_heads=tiny_model.NUM_KV_HEADS,
            head_size=tiny_model.HIDDEN_SIZE // tiny_model.NUM_HEADS, dtype=torch.bfloat16,
        )
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(tiny_model.NUM_LAYERS)]
        kv_cache_config = KVCacheConfig(
            num_blocks=cfg.num_gpu_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)]
        )
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._hasher = get_request_block_hasher(cfg.block_size, hash_fn)
        self.sched = scheduler_cls(
            vllm_config=vllm_config, kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(vllm_config), block_size=cfg.block_size,
            log_stats=False, **kwargs,
        )
        self.workload = workload
        self.num_preemptions = 0

    def add(self, rid: str, ids: list[int], out: int, now: float) -> None:
        params = self._SamplingParams(max_tokens=out, ignore_eos=True)
        self.sched.add_request(
            self._Request(rid, list(ids), params, None, arrival_time=now, block_hasher=self._hasher)
        )

    def step(self, now: float) -> StepDecision:
        s = self.sched
        waiting_before = {rid for rid, r in s.requests.items() if r.status.name in ("WAITING", "PREEMPTED")}
        out = s.schedule()
        scheduled = dict(out.num_scheduled_tokens)
        admitted = {}
        sampled = []
        for rid in scheduled:
            r = s.requests[rid]
            # _update_after_schedule advanced num_computed_tokens by the scheduled tokens.
            computed_before = r.num_computed_tokens - scheduled[rid]
            if rid in waiting_before:
                admitted[rid] = computed_before
            if r.num_computed_tokens >= r.num_tokens:
                sampled.append([self.workload.output_tokens[rid][r.num_output_tokens]])
            else:
                sampled.append([])  # partial prefill chunk
        req_ids = list(scheduled)
        runner_out = self._ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={rid: i for i, rid in enumerate(req_ids)}, sampled_token_ids=sampled,
        )
        before = set(s.requests)
        s.update_from_output(out, runner_out)
        finished = before - set(s.requests)
        self.num_preemptions += len(out.preempted_req_ids)
        return StepDecision(
            scheduled=scheduled, admitted=admitted, preempted=frozenset(out.preempted_req_ids),
            finished=frozenset(finished), num_free_blocks=s.kv_cache_manager.block_pool.get_num_free_blocks(),
        )

    def has_work(self) -> bool:
        return self.sched.has_requests()


# ---- the comparison ------------------------------------------------------------------------------------
@dataclass
class ParityResult:
    config: ParityConfig
    vllm_scheduler: str
    num_steps: int = 0
    num_matching: int = 0
    first_divergence: int | None = None
    divergences: list[tuple[int, list[str], StepDecision, StepDecision]] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    vllm_preemptions: int = 0
    halffull_preemptions: int = 0
    wall_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.num_matching / self.num_steps if self.num_steps else 1.0

    def summary(self) -> str:
        c = self.config
        lines = [
            f"parity {c.policy}: vLLM {self.vllm_scheduler} vs halffull engine; {c.num_requests} requests, "
            f"{c.num_gpu_blocks - 1} usable blocks x {c.block_size}, budget {c.max_num_batched_tokens}, "
            f"max_num_seqs {c.max_num_seqs}, scheduler_reserve_full_isl={c.reserve_full_isl}",
            f"identical decisions on {self.num_matching}/{self.num_steps} steps = {100 * self.rate:.2f}%",
            f"preemptions: vLLM {self.vllm_preemptions}, halffull {self.halffull_preemptions}",
        ]
        if self.first_divergence is not None:
            lines.append(f"first divergence at step {self.first_divergence}; differing fields: {self.kinds}")
            for step, kinds, v, h in self.divergences[:3]:
                lines.append(f"  step {step} {kinds}:")
                for k in kinds:
                    lines.append(f"    vLLM     {k} = {_short(getattr(v, k))}")
                    lines.append(f"    halffull {k} = {_short(getattr(h, k))}")
        lines.append(f"wall {self.wall_s:.1f}s")
        return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items(), key=lambda kv: int(kv[0][1:]))) + "}"
    if isinstance(value, frozenset):
        return "{" + ", ".join(sorted(value, key=lambda r: int(r[1:]))) + "}"
    return str(value)


def write_model_config(out_dir: str) -> str:
    """Only config.json of the tiny Llama: all vLLM needs to build a VllmConfig without running the model."""
    from halffull.replicas.vllm.tiny_model import llama_config

    llama_config().save_pretrained(out_dir)
    return out_dir


def run_parity(cfg: ParityConfig, model_dir: str | None = None, *, keep: int = 20) -> ParityResult:
    """Step both engines through the same workload, one step at a time, comparing every step."""
    start = time.perf_counter()
    if model_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_parity(cfg, write_model_config(tmp), keep=keep)
    workload = make_workload(cfg)
    clock = _StepClock()
    vllm, name = _vllm_side(cfg, workload, model_dir, clock)
    ours = HalffullSide(cfg, make_engine_policy(cfg.policy, cfg.policy_params))
    result = ParityResult(cfg, name)
    step = 0
    added = 0
    while step < cfg.max_steps:
        now = step * cfg.step_seconds
        clock.now = now
        for rid, ids, out in workload.arrivals.get(step, ()):
            vllm.add(rid, ids, out, now)
            ours.add(rid, ids, out, now)
            added += 1
        if added == workload.num_requests and not (vllm.has_work() or ours.has_work()):
            break
        v, h = vllm.step(now), ours.step(now)
        result.num_steps += 1
        kinds = v.kinds_differing(h)
        if kinds:
            if result.first_divergence is None:
                result.first_divergence = step
            for k in kinds:
                result.kinds[k] = result.kinds.get(k, 0) + 1
            if len(result.divergences) < keep:
                result.divergences.append((step, kinds, v, h))
        else:
            result.num_matching += 1
        step += 1
    result.vllm_preemptions, result.halffull_preemptions = vllm.num_preemptions, ours.num_preemptions
    result.wall_s = time.perf_counter() - start
    return result


def _vllm_side(cfg: ParityConfig, workload: Workload, model_dir: str, clock: "_StepClock") -> tuple[VllmSide, str]:
    kind = cfg.vllm_scheduler
    if kind == "auto":
        kind = "vllm" if cfg.policy == "fcfs" else "halffull"
    if kind == "vllm":
        if cfg.policy != "fcfs":
            raise ValueError("vLLM's own Scheduler only runs fcfs; use vllm_scheduler='halffull'")
        from vllm.v1.core.sched.scheduler import Scheduler

        return VllmSide(cfg, workload, Scheduler, model_dir), "Scheduler"
    from halffull.replicas.vllm.scheduler import HalffullAsyncScheduler, HalffullScheduler

    classes = {"halffull": HalffullScheduler, "halffull_async": HalffullAsyncScheduler}
    if kind not in classes:
        raise ValueError(f"unknown vllm_scheduler {kind!r}; valid: auto, vllm, {', '.join(classes)}")
    cls = classes[kind]
    policy = make_engine_policy(cfg.policy, cfg.policy_params)
    return VllmSide(cfg, workload, cls, model_dir, engine_policy=policy, clock=clock), f"{cls.__name__}({cfg.policy})"


class _StepClock:
    """The clock both engines see: the current step's time (LARRY's aging), never the wall clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


LARRY_LIFETIME = dict(lifetime_reserve=True, memory_time_order=True, memory_time_victim=True, queue_order=True,
                     queue_tokens_low=512)

# The standard runs of ``python -m halffull.replicas.vllm.parity``: (label, overrides of the base config).
MATRIX: list[tuple[str, dict[str, Any]]] = [
    ("fcfs, vLLM defaults (prefix caching, full-ISL gate)", dict()),
    ("fcfs, full-ISL gate off in both", dict(reserve_full_isl=False)),
    ("fcfs, prefix caching off", dict(enable_prefix_caching=False)),
    ("fcfs, 50% shared prefixes", dict(shared_prefix_fraction=0.5)),
    ("fcfs, small pool (64 blocks, budget 128)", dict(seed=2, num_gpu_blocks=65, max_num_batched_tokens=128)),
    ("larry in vLLM (HalffullScheduler) vs larry in halffull", dict(policy="larry")),
    ("larry, HalffullAsyncScheduler stepped synchronously", dict(policy="larry", vllm_scheduler="halffull_async")),
    ("larry + lifetime planning and queue order (elements 4-7) in vLLM vs halffull",
     dict(policy="larry", policy_params=LARRY_LIFETIME)),
]


def run_matrix(base: ParityConfig, rows: list[tuple[str, dict[str, Any]]] = MATRIX) -> list[tuple[str, ParityResult]]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_config(tmp)
        return [(label, run_parity(replace(base, **overrides), model_dir)) for label, overrides in rows]


def format_matrix(results: list[tuple[str, ParityResult]]) -> str:
    width = max(len(label) for label, _ in results)
    lines = [f"{'run':<{width}}  {'identical':>9}  {'steps':>6}  {'preempt vLLM/halffull':>21}  first divergence"]
    for label, r in results:
        first = "-" if r.first_divergence is None else f"step {r.first_divergence}"
        lines.append(f"{label:<{width}}  {100 * r.rate:8.2f}%  {r.num_steps:>6}  "
                     f"{f'{r.vllm_preemptions}/{r.halffull_preemptions}':>21}  {first}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    d = ParityConfig()
    p = argparse.ArgumentParser(
        description="Step vLLM's V1 scheduler and halffull's engine through the same requests; print the share of "
                    "steps with identical decisions. Without --single: the standard matrix of runs.")
    p.add_argument("--single", action="store_true", help="one run with the flags below, with divergence details")
    p.add_argument("--policy", default=d.policy, help="engine policy in both engines (default fcfs)")
    p.add_argument("--requests", type=int, default=d.num_requests)
    p.add_argument("--num-gpu-blocks", type=int, default=d.num_gpu_blocks, help="vLLM's, incl. its null block")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--budget", type=int, default=d.max_num_batched_tokens, help="max_num_batched_tokens")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--arrivals-per-step", type=float, default=d.arrivals_per_step)
    p.add_argument("--shared-prefix-fraction", type=float, default=d.shared_prefix_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-full-isl", action="store_true",
                   help="turn vLLM 0.32's scheduler_reserve_full_isl admission gate off in both engines")
    p.add_argument("--no-prefix-caching", action="store_true", help="prefix caching off in both engines")
    p.add_argument("--vllm-scheduler", default=d.vllm_scheduler, choices=["auto", "vllm", "halffull", "halffull_async"],
                   help="vLLM side: its own Scheduler (fcfs only), HalffullScheduler or HalffullAsyncScheduler "
                        "(default auto: vLLM's for fcfs, else HalffullScheduler)")
    args = p.parse_args(argv)
    cfg = ParityConfig(
        num_requests=args.requests, num_gpu_blocks=args.num_gpu_blocks, block_size=args.block_size,
        max_num_batched_tokens=args.budget, max_num_seqs=args.max_num_seqs,
        arrivals_per_step=args.arrivals_per_step, shared_prefix_fraction=args.shared_prefix_fraction,
        policy=args.policy, seed=args.seed,
        reserve_full_isl=not args.no_full_isl, enable_prefix_caching=not args.no_prefix_caching,
        vllm_scheduler=args.vllm_scheduler,
    )
    if args.single:
        result = run_parity(cfg)
        print(result.summary())
        return 0
    start = time.perf_counter()
    results = run_matrix(cfg)
    print(f"{cfg.num_requests} requests (seed {cfg.seed}), {cfg.num_gpu_blocks - 1} usable KV blocks x "
          f"{cfg.block_size} tokens, max_num_batched_tokens {cfg.max_num_batched_tokens}, max_num_seqs "
          f"{cfg.max_num_seqs}; fcfs rows use vLLM's own Scheduler class")
    print(format_matrix(results))
    for label, r in results:
        if r.first_divergence is not None:
            print(f"\n{label}:\n{r.summary()}")
    print(f"\nwall {time.perf_counter() - start:.1f}s; divergence kinds are explained in the module docstring")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    sys.exit(main())
