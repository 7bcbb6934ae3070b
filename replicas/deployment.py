"""``LLMReplica``: the Ray Serve deployment that hosts one engine backend (replicas/backend.py).

Call (from the ingress, deploy/app.py; the ``routing`` kwarg is for the router, router/serve_router.py)::

    gen = handle.options(stream=True).generate.remote(request_dict, routing={...})

``request_dict`` holds ``GenerateRequest``'s fields (request_id, prompt_token_ids, max_tokens, ignore_eos,
priority, min_tokens, sampling), and optionally ``sink`` (below) and ``hold``. The stream is::

    {"event": "start", "replica": "<replica unique id>"}        once accepted, before any token
    {"event": "overloaded", "message": "..."}                    instead, when the engine's waiting queue is
                                                                 full; nothing follows
    [<int>, ...]                                                 output token ids: everything produced
                                                                 since the previous item (see "Batches")
    {"event": "end", "finish_reason": "stop" | "length", "num_prompt_tokens", "num_cached_tokens",
     "num_output_tokens", "num_preemptions"}

The request is in the engine (``backend.submit``) before the start event is sent, so everything that refuses
it does so before the start event: ValueError when the engine can never run it (prompt + max_tokens beyond
the context); the ``overloaded`` event when the engine's waiting queue is full (``max_waiting_requests``; the
ingress answers 429). Cancelling the stream (the client went away) aborts the request in the engine, so
its KV blocks return to the pool.

Batches. Each item after the start event is a list of output token ids: what the engine produced since the
previous item (``Backend.generate_batches``: one engine step's tokens while this replica keeps up, several
steps' when it lags). The first item goes out as soon as the engine produced it; a later one waits until
``stream_interval_ms`` after the previous item was sent, collecting every token produced meanwhile (0: send
each step's tokens at once). So a stream costs one item per interval instead of one per token, and a token
waits at most the interval (plus one step). The trade-off: at 20 ms and a 10 ms engine step a client sees
two tokens every 20 ms instead of one every 10 ms (same mean TPOT, burstier); under 5 ms steps nothing is
held back that a person reading could see. ``stream_timings()`` returns when recent requests got their
first token (wall clock; ``halffull bench stream`` measures from there to the bytes leaving the server).

Hold. ``"hold": true`` (the ingress sets it for a non-streaming request without stop strings: nobody reads its
text before the end) sends the first batch as ever (so the ingress knows the request started generating: no
re-send after a failure from then on) and every later token in one batch once the request ended, on the
Serve stream or the token channel alike: one item, not one per interval.

Token channel. A request dict with ``"sink": "<id>"`` (the ingress's ChannelClient, deploy/channel.py) gets
its later tokens through this replica's token channel instead (replicas/channel.py): the start event adds
``"channel": [host, port]``, the first batch follows it on the Serve stream (never held back, never merged
with later tokens, whatever state the channel is in) or, where that ingress's connection to this replica is
already up (the start event then adds ``"first": "channel"``), goes on the channel at once in a frame of its
own, the later tokens of every stream of that ingress
go out in one frame per engine step (per ``stream_interval_ms``), and the end event comes after the request's
last tokens were written to the channel. Everything else (routing, admission,
cancellation aborting the request, replica failure) stays on the Serve call.

Bounded queues (deploy/app.py sets them): Serve sends a replica at most ``max_ongoing_requests`` at once, and
each caller's handle queues at most ``max_queued_requests`` more before it raises ``BackPressureError``.

``record_routing_stats()`` publishes the engine's stats (replicas/engine/stats.py keys: ``num_free_blocks`` /
``num_total_blocks`` among them), its occupancy (``num_unfinished``, ``num_streams``, ``num_rejected``: what
must return to zero after cancellations), ``replica``, the counters of ``counters()``, and this process's
``pid`` / ``rss_bytes``, and the received-requests feed (``num_received``, ``recent_prefix_hashes`` of the
``routing`` kwargs received: router/feed.py, how N routers learn their traffic share and what the others
sent; counted on entry to ``generate``, rejected requests included, as routers count their sends); routers
read the engine-stats and feed keys. Tests call it on the replica actor directly
(``ray.get_actor("SERVE_REPLICA::<app>#LLMReplica#<id>", namespace="serve")``). Serve polls it every
``request_routing_stats_period_s`` and hands it to the routers as ``RunningReplica.routing_stats``. The prefix-aware policies merge the published prefix
hashes into their own index.

Backends: ``"sim"`` (replicas/sim/realtime.py, options: ``SimEngineConfig``) and ``"vllm"``
(replicas/vllm/backend.py, options: ``VllmEngineConfig`` fields plus ``engine_policy`` / ``engine_params``;
its stats come from the engine process, fetched by ``refresh_stats`` before each publication).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import Any, AsyncIterator, Mapping, Sequence

from ray import serve

from halffull.replicas.backend import Backend, GenerateRequest, RequestOutcome
from halffull.replicas.channel import Sink, TokenChannel
from halffull.replicas.sim.realtime import EngineOverloadedError
from halffull.router.feed import ReceivedFeed

# Defaults for the Serve options; the app builder (deploy/app.py) may override them.
MAX_ONGOING_REQUESTS = 512  # the engine itself queues (max_num_seqs 256 running + waiting)
STREAM_INTERVAL_MS = 20.0  # a later batch of a stream waits at most this long after the previous one
MAX_STREAM_INTERVAL_MS = 1000.0
NUM_STREAM_TIMINGS = 4096  # first-token times kept for stream_timings()


def bind_replica_grpc_to_node_ip() -> None:
    """Keep this Serve replica's inter-deployment gRPC server off the other interfaces.

    Ray 2.60 starts it on ``[::]:0`` (all interfaces; hard-coded in ray/serve/_private/replica.py, after the
    user constructor ran). Rebinding it to the node's own IP keeps a local cluster started on 127.0.0.1
    loopback-only and changes nothing reachable for a multi-node cluster (peers dial the node IP). Call from a
    deployment's constructor; idempotent.
    """
    import ray
    import ray.serve._private.replica as replica_module

    original = replica_module.add_port_to_grpc_server
    if getattr(original, "_halffull_node_ip", False):
        return
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port(server, address):
        if address == "[::]:0":
            address = f"{host}:0"
        return original(server, address)

    add_port._halffull_node_ip = True
    replica_module.add_port_to_grpc_server = add_port


def process_memory() -> dict[str, int]:
    """This process's pid and resident set size in bytes (Linux /proc; rss 0 where unavailable)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = 0
    return {"pid": os.getpid(), "rss_bytes": rss}


