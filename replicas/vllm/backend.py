"""``VllmBackend``: the Backend of replicas/backend.py over vLLM V1's ``AsyncLLM`` (one engine per replica).

::

    LLMReplica (Serve replica process)                         vLLM engine-core process (spawned by AsyncLLM)
      VllmBackend.generate(request)                              EngineCore busy loop
        AsyncLLM.generate(TokensPrompt, SamplingParams)  --ZMQ-->  ServingScheduler (halffull's scheduler, the
        <-- RequestOutput deltas: new token ids                      app's engine_policy) + the model
      VllmBackend.refresh_stats()
        engine_core.call_utility_async("halffull_routing_stats") --> routing_stats(scheduler), between steps

Engine: ``AsyncEngineArgs`` from ``VllmEngineConfig`` (replicas/vllm/config.py), plus
``additional_config={"halffull": {"engine_policy", "engine_params"}}`` (read by the scheduler,
replicas/vllm/scheduler.py) and ``scheduler_cls``: ``ServingAsyncScheduler`` when vLLM turns async scheduling
on (its default on GPU), else ``ServingScheduler`` (CPU, where vLLM forces it off). Both are halffull's
schedulers with a preemption counter (replicas/vllm/engine_stats.py). ``AsyncLLM`` always runs the engine in
its own process (~15 s start on CPU); the replica's process keeps the tokenizer-free frontend.

Requests: the ingress tokenizes, so the engine gets token ids (``TokensPrompt``) and returns token ids
(``output_kind=DELTA``; ``detokenize`` only with stop strings, which vLLM matches on its own text); the
client's fields (``GenerateRequest.sampling``: temperature, top_p, seed, penalties, stop, logit_bias, and
``response_format`` as ``structured_outputs``; ``min_tokens``) go into ``SamplingParams`` (``sampling_kwargs``),
vLLM's defaults otherwise. ``generate_batches`` yields each delta's new token ids as one list (``generate``: one
id at a time); the ``RequestOutcome`` gets the prompt length, the prefix-cache
hit (``RequestOutput.num_cached_tokens``), output tokens, the request's preemptions (``RequestOutput.metrics``,
present unless ``disable_log_stats``) and the finish reason (vLLM's ``stop`` / ``length`` / ``abort``; anything
else reads as ``abort``). Closing the iterator early (or cancelling its consumer) aborts the request in vLLM
(``AsyncLLM.generate`` does so on GeneratorExit / CancelledError), which frees its KV blocks.

Stats (``stats()``, the dict of replicas/engine/stats.py): the engine-side fields come from the scheduler
object inside the engine process (replicas/vllm/engine_stats.py), fetched by ``refresh_stats()``, which the
replica awaits before publishing (``record_routing_stats``, ``occupancy``); ``num_decode_tokens_remaining`` is
computed here, as the simulated engine does, from each unfinished request's ``max_tokens`` and tokens so far
with an ``OutputLengthEstimator`` fed by finished requests; ``decode_cost_ratio`` is 1.0 (no latency model);
``stats_time`` is when the engine answered, so a stuck engine's stats go stale for the router.

Environment (set before vLLM is imported, so the engine process inherits it), unless the process has them
already: ``VLLM_HOST_IP`` = this Ray node's IP (vLLM's torch.distributed rendezvous binds there: 127.0.0.1 on
a loopback-only local cluster), ``VLLM_NO_USAGE_STATS=1`` and ``DO_NOT_TRACK=1`` (nothing phones home); then
``VllmEngineConfig.env``, which always applies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Mapping

from halffull.replicas.backend import GenerateRequest, RequestOutcome
from halffull.replicas.sim.realtime import EngineDeadError, EngineOverloadedError
from halffull.replicas.vllm.config import VllmEngineConfig
from halffull.router.estimate import OutputLengthEstimator

logger = logging.getLogger(__name__)

SCHEDULER = "halffull.replicas.vllm.engine_stats.ServingScheduler"
ASYNC_SCHEDULER = "halffull.replicas.vllm.engine_stats.ServingAsyncScheduler"
STATS_TIMEOUT_S = 5.0
FINISH_REASONS = {"stop": "stop", "length": "length"}  # vLLM's; anything else (abort, error) reads as abort


def engine_environment(config: VllmEngineConfig, node_ip: str | None,
                       environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables to set for vLLM in this replica and its engine process (see the module docstring): the
    defaults where ``environ`` does not set them already, then ``config.env``."""
    defaults = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if node_ip:
        defaults["VLLM_HOST_IP"] = node_ip
    env = {k: v for k, v in defaults.items() if k not in environ}
    env.update(config.env)
    return env


