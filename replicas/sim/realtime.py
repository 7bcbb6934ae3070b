"""One simulated replica on a real asyncio clock: serves requests like a real engine, without a model.

The engine core schedules (replicas/engine/scheduler.py); the executor does not run a model, it sleeps for
the latency model's step time divided by ``speedup`` and then samples placeholder tokens::

    step loop:  wait for work (an asyncio.Event; no busy loop when idle)
                out = scheduler.schedule(now)
                await asyncio.sleep(latency.step_time(out) / speedup)
                scheduler.update_from_output(out, now)    # one token per request whose prefill is complete
                push each sampled token to its request's stream; close the streams of finished requests

Unlike the virtual-time replica (replicas/sim/virtual.py) it steps one token at a time, so every token is
streamed when its step ends (no ``commit_decode_run``).

Requests (``GenerateRequest``) stream token ids through ``generate(request)``, an async generator. The request
enters the scheduler on the first ``__anext__``; closing the generator (``aclose``, garbage collection, or
cancellation of the consumer) before it finished aborts the request, so its KV blocks return to the pool.

The simulated model:
  * output tokens are drawn from ``output_vocab`` with a per-request ``random.Random`` seeded by the prompt
    (so the same prompt gives the same text);
  * unless ``ignore_eos``, it stops at a pseudo-EOS length that depends only on the prompt:
    ``eos_min_tokens + crc32(prompt ids as little-endian uint64) % (eos_max_tokens - eos_min_tokens + 1)``
    (defaults 16..256); ``max_tokens`` always caps the output.

Clock: the scheduler's ``now``, arrival times and ``stats()["stats_time"]`` are wall-clock ``time.time()``
seconds, so a router can compare them with its own time (one host, or NTP-synchronised hosts). Step
durations shrink by ``speedup``; time-based engine-policy parameters (LARRY's ``tau``, ``max_wait_s``) stay in
wall seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import sys
import time
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

from replicas.backend import GenerateRequest, RequestOutcome
from replicas.engine.policies import make_engine_policy
from replicas.engine.request import Request, RequestStatus
from replicas.engine.scheduler import Scheduler, SchedulerConfig
from replicas.engine.stats import engine_stats
from replicas.sim.latency import LatencyModel
from replicas.sim.virtual import step_cost
from router.estimate import OutputLengthEstimator

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_VOCAB: tuple[int, ...] = tuple(range(1000, 1256))


@dataclass(frozen=True)
class SimEngineConfig:
    """Everything that defines one simulated replica. ``None`` sizes come from the latency profile."""

    gpu: str = "h100"
    model: str = "llama3-8b"
    tp: int | None = None
    block_size: int = 16
    num_blocks: int | None = None  # None: the profile's KV capacity
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's
    enable_prefix_caching: bool = True
    engine_policy: str = "fcfs"
    engine_params: Mapping[str, Any] = field(default_factory=dict)
    speedup: float = 1.0  # step durations are divided by this; math.inf: steps take no time
    eos_min_tokens: int = 16
    eos_max_tokens: int = 256
    output_vocab: Sequence[int] | None = None  # None: DEFAULT_OUTPUT_VOCAB

    def __post_init__(self):
        if not self.speedup > 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")
        if not 1 <= self.eos_min_tokens <= self.eos_max_tokens:
            raise ValueError(f"need 1 <= eos_min_tokens <= eos_max_tokens, got {self.eos_min_tokens}, {self.eos_max_tokens}")
        if self.output_vocab is not None and not self.output_vocab:
            raise ValueError("output_vocab must not be empty")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SimEngineConfig":
        """Build from a plain dict (Serve config); unknown keys fail loudly."""
        values = dict(values or {})
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown sim engine option(s) {unknown}; valid: {sorted(valid)}")
        if values.get("speedup") in ("inf", "infinity"):
            values["speedup"] = math.inf
        return cls(**values)


def prompt_crc(prompt_token_ids: Sequence[int]) -> int:
    """crc32 of the prompt ids as little-endian uint64: the seed of everything the simulated model does."""
    ids = array("Q", prompt_token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    return zlib.crc32(ids.tobytes())


def pseudo_eos_tokens(prompt_token_ids: Sequence[int], lo: int, hi: int) -> int:
    """The simulated model's natural output length for a prompt (see the module docstring)."""
    return _eos_length(prompt_crc(prompt_token_ids), lo, hi)