BACKENDS = ("sim", "vllm")


def _prefix_hashes(routing: Mapping[str, Any] | None) -> Sequence[int]:
    """The router-level prefix hashes of a ``routing`` kwarg; () when absent or malformed."""
    hashes = routing.get("prefix_hashes") if isinstance(routing, Mapping) else None
    if not isinstance(hashes, (list, tuple)) or not all(type(h) is int for h in hashes):
        return ()
    return hashes


async def paced(batches: AsyncIterator[list[int]], outcome: RequestOutcome, interval_s: float,
                 on_first=None) -> AsyncIterator[list[int]]:
    """The batches of ``batches``, the first at once, each later one no sooner than ``interval_s`` after the
    previous one was handed on: waiting *before* reading lets the engine's tokens pile up in the source, so
    the read after the wait takes them all as one list. No wait once ``outcome.finish_reason`` is set (the
    request ended: what is left goes at once). ``on_first()`` runs when the first batch arrives."""
    loop = asyncio.get_running_loop()
    sent = None
    while True:
        if sent is not None and interval_s > 0 and outcome.finish_reason is None:
            wait = sent + interval_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        try:
            batch = await batches.__anext__()
        except StopAsyncIteration:
            return
        if sent is None and on_first is not None:
            on_first()
        sent = loop.time()
        yield batch


async def held(batches: AsyncIterator[list[int]], on_first=None) -> AsyncIterator[list[int]]:
    """The first batch of ``batches`` at once, then everything else as one batch once the source ended (a
    request whose reader wants only the whole answer: one item instead of one per interval).
    ``on_first()`` runs when the first batch arrives."""
    rest: list[int] = []
    async for batch in batches:
        if on_first is not None:
            on_first()
            on_first = None
            yield batch
        else:
            rest += batch
    if rest:
        yield rest


