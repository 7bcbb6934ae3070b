"""``LLMReplica``: the Ray Serve deployment that hosts one engine backend (replicas/backend.py).

Call (from the ingress, deploy/app.py; the ``routing`` kwarg is for the router, router/serve_router.py)::

    gen = handle.options(stream=True).generate.remote(request_dict, routing={...})

``request_dict`` holds ``GenerateRequest``'s fields (request_id, prompt_token_ids, max_tokens, ignore_eos,
priority, min_tokens, sampling). The stream is::

    {"event": "start", "replica": "<replica unique id>"}        once accepted, before any token
    {"event": "overloaded", "message": "..."}                    instead, when the engine's waiting queue is
                                                                 full; nothing follows
    <int>                                                        one output token id per engine step
    {"event": "end", "finish_reason": "stop" | "length", "num_prompt_tokens", "num_cached_tokens",
     "num_output_tokens", "num_preemptions"}

The request is in the engine (``backend.submit``) before the start event is sent, so everything that refuses
it does so before the start event: ValueError when the engine can never run it (prompt + max_tokens beyond
the context); the ``overloaded`` event when the engine's waiting queue is full (``max_waiting_requests``; the
ingress answers 429). Cancelling the stream (the client went away) aborts the request in the engine, so
its KV blocks return to the pool.

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

import time
from typing import Any, Mapping, Sequence

from ray import serve

from halffull.replicas.backend import Backend, GenerateRequest, RequestOutcome
from halffull.replicas.sim.realtime import EngineOverloadedError
from halffull.router.feed import ReceivedFeed

# Defaults for the Serve options; the app builder (deploy/app.py) may override them.
MAX_ONGOING_REQUESTS = 512  # the engine itself queues (max_num_seqs 256 running + waiting)


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


def make_backend(kind: str, options: Mapping[str, Any] | None) -> Backend:
    if kind == "sim":
        from halffull.replicas.sim.realtime import AsyncSimEngine

        return AsyncSimEngine.from_config(options)
    if kind == "vllm":
        import ray

        from halffull.replicas.vllm.backend import VllmBackend  # imports vLLM: only in replicas that run it

        return VllmBackend.from_options(options, node_ip=ray.util.get_node_ip_address())
    raise ValueError(f"unknown backend {kind!r}; valid: {', '.join(BACKENDS)}")


def _prefix_hashes(routing: Mapping[str, Any] | None) -> Sequence[int]:
    """The router-level prefix hashes of a ``routing`` kwarg; () when absent or malformed."""
    hashes = routing.get("prefix_hashes") if isinstance(routing, Mapping) else None
    if not isinstance(hashes, (list, tuple)) or not all(type(h) is int for h in hashes):
        return ()
    return hashes


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2.0,
    health_check_timeout_s=10.0,
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=5.0,
)
class LLMReplica:
    def __init__(self, backend: str = "sim", engine: Mapping[str, Any] | None = None):
        bind_replica_grpc_to_node_ip()
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
            stream = self.backend.generate(spec, outcome)
        self.num_requests += 1
        try:
            yield {"event": "start", "replica": self.replica_id}
            async for token in stream:
                yield token
        finally:
            await stream.aclose()  # aborts the request if it is still running (cancelled, client gone)
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

    async def max_model_len(self) -> int:
        return self.backend.max_model_len

    async def check_health(self) -> None:
        self.backend.check_health()

    def __del__(self):
        # Serve calls this on graceful shutdown: stop an engine that runs in its own process (vLLM).
        shutdown = getattr(getattr(self, "backend", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
