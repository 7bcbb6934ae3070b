"""One simulated replica on a real asyncio clock: serves requests like a real engine, without a model.

The engine core schedules (replicas/engine/scheduler.py); the executor does not run a model, it sleeps for
the latency model's step time divided by ``speedup`` and then samples placeholder tokens::

    step loop:  wait for work (an asyncio.Event; no busy loop when idle)
                out = scheduler.schedule(now)
                await sleep_until(step deadline)          # step_time(out) / speedup after the step began
                scheduler.update_from_output(out, now)    # one token per request whose prefill is complete
                push each sampled token to its request's stream; close the streams of finished requests

Unlike the virtual-time replica (replicas/sim/virtual.py) it steps one token at a time, so every token is
streamed when its step ends (no ``commit_decode_run``).

Step timing: each step *ends* ``step_time / speedup`` after it began, so the CPU the loop itself spends
(scheduling, token delivery, the rest of the event loop) and ``asyncio.sleep``'s oversleep fall inside the
modelled time instead of stretching every step (``next_deadline``). While the engine stays busy a step begins
at the previous step's deadline, so a late wake-up of up to ``MAX_CATCHUP_S`` is made up by the next steps;
a longer stall (a starved host) is not: the timeline restarts from now, as a real engine's would.

Requests (``GenerateRequest``) enter through ``submit(request)``, which validates the request, applies the
waiting-queue limit and adds it to the scheduler at once (synchronously: nothing is queued anywhere else), and
returns a ``TokenStream`` of token ids. ``generate(request)`` is the same as an async generator; its request
enters the scheduler on the first ``__anext__``. Delivery is batched: each step appends the request's new token
to its stream's buffer and wakes its consumer at most once; ``TokenStream.next_batch()`` takes the whole buffer,
so a consumer gets one list per step while it keeps up and several steps' tokens in one list when it lags
(the replica sends each list as one stream item, replicas/deployment.py). Closing a stream (``aclose``, garbage collection, or
cancellation of the consumer) before it finished aborts the request, so its KV blocks return to the pool.

Overload: with ``max_waiting_requests`` set, ``submit`` raises ``EngineOverloadedError`` while that many
requests wait in the scheduler (preempted ones included), so a replica never holds an unbounded queue.

The simulated model:
  * output tokens are drawn from ``output_vocab`` with a per-request ``random.Random`` seeded by the prompt
    (so the same prompt gives the same text);
  * unless ``ignore_eos``, it stops at a pseudo-EOS length that depends only on the prompt:
    ``eos_min_tokens + crc32(prompt ids as little-endian uint64) % (eos_max_tokens - eos_min_tokens + 1)``
    (defaults 16..256), or at the request's ``min_tokens`` if that is longer; ``max_tokens`` always caps the
    output;
  * ``GenerateRequest.sampling`` is ignored (the ingress refuses what the simulated model cannot honour and
    applies stop strings to the text itself).

Clock: the scheduler's ``now``, arrival times and ``stats()["stats_time"]`` are wall-clock ``time.time()``
seconds, so a router can compare them with its own time (one host, or NTP-synchronised hosts). Step
durations shrink by ``speedup``; time-based engine-policy parameters (LARRY's ``tau``, ``max_wait_s``) stay in
wall seconds.
"""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import logging
import math
import random
import sys
import time
import types
import typing
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

from halffull.replicas.backend import GenerateRequest, RequestOutcome
from halffull.replicas.engine.policies import make_engine_policy
from halffull.replicas.engine.request import Request, RequestStatus
from halffull.replicas.engine.scheduler import Scheduler, SchedulerConfig
from halffull.replicas.engine.stats import engine_stats
from halffull.replicas.sim.latency import LatencyModel
from halffull.replicas.sim.profile_model import latency_model
from halffull.replicas.sim.virtual import step_cost
from halffull.router.estimate import OutputLengthEstimator

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
    max_waiting_requests: int | None = None  # waiting-queue limit; None: unbounded (Serve's limits still apply)

    def __post_init__(self):
        if not self.speedup > 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")
        if not 1 <= self.eos_min_tokens <= self.eos_max_tokens:
            raise ValueError(f"need 1 <= eos_min_tokens <= eos_max_tokens, got {self.eos_min_tokens}, {self.eos_max_tokens}")
        if self.output_vocab is not None and not self.output_vocab:
            raise ValueError("output_vocab must not be empty")
        # Upper bounds keep a typo from allocating a replica's memory away (block tables are Python lists).
        for name, lo, hi in (("tp", 1, 64), ("block_size", 1, 4096), ("num_blocks", 1, MAX_NUM_BLOCKS),
                             ("max_num_batched_tokens", 1, 1 << 24), ("max_num_seqs", 1, 1 << 20),
                             ("max_model_len", 2, 1 << 24), ("max_waiting_requests", 0, 1 << 30)):
            value = getattr(self, name)
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SimEngineConfig":
        """Build from a plain dict (Serve config); unknown keys and ill-typed values fail loudly (ValueError)."""
        values = known_fields(cls, values, "sim engine option")
        if values.get("speedup") in ("inf", "infinity"):
            values["speedup"] = math.inf
        config = cls(**check_field_types(cls, values, "sim engine option"))
        check_engine_params(config.engine_policy, config.engine_params)
        return config