def token_batches(backend: Backend, stream: Any, spec: GenerateRequest, outcome: RequestOutcome):
    """The batch iterator of a request: a submitted stream's ``batches()`` (simulated engine) or the backend's
    ``generate_batches`` (vLLM); a backend with neither streams one token per list."""
    if stream is not None:
        return stream.batches() if hasattr(stream, "batches") else _singles(stream)
    if hasattr(backend, "generate_batches"):
        return backend.generate_batches(spec, outcome)
    return _singles(backend.generate(spec, outcome))


async def _singles(tokens: AsyncIterator[int]) -> AsyncIterator[list[int]]:
    try:
        async for token in tokens:
            yield [token]
    finally:
        await tokens.aclose()


def make_backend(kind: str, options: Mapping[str, Any] | None) -> Backend:
    if kind == "sim":
        from halffull.replicas.sim.realtime import AsyncSimEngine

        return AsyncSimEngine.from_config(options)
    if kind == "vllm":
        import ray

        from halffull.replicas.vllm.backend import VllmBackend  # imports vLLM: only in replicas that run it

        return VllmBackend.from_options(options, node_ip=ray.util.get_node_ip_address())
    raise ValueError(f"unknown backend {kind!r}; valid: {', '.join(BACKENDS)}")


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2.0,
    health_check_timeout_s=10.0,
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=5.0,
)
class LLMReplica:
    def __init__(self, backend: str = "sim", engine: Mapping[str, Any] | None = None,
                 stream_interval_ms: float = STREAM_INTERVAL_MS):
        bind_replica_grpc_to_node_ip()
        if not 0 <= stream_interval_ms <= MAX_STREAM_INTERVAL_MS:
            raise ValueError(f"stream_interval_ms must be in [0, {MAX_STREAM_INTERVAL_MS:g}], got {stream_interval_ms}")
        self.stream_interval_s = stream_interval_ms / 1000.0
        self.first_token_times: collections.deque = collections.deque(maxlen=NUM_STREAM_TIMINGS)
        self.channel: TokenChannel | None = None  # started on the first request that names a sink
        self.backend = make_backend(backend, engine)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica_id = "local"
        self.num_requests = 0
        self.num_finished = 0
        self.num_aborted = 0
        self.num_rejected = 0
        self.num_output_tokens = 0
        self.feed = ReceivedFeed()

    async def generate(self, request: Mapping[str, Any], routing: Mapping[str, Any] | None = None):
        self.feed.on_received(_prefix_hashes(routing), time.time())
        spec = GenerateRequest(
            request_id=str(request["request_id"]),
            prompt_token_ids=request["prompt_token_ids"],
            max_tokens=int(request["max_tokens"]),
            ignore_eos=bool(request.get("ignore_eos", False)),
            priority=int(request.get("priority", 0)),
            min_tokens=int(request.get("min_tokens", 0)),
            sampling=dict(request.get("sampling") or {}),
        )
        outcome = RequestOutcome()
        submit = getattr(self.backend, "submit", None)
        if submit is not None:
            try:
                stream = submit(spec, outcome)  # in the engine now, or refused before the start event
            except EngineOverloadedError as exc:
                # An event, not an exception: under a flood this path runs thousands of times a second, and a
                # Ray task error (pickled traceback, a new exception class per error) costs ~10x more.
                self.num_rejected += 1
                yield {"event": "overloaded", "message": str(exc)}
                return
        else:  # a backend without submit: validated now, admitted on the first token request
            self.backend.validate(spec)
            stream = None
        batches = token_batches(self.backend, stream, spec, outcome)
        self.num_requests += 1
        rid, times = spec.request_id, self.first_token_times
        sink_id = request.get("sink")
        hold = bool(request.get("hold", False))
        try:
            if isinstance(sink_id, str) and sink_id:  # the ingress reads tokens from the token channel
                sink = await self._sink(sink_id)
                # The first batch never waits for the interval or for a connection: where this ingress's
                # connection is up it goes on the channel at once (the ingress reads that on the loop that
                # serves HTTP, sparing the Serve stream's hops between loops and processes); else on the Serve
                # stream right behind the start event. The start event says which.
                first_on_channel = sink.connected
                start = {"event": "start", "replica": self.replica_id, "channel": list(self.channel.address)}
                if first_on_channel:
                    start["first"] = "channel"
                yield start
                first = await anext(batches, None)
                if first is not None:
                    times.append((rid, time.time()))
                    if first_on_channel:
                        sink.push_now(rid, first)
                    else:
                        yield first
                    await self._to_channel(sink, rid, stream, batches, hold)
            else:
                yield {"event": "start", "replica": self.replica_id}
                on_first = lambda: times.append((rid, time.time()))  # noqa: E731
                if hold:
                    items = held(batches, on_first)
                else:
                    items = paced(batches, outcome, self.stream_interval_s, on_first)
                async for batch in items:
                    yield batch
        finally:
            await batches.aclose()  # aborts the request if it is still running (cancelled, client gone)
            self.num_output_tokens += outcome.num_output_tokens
            if outcome.finish_reason == "abort":
                self.num_aborted += 1
            else:
                self.num_finished += 1
        yield {
            "event": "end",
            "finish_reason": outcome.finish_reason,
            "num_prompt_tokens": outcome.num_prompt_tokens,
            "num_cached_tokens": outcome.num_cached_tokens,
            "num_output_tokens": outcome.num_output_tokens,
            "num_preemptions": outcome.num_preemptions,
        }

    async def _sink(self, sink_id: str) -> Sink:
        if self.channel is None:
            import ray

            self.channel = TokenChannel(self.stream_interval_s)
            self._channel_host = ray.util.get_node_ip_address()
        await self.channel.start(self._channel_host)
        return self.channel.sink(sink_id)

    async def _to_channel(self, sink: Sink, rid: str, stream: Any, batches: AsyncIterator[list[int]],
                          hold: bool = False) -> None:
        """Push the request's tokens after its first batch into its ingress's sink (replicas/channel.py);
        return once its last tokens were written, so the end event follows them. The simulated engine's
        stream hands its tokens over from the step loop itself (``deliver_to``: no wake-up of this coroutine
        per step); others are read batch by batch. ``hold``: all of them in one piece once the request
        ended."""
        kept: list[int] = []
        on_tokens = kept.extend if hold else functools.partial(sink.push, rid)
        try:
            if hasattr(stream, "deliver_to"):
                stream.deliver_to(on_tokens)
                await stream.ended()
            else:
                async for batch in batches:
                    on_tokens(batch)
            if kept:
                sink.push_now(rid, kept)
            sink.finish(rid)
        except BaseException:
            sink.drop(rid)  # cancelled or failed: the ingress reads nothing more of it
            raise

    # Every method is a coroutine: Serve (RAY_SERVE_RUN_SYNC_IN_THREADPOOL, default on in 2.60) runs plain
    # methods in a thread pool, where reading the engine would race its step loop.
    async def counters(self) -> dict[str, Any]:
        return self._counters()

    def _counters(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "num_requests": self.num_requests,
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "num_rejected": self.num_rejected,
            "num_output_tokens": self.num_output_tokens,
        }

    async def _refresh_stats(self) -> None:
        # A backend whose engine runs elsewhere (vLLM: its engine process) fetches its stats first.
        refresh = getattr(self.backend, "refresh_stats", None)
        if refresh is not None:
            await refresh()

    async def record_routing_stats(self) -> dict[str, Any]:
        await self._refresh_stats()
        now = time.time()
        stats = self.backend.stats(now)
        stats.update(self.feed.publish(now))
        occupancy = getattr(self.backend, "occupancy", None)
        if occupancy is not None:
            stats.update(occupancy())
        stats.update(self._counters())
        stats.update(process_memory())
        return stats

    async def occupancy(self) -> dict[str, Any]:
        """The engine's queues and free KV blocks now, plus this process's id and resident memory (tests,
        soak, operators). After every stream ended or was cancelled: no unfinished request, no open stream,
        ``num_free_blocks == num_total_blocks``."""
        await self._refresh_stats()
        occupancy = getattr(self.backend, "occupancy", None)
        out = dict(occupancy()) if occupancy is not None else {}
        out.update(self._counters())
        out.update(process_memory())
        return out

    async def stream_timings(self) -> dict[str, Any]:
        """``{"replica": id, "first_token": {request id: wall time the first token reached this replica}}`` for
        the last ``NUM_STREAM_TIMINGS`` requests (``halffull bench stream``)."""
        return {"replica": self.replica_id, "first_token": dict(self.first_token_times)}

    async def max_model_len(self) -> int:
        return self.backend.max_model_len

    async def check_health(self) -> None:
        self.backend.check_health()

    def __del__(self):
        # Serve calls this on graceful shutdown: stop an engine that runs in its own process (vLLM).
        shutdown = getattr(getattr(self, "backend", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