def _eos_length(crc: int, lo: int, hi: int) -> int:
    return lo + crc % (hi - lo + 1)


class _Stream:
    """One request's token queue between the step loop and its consumer."""

    __slots__ = ("queue", "rng", "finished")

    def __init__(self, seed: int):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rng = random.Random(seed)
        self.finished = False


_END = object()


class EngineDeadError(RuntimeError):
    """The step loop crashed; the engine serves nothing more (the replica's health check fails)."""


class AsyncSimEngine:
    """A Scheduler driven by a real-time step loop; see the module docstring."""

    def __init__(
        self,
        scheduler: Scheduler,
        latency: LatencyModel,
        *,
        speedup: float = 1.0,
        eos_min_tokens: int = 16,
        eos_max_tokens: int = 256,
        output_vocab: Sequence[int] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if not speedup > 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.scheduler = scheduler
        self.latency = latency
        self.speedup = float(speedup)
        self.eos_min_tokens = eos_min_tokens
        self.eos_max_tokens = eos_max_tokens
        self.output_vocab = tuple(output_vocab or DEFAULT_OUTPUT_VOCAB)
        self.clock = clock
        self.estimator = OutputLengthEstimator()
        self.num_finished = 0
        self.num_aborted = 0
        self.busy_time = 0.0  # simulated (wall) seconds spent in steps
        self._streams: dict[str, _Stream] = {}
        self._work: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config: SimEngineConfig | Mapping[str, Any] | None = None, **kwargs) -> "AsyncSimEngine":
        if not isinstance(config, SimEngineConfig):
            config = SimEngineConfig.from_dict(config)
        latency = LatencyModel.from_profile(config.gpu, config.model, config.tp)
        sched_config = SchedulerConfig(
            num_blocks=config.num_blocks or latency.num_kv_blocks(config.block_size),
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len or latency.model.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        scheduler = Scheduler(sched_config, make_engine_policy(config.engine_policy, dict(config.engine_params)))
        return cls(
            scheduler, latency, speedup=config.speedup, eos_min_tokens=config.eos_min_tokens,
            eos_max_tokens=config.eos_max_tokens, output_vocab=config.output_vocab, **kwargs,
        )

    # ---- the backend interface ------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def validate(self, request: GenerateRequest) -> None:
        """Raise ValueError if the engine can never run ``request`` (the ingress maps it to a 400)."""
        n = len(request.prompt_token_ids)
        if n < 1:
            raise ValueError("prompt must have at least one token")
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if n + request.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({request.max_tokens}) exceeds the model's context "
                f"length {self.max_model_len}"
            )
        if -(-(n + request.max_tokens) // self.scheduler.block_size) > self.scheduler.num_total_blocks:
            raise ValueError(f"request can never fit in {self.scheduler.num_total_blocks} KV blocks")
        if request.request_id in self._streams:
            raise ValueError(f"duplicate request id {request.request_id!r}")

    async def generate(self, request: GenerateRequest, outcome: RequestOutcome | None = None) -> AsyncIterator[int]:
        """Token ids of ``request`` as they are sampled; closing early aborts the request.

        ``outcome``, if given, counts output tokens as they are yielded and gets the cache hit, preemption
        count and finish reason when the request ends.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine step loop failed: {self._error!r}")
        self.validate(request)
        rid = request.request_id
        ids = list(request.prompt_token_ids)
        crc = prompt_crc(ids)
        eos = _eos_length(crc, self.eos_min_tokens, self.eos_max_tokens)
        req = Request(
            rid, len(ids), request.max_tokens, self.clock(), priority=request.priority, prompt_token_ids=ids,
            stop_after_tokens=None if request.ignore_eos else eos,
        )
        stream = _Stream(crc)
        if outcome is None:
            outcome = RequestOutcome()
        outcome.num_prompt_tokens = len(ids)
        self.scheduler.add_request(req)
        self._streams[rid] = stream
        self._ensure_loop()
        self._work.set()
        try:
            queue = stream.queue
            while True:
                item = await queue.get()
                if item is _END:
                    if req.status == RequestStatus.FINISHED:
                        outcome.finish_reason = "length" if req.num_output_tokens >= req.max_tokens else "stop"
                    return
                if isinstance(item, BaseException):
                    raise item
                outcome.num_output_tokens += 1
                yield item
        finally:
            self._streams.pop(rid, None)
            if not stream.finished:
                self.abort(rid)
            outcome.num_cached_tokens = max(req.num_cached_tokens, 0)
            outcome.num_preemptions = req.num_preemptions
            if outcome.finish_reason is None:
                outcome.finish_reason = "abort"

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is (its blocks return to the pool); False if it is not running."""
        request = self.scheduler.abort(request_id)
        stream = self._streams.get(request_id)
        if stream is not None and not stream.finished:
            stream.finished = True
            stream.queue.put_nowait(_END)
        if request is None:
            return False
        self.num_aborted += 1
        if self._work is not None:
            self._work.set()  # the loop may be waiting on an empty schedule
        return True

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """What the replica publishes for routers (replicas/engine/stats.py)."""
        return engine_stats(self.scheduler, self.estimator, now=self.clock() if now is None else now,
                            latency=self.latency)

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine step loop failed: {self._error!r}")

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    async def close(self) -> None:
        """Stop the step loop and abort everything (tests, shutdown)."""
        self._closed = True
        for rid in list(self.scheduler.requests):
            self.abort(rid)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # ---- the step loop --------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._work is None:
            self._work = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="halffull-sim-step-loop")

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: fail every stream loudly rather than hang it
            logger.exception("simulated engine step loop failed")
            self._error = exc
            for stream in self._streams.values():
                if not stream.finished:
                    stream.finished = True
                    stream.queue.put_nowait(EngineDeadError(f"engine step loop failed: {exc!r}"))

    async def _loop(self) -> None:
        sched, work = self.scheduler, self._work
        while not self._closed:
            if not sched.has_work():
                work.clear()
                await work.wait()
                continue
            out = sched.schedule(self.clock())
            if out.is_empty and out.preempted:
                continue  # a step that only preempted is progress: schedule again (as vLLM does)
            if out.is_empty:
                # Nothing can run until something external changes (an arrival or an abort).
                work.clear()
                await work.wait()
                continue
            dt = self.latency.step_time(*step_cost(out)) / self.speedup
            self.busy_time += dt
            await asyncio.sleep(dt)
            before = [(r, r.num_output_tokens) for r in out.num_scheduled_tokens]
            finished = sched.update_from_output(out, self.clock())
            self._deliver(before, finished)

    def _deliver(self, before: list[tuple[Request, int]], finished: list[Request]) -> None:
        streams, vocab = self._streams, self.output_vocab
        n_vocab = len(vocab)
        for request, num_before in before:
            if request.num_output_tokens > num_before:
                stream = streams.get(request.request_id)
                if stream is not None and not stream.finished:
                    stream.queue.put_nowait(vocab[stream.rng.randrange(n_vocab)])
        for request in finished:
            self.estimator.observe(request.num_output_tokens)
            self.num_finished += 1
            stream = streams.get(request.request_id)
            if stream is not None and not stream.finished:
                stream.finished = True
                stream.queue.put_nowait(_END)