MAX_NUM_BLOCKS = 1 << 22  # 64M tokens at 16 per block: more KV than any GPU holds


# ---- config type checks (shared with deploy/app.py's AppConfig) -----------------------------------------
def known_fields(cls: type, values: Mapping[str, Any] | None, what: str, hint: str = "") -> dict[str, Any]:
    """``values`` as a new dict; ValueError unless it is a mapping (or None) whose keys are all fields of ``cls``.

    ``what`` names one entry ("sim engine option"), for the messages.
    """
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f"{what}s must be a mapping, got {type(values).__name__}")
    values = dict(values or {})
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid, key=str)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid: {sorted(valid)}{hint}")
    return values


def check_field_types(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``values`` checked against the annotations of dataclass ``cls``; ValueError naming the field otherwise.

    YAML-friendly but strict: ``bool`` takes only True/False; ``int`` takes ints, not bools; ``float`` takes
    ints or finite-or-infinite floats (stored as float); ``str`` takes strings; ``X | None`` also takes None;
    ``Mapping[str, ...]`` takes a mapping with string keys; ``Sequence[int]`` a list or tuple of ints.
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        hint = hints[key]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for option in options:
            ok, coerced = _fits(value, option)
            if ok:
                out[key] = coerced
                break
        else:
            shown = repr(value)
            raise ValueError(f"{what} {key!r} must be {_describe(hint)}, got {shown[:80]}")
    return out


def _fits(value: Any, option: Any) -> tuple[bool, Any]:
    if option is type(None):
        return value is None, None
    if option is Any:
        return True, value
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if option is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None
        try:
            return True, float(value)
        except OverflowError:  # an int beyond float range
            return False, None
    if option is str:
        return isinstance(value, str), value
    origin = typing.get_origin(option)
    if origin is collections.abc.Mapping:
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value), value
    if origin is collections.abc.Sequence:
        (item,) = typing.get_args(option)
        ok = isinstance(value, (list, tuple)) and all(_fits(v, item)[0] for v in value)
        return ok, value
    return isinstance(value, option), value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_engine_params(policy: str, params: Mapping[str, Any]) -> None:
    """Fail (ValueError) on an unknown engine policy or ill-typed / unknown / out-of-range params."""
    from halffull.router.registry import build_params  # the one strict params checker (int vs bool vs float)

    if not isinstance(policy, str):
        raise ValueError(f"engine_policy must be a string, got {policy!r}")
    if not isinstance(params, Mapping):
        raise ValueError(f"engine_params must be a mapping, got {type(params).__name__}")
    plain = make_engine_policy(policy)  # unknown names fail here
    params_cls = getattr(type(plain), "Params", None)
    if params_cls is None:
        if params:
            raise ValueError(f"engine policy {policy!r} takes no parameters, got {sorted(params, key=str)}")
        return
    try:
        build_params(params_cls, params, policy)
    except TypeError as exc:  # a range check comparing an unexpected type
        raise ValueError(f"bad engine_params for {policy!r}: {exc}") from None


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
    """One request's output between the step loop and its consumer: the tokens sampled since the consumer last
    took them, and how the stream ended (``_END`` or an exception; None while it runs).

    The step loop appends (``push``) and wakes the one waiting consumer; the consumer takes everything at once
    (``take``), so a consumer that lags gets one batch per wake-up, never one item per token.
    """

    __slots__ = ("tokens", "end", "waiter", "rng", "finished", "listener")

    def __init__(self, seed: int):
        self.tokens: list[int] = []
        self.end: Any = None
        self.waiter: asyncio.Future | None = None
        self.rng = random.Random(seed)
        self.finished = False
        self.listener: Callable[[list[int]], None] | None = None  # TokenStream.deliver_to

    def push(self, token: int) -> None:
        if self.listener is not None:
            self.listener([token])
            return
        self.tokens.append(token)
        self._wake()

    def finish(self, end: Any = None) -> None:
        """End the stream (``_END``, or an exception the consumer raises) after the tokens already pushed."""
        self.finished = True
        self.end = _END if end is None else end
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until a token or the end is there (returns at once if one is)."""
        if self.tokens or self.end is not None:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> list[int]:
        tokens, self.tokens = self.tokens, []
        return tokens


_END = object()


class EngineDeadError(RuntimeError):
    """The step loop crashed; the engine serves nothing more (the replica's health check fails)."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at ``max_waiting_requests``: the request was not added (the ingress answers 429)."""


class TokenStream:
    """One submitted request's output token ids: ``async for`` gives them one at a time, ``next_batch()`` /
    ``batches()`` every token sampled since the previous call (at least one; one list per engine step while
    the consumer keeps up, more steps' tokens in one list when it lags). ``close()`` / ``aclose()`` aborts the
    request if it has not finished. Unlike an async generator it owns its request from the moment it exists,
    so a stream that is never iterated still releases its KV blocks when closed or garbage-collected."""

    __slots__ = ("_engine", "_request", "_stream", "outcome", "_closed", "_pending")

    def __init__(self, engine: "AsyncSimEngine", request: Request, stream: _Stream, outcome: RequestOutcome):
        self._engine, self._request, self._stream, self.outcome = engine, request, stream, outcome
        self._closed = False
        self._pending: list[int] = []  # taken from the engine, not yet returned by __anext__ (reversed)

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> int:
        if not self._pending:
            self._pending = (await self._take())[::-1]
        self.outcome.num_output_tokens += 1
        return self._pending.pop()

    async def next_batch(self) -> list[int]:
        """Every output token id sampled since the previous call (waits for at least one);
        StopAsyncIteration at the end."""
        batch = self._pending[::-1] if self._pending else await self._take()
        self._pending = []
        self.outcome.num_output_tokens += len(batch)
        return batch

    def deliver_to(self, callback: Callable[[list[int]], None]) -> None:
        """Hand every token from now on to ``callback(tokens)``, called by the step loop as each step ends
        (no consumer wake-up per step; the tokens already sampled go at once); then ``await ended()``.
        ``callback`` must not block or raise."""
        outcome, stream = self.outcome, self._stream

        def listener(tokens: list[int]) -> None:
            outcome.num_output_tokens += len(tokens)
            callback(tokens)

        stream.listener = listener
        if self._pending or stream.tokens:
            tokens, self._pending = self._pending[::-1] + stream.take(), []
            listener(tokens)

    async def ended(self) -> None:
        """Until the request ended (``deliver_to``): returns when it finished, raises the engine's error;
        cancelling the wait aborts it."""
        try:
            await self._take()
        except StopAsyncIteration:
            return
        raise RuntimeError("ended() needs deliver_to() first: tokens were buffered")

    def batches(self) -> "_Batches":
        """``async for batch in stream.batches()``: ``next_batch()`` until the end."""
        return _Batches(self)

    async def _take(self) -> list[int]:
        if self._closed:
            raise StopAsyncIteration
        stream = self._stream
        try:
            await stream.wait()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self.close()
            raise
        end = stream.end
        if end is _END:
            # Known as soon as the last tokens are taken: a consumer pacing its sends need not wait for more.
            self._set_finish_reason()
        if stream.tokens:
            return stream.take()
        self.close()
        if end is _END:
            raise StopAsyncIteration
        raise end

    def _set_finish_reason(self) -> None:
        request = self._request
        if request.status == RequestStatus.FINISHED and self.outcome.finish_reason is None:
            self.outcome.finish_reason = "length" if request.num_output_tokens >= request.max_tokens else "stop"

    def close(self) -> None:
        """Abort the request if it is still running; fill in the outcome. Idempotent."""
        if self._closed:
            return
        self._closed = True
        engine, request, outcome = self._engine, self._request, self.outcome
        engine._streams.pop(request.request_id, None)
        if not self._stream.finished:
            engine.abort(request.request_id)
        outcome.num_cached_tokens = max(request.num_cached_tokens, 0)
        outcome.num_preemptions = request.num_preemptions
        if outcome.finish_reason is None:
            outcome.finish_reason = "abort"

    async def aclose(self) -> None:
        self.close()

    def __del__(self):
        if not self._closed:
            try:
                self.close()
            except Exception:  # interpreter shutdown
                pass


class _Batches:
    """The async iterator of ``TokenStream.batches()``."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: TokenStream):
        self._tokens = tokens

    def __aiter__(self) -> "_Batches":
        return self

    def __anext__(self):
        return self._tokens.next_batch()

    async def aclose(self) -> None:
        self._tokens.close()


MAX_CATCHUP_S = 0.010  # wall seconds of lateness the step loop makes up (see the module docstring)


def next_deadline(prev_deadline: float | None, now: float, dt: float, max_catchup: float = MAX_CATCHUP_S) -> float:
    """When a step of ``dt`` seconds that begins ``now`` ends, on the loop's monotonic clock.

    ``prev_deadline`` is the previous step's deadline while the engine stayed busy (None after idling): the step
    is taken to begin there if the loop is at most ``max_catchup`` late, so the lateness is made up; later than
    that, it begins now.
    """
    busy = prev_deadline is not None and now - prev_deadline <= max_catchup
    return (prev_deadline if busy else now) + dt


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
        max_waiting_requests: int | None = None,
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
        self.num_rejected = 0  # submits refused by max_waiting_requests
        self.max_waiting_requests = max_waiting_requests
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
        latency = latency_model(config.gpu, config.model, config.tp)
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
            eos_max_tokens=config.eos_max_tokens, output_vocab=config.output_vocab,
            max_waiting_requests=config.max_waiting_requests, **kwargs,
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

    def submit(self, request: GenerateRequest, outcome: RequestOutcome | None = None) -> "TokenStream":
        """Add ``request`` to the scheduler now and return its token stream (close it to abort).

        Raises ValueError if the request can never run, ``EngineOverloadedError`` if the waiting queue is at
        ``max_waiting_requests``, ``EngineDeadError`` if the step loop crashed. ``outcome``, if given, counts
        output tokens as they are yielded and gets the cache hit, preemption count and finish reason when the
        request ends.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine step loop failed: {self._error!r}")
        self.validate(request)
        limit = self.max_waiting_requests
        if limit is not None and len(self.scheduler.waiting) >= limit:
            self.num_rejected += 1
            raise EngineOverloadedError(
                f"the engine's waiting queue is full ({len(self.scheduler.waiting)} >= {limit} requests)")
        rid = request.request_id
        ids = list(request.prompt_token_ids)
        crc = prompt_crc(ids)
        eos = _eos_length(crc, self.eos_min_tokens, self.eos_max_tokens)
        req = Request(
            rid, len(ids), request.max_tokens, self.clock(), priority=request.priority, prompt_token_ids=ids,
            stop_after_tokens=None if request.ignore_eos else max(eos, request.min_tokens),
        )
        stream = _Stream(crc)
        if outcome is None:
            outcome = RequestOutcome()
        outcome.num_prompt_tokens = len(ids)
        self.scheduler.add_request(req)
        self._streams[rid] = stream
        self._ensure_loop()
        self._work.set()
        return TokenStream(self, req, stream, outcome)

    async def generate(self, request: GenerateRequest, outcome: RequestOutcome | None = None) -> AsyncIterator[int]:
        """Token ids of ``request`` as they are sampled (``submit`` on the first ``__anext__``); closing
        early aborts the request."""
        tokens = self.submit(request, outcome)
        try:
            async for token in tokens:
                yield token
        finally:
            tokens.close()

    async def generate_batches(self, request: GenerateRequest,
                               outcome: RequestOutcome | None = None) -> AsyncIterator[list[int]]:
        """``generate`` in lists: every token sampled since the previous list (``TokenStream.next_batch``)."""
        tokens = self.submit(request, outcome)
        try:
            async for batch in tokens.batches():
                yield batch
        finally:
            tokens.close()

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is (its blocks return to the pool); False if it is not running."""
        request = self.scheduler.abort(request_id)
        stream = self._streams.get(request_id)
        if stream is not None and not stream.finished:
            stream.finish()
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

    def occupancy(self) -> dict[str, int]:
        """Queues and KV memory right now (tests, soak, operators): after every stream ended or was aborted,
        ``num_unfinished``, ``num_streams`` are 0 and ``num_free_blocks == num_total_blocks``."""
        sched = self.scheduler
        return {
            "num_running": len(sched.running), "num_waiting": len(sched.waiting),
            "num_unfinished": sched.num_unfinished, "num_streams": len(self._streams),
            "num_free_blocks": sched.num_free_blocks, "num_total_blocks": sched.num_total_blocks,
            "num_finished": self.num_finished, "num_aborted": self.num_aborted, "num_rejected": self.num_rejected,
        }

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
                    stream.finish(EngineDeadError(f"engine step loop failed: {exc!r}"))

    async def _loop(self) -> None:
        sched, work = self.scheduler, self._work
        loop = asyncio.get_running_loop()
        deadline = None  # the previous step's end while the engine stays busy
        while not self._closed:
            if not sched.has_work():
                deadline = None
                work.clear()
                await work.wait()
                continue
            began = loop.time()
            out = sched.schedule(self.clock())
            if out.is_empty and out.preempted:
                continue  # a step that only preempted is progress: schedule again (as vLLM does)
            if out.is_empty:
                # Nothing can run until something external changes (an arrival or an abort).
                deadline = None
                work.clear()
                await work.wait()
                continue
            dt = self.latency.step_time(*step_cost(out)) / self.speedup
            self.busy_time += dt
            deadline = next_deadline(deadline, began, dt)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
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
                    stream.push(vocab[stream.rng.randrange(n_vocab)])
        for request in finished:
            self.estimator.observe(request.num_output_tokens)
            self.num_finished += 1
            stream = streams.get(request.request_id)
            if stream is not None and not stream.finished:
                stream.finish()