def sampling_kwargs(sampling: Mapping[str, Any], structured_outputs_cls: Any) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for a request's ``sampling`` (replicas/backend.py ``SAMPLING_FIELDS``).

    The plain fields pass as they are; ``stop`` also turns detokenization on (vLLM finds stop strings in its
    own detokenized text; without stop strings it is off: the ingress decodes the token ids itself);
    ``response_format`` becomes ``structured_outputs`` (json_object, or the json_schema's schema).
    """
    kwargs = dict(sampling)
    kwargs["detokenize"] = bool(kwargs.get("stop"))
    response_format = kwargs.pop("response_format", None)
    if response_format is not None:
        if response_format["type"] == "json_object":
            kwargs["structured_outputs"] = structured_outputs_cls(json_object=True)
        elif response_format["type"] == "json_schema":
            kwargs["structured_outputs"] = structured_outputs_cls(json=response_format["json_schema"]["schema"])
    return kwargs


class VllmBackend:
    """One ``AsyncLLM`` engine behind the Backend interface (see the module docstring). Construct it inside
    the replica's event loop (Serve runs deployment constructors there)."""

    def __init__(self, config: VllmEngineConfig, engine_policy: str = "fcfs",
                 engine_params: Mapping[str, Any] | None = None, *, node_ip: str | None = None):
        os.environ.update(engine_environment(config, node_ip))
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        try:
            from vllm.inputs import tokens_input  # an engine input: no tokenizer, no deprecation warning
        except ImportError:  # vLLM versions without it take a TokensPrompt dict
            def tokens_input(ids: list[int]) -> dict[str, Any]:
                return {"prompt_token_ids": ids}
        self._SamplingParams, self._DELTA, self._tokens_input = SamplingParams, RequestOutputKind.DELTA, tokens_input
        self._StructuredOutputsParams = StructuredOutputsParams
        args = AsyncEngineArgs(
            **config.engine_kwargs(),
            additional_config={"halffull": {"engine_policy": engine_policy,
                                            "engine_params": dict(engine_params or {})}},
        )
        vllm_config = args.create_engine_config()
        # The scheduler class follows vLLM's own choice of sync / async scheduling (made just above).
        vllm_config.scheduler_config.scheduler_cls = (
            ASYNC_SCHEDULER if vllm_config.scheduler_config.async_scheduling else SCHEDULER)
        self.scheduler_cls = vllm_config.scheduler_config.scheduler_cls
        self.llm = AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=config.disable_log_stats)
        self._max_model_len = vllm_config.model_config.max_model_len
        self._vocab_size = vllm_config.model_config.get_vocab_size()
        self.estimator = OutputLengthEstimator()
        self._inflight: dict[str, list[int]] = {}  # request id -> [max_tokens, output tokens so far]
        self._engine_stats: dict[str, Any] = {}
        self._stats_time = 0.0
        self._aborts: set[asyncio.Task] = set()
        self.num_finished = 0
        self.num_aborted = 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, *, node_ip: str | None = None) -> "VllmBackend":
        """From the replica's options: ``VllmEngineConfig`` fields plus ``engine_policy`` / ``engine_params``."""
        options = dict(options or {})
        policy = options.pop("engine_policy", "fcfs")
        params = options.pop("engine_params", None)
        return cls(VllmEngineConfig.from_dict(options), policy, params, node_ip=node_ip)

    # ---- the backend interface ------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def validate(self, request: GenerateRequest) -> None:
        """Raise ValueError if vLLM would refuse ``request`` (the ingress maps it to a 400)."""
        ids = request.prompt_token_ids
        if len(ids) < 1:
            raise ValueError("prompt must have at least one token")
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(ids) + request.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the model's "
                             f"context length {self.max_model_len}")
        if not all(0 <= t < self._vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self._vocab_size})")
        if request.request_id in self._inflight:
            raise ValueError(f"duplicate request id {request.request_id!r}")

    async def generate(self, request: GenerateRequest, outcome: RequestOutcome | None = None) -> AsyncIterator[int]:
        """Output token ids one at a time (``generate_batches``, flattened)."""
        batches = self.generate_batches(request, outcome)
        try:
            async for batch in batches:
                for token in batch:
                    yield token
        finally:
            await batches.aclose()

    async def generate_batches(self, request: GenerateRequest,
                               outcome: RequestOutcome | None = None) -> AsyncIterator[list[int]]:
        """Output token ids as vLLM produces them, one list per ``RequestOutput`` delta: one engine step's
        tokens while the consumer keeps up; AsyncLLM's output collector merges the deltas of the steps it
        missed when it lags. Closing this iterator early aborts the request."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        self.check_health()
        self.validate(request)
        outcome = outcome if outcome is not None else RequestOutcome()
        outcome.num_prompt_tokens = len(request.prompt_token_ids)
        params = self._SamplingParams(max_tokens=request.max_tokens, ignore_eos=request.ignore_eos,
                                      min_tokens=request.min_tokens, output_kind=self._DELTA,
                                      **sampling_kwargs(request.sampling, self._StructuredOutputsParams))
        rid = request.request_id
        entry = self._inflight[rid] = [request.max_tokens, 0]
        stream = self.llm.generate(self._tokens_input(list(request.prompt_token_ids)), params, rid,
                                   priority=request.priority)
        try:
            async for out in stream:
                if out.num_cached_tokens:
                    outcome.num_cached_tokens = out.num_cached_tokens
                if out.metrics is not None:
                    outcome.num_preemptions = out.metrics.num_preemptions
                completion = out.outputs[0] if out.outputs else None
                if completion is None:
                    continue
                if out.finished:
                    outcome.finish_reason = FINISH_REASONS.get(completion.finish_reason, "abort")
                batch = list(completion.token_ids)
                if batch:
                    outcome.num_output_tokens += len(batch)
                    entry[1] += len(batch)
                    yield batch
        except VllmEngineDead as exc:
            raise EngineDeadError(f"vLLM engine died: {exc!r}") from exc
        except GracefulHTTPError as exc:  # vLLM's admission control (queue full)
            raise EngineOverloadedError(str(exc)) from exc
        except VLLMClientError as exc:  # vLLM refused the request itself
            raise ValueError(str(exc)) from exc
        finally:
            await stream.aclose()  # aborts the request in vLLM if it is still running
            del self._inflight[rid]
            if outcome.finish_reason is None:
                outcome.finish_reason = "abort"
            if outcome.finish_reason == "abort":
                self.num_aborted += 1
            else:
                self.num_finished += 1
                self.estimator.observe(outcome.num_output_tokens)

    def abort(self, request_id: str) -> bool:
        """Abort a running request (asynchronously, in vLLM); False if it is not running here."""
        if request_id not in self._inflight:
            return False
        task = asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        self._aborts.add(task)  # keep a reference until it ran
        task.add_done_callback(self._aborts.discard)
        return True

    async def refresh_stats(self) -> None:
        """Fetch the engine-side stats from the scheduler in the engine process (one utility call, answered
        between two engine steps). On failure the previous stats stay, with their old ``stats_time``."""
        from halffull.replicas.vllm.engine_stats import UTILITY_METHOD

        try:
            stats = await asyncio.wait_for(self.llm.engine_core.call_utility_async(UTILITY_METHOD),
                                           STATS_TIMEOUT_S)
        except Exception as exc:
            logger.warning("halffull vLLM backend: reading engine stats failed: %r", exc)
            return
        self._engine_stats = dict(stats)
        self._stats_time = time.time()

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """The routing stats (replicas/engine/stats.py keys) as of the last ``refresh_stats``."""
        engine = self._engine_stats
        remaining = self.estimator.expected_remaining
        return {
            "num_running": engine.get("num_running", 0),
            "num_waiting": engine.get("num_waiting", 0),
            "num_waiting_prompt_tokens": engine.get("num_waiting_prompt_tokens", 0),
            "num_decode_tokens_remaining": sum(remaining(m, n) for m, n in self._inflight.values()),
            "num_free_blocks": engine.get("num_free_blocks", 0),
            "num_total_blocks": engine.get("num_total_blocks", 0),
            "block_size": engine.get("block_size", 0),
            "decode_cost_ratio": 1.0,
            "num_preemptions": engine.get("num_preemptions", 0),
            "stats_time": self._stats_time,
        }

    def occupancy(self) -> dict[str, Any]:
        """Queues and KV memory (engine side as of the last ``refresh_stats``): after every stream ended or was
        aborted, ``num_unfinished`` and ``num_streams`` are 0 and ``num_free_blocks == num_total_blocks``."""
        engine = self._engine_stats
        return {
            "num_running": engine.get("num_running", 0), "num_waiting": engine.get("num_waiting", 0),
            "num_unfinished": engine.get("num_requests", 0), "num_streams": len(self._inflight),
            "num_free_blocks": engine.get("num_free_blocks", 0),
            "num_total_blocks": engine.get("num_total_blocks", 0),
            "num_finished": self.num_finished, "num_aborted": self.num_aborted,
            "num_preemptions": engine.get("num_preemptions", 0),
            "scheduler": engine.get("scheduler", ""), "engine_policy": engine.get("engine_policy", ""),
        }

    def check_health(self) -> None:
        if self.llm is None:
            raise EngineDeadError("the vLLM engine was shut down")
        if self.llm.errored:
            raise EngineDeadError(f"vLLM engine is dead: {self.llm.dead_error!r}")

    def shutdown(self) -> None:
        """Stop the engine process (the replica's ``__del__``; tests). Idempotent."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
