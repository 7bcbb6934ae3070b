"""The OpenAI-compatible ingress and the app builder: ``serve run deploy/serve_config.yaml``. This module only
wires routes (vLLM's ``api_server.py``); the parts live beside it:

::

    client -> Serve HTTP proxy (127.0.0.1:8000) -> OpenAIIngress (this file, FastAPI)
        ApiKeyGuard (auth.py) -> RequestLimits (limits.py: 429 admission, 413 body size)
        -> FastAPI parses JSON, pydantic validates (protocol/) -> GenerationServing (serving.py):
        tokenize once (deploy/tokenizer.py; vLLM: the model's, deploy/hf_tokenizer.py)
        -> routing kwarg: token count + prefix hashes -> Run (run.py): DeploymentHandle(LLMReplica)
        -> HalffullRequestRouter (router/serve_router.py) -> policy.choose
        -> LLMReplica (replicas/deployment.py) -> engine backend -> token ids streamed back -> text / SSE

    config.py       AppConfig: the app arguments (``build_app``; YAML ``args``), backends
    protocol/       request / response models, the one error model (OpenAPI schema at /openapi.json)
    serving.py      completions + chat: request fields, stop strings, ids, JSON / SSE answers
    serving_tokenize.py   /tokenize, /detokenize
    run.py          one request's run: re-sends after replica failure, deadline, failure -> HTTP error
    channel.py      the token channel's ingress side: every new token of this ingress's streams on one LLM
                    replica in one message per engine step (replicas/channel.py)
    auth.py, limits.py    API keys; admission and body size
    metrics.py      the halffull_* Prometheus series

Endpoints
  POST /v1/completions        prompt: string, [string], token ids, or [token ids] (one prompt per request)
  POST /v1/chat/completions   messages -> the chat template of deploy/tokenizer.py (vLLM: the tokenizer's own)
  POST /tokenize              {prompt} or {messages} -> {count, max_model_len, tokens} (vLLM's)
  POST /detokenize            {tokens} -> {prompt} (vLLM's)
  GET  /v1/models             the one served model
  GET  /health                200 {"status": "ok"} while the ingress is up
  GET  /metrics               halffull's Prometheus metrics, read from this node's Ray metrics agent
  GET  /openapi.json, /docs   the OpenAPI document (exact request schemas, from the pydantic models) and its UI

Request bodies are JSON objects sent with ``Content-Type: application/json``. The request fields, what each
does and which are refused: deploy/protocol/common.py, completions.py, chat.py; per backend: serving.py.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}`` (protocol/errors.py), never a 500
for bad input:

  400  malformed JSON, missing or ill-typed fields (``invalid_type``), out-of-range or unsupported values
       (``invalid_value``), prompts beyond the context (``code: context_length_exceeded``)
  401  API keys are configured and the request has no valid ``Authorization: Bearer <key>`` (``invalid_api_key``)
  404  unknown model or path;  405  wrong method (with ``Allow``)
  413  body larger than ``max_body_bytes`` (``request_too_large``), refused from Content-Length before reading
  429  overloaded (``code: overloaded``, ``Retry-After: retry_after_s``): this ingress replica already handles
       ``ingress_max_ongoing_requests`` generation requests, or ``max_queued_requests`` wait for an LLM replica
       slot, or the chosen engine's waiting queue is full (``engine.max_waiting_requests``). Behind these,
       Serve's own queue in front of each ingress replica (``ingress_max_queued_requests``) is a backstop that
       answers 429 with Retry-After but a plain-text body; it fires only when the ingress cannot even run
       its check (more than ``ingress_max_ongoing_requests`` + 1024 requests in it at once)
  503  the replica serving the request failed after it had produced output for it, or every one of
       ``replica_retries`` re-sends failed too (``replica_unavailable``, ``Retry-After``: a client retry is safe)
  504  no complete answer within ``request_timeout_s`` of arrival (``code: timeout``); the engine request is
       aborted
"""

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from halffull.deploy.auth import ApiKeyGuard, api_key_digests
from halffull.deploy.channel import ChannelClient
# AppConfig and RAY_DEFAULT_ROUTER are imported from here by tools (loadtest/) beside build_app.
from halffull.deploy.config import INGRESS_BURST_SLOTS, RAY_DEFAULT_ROUTER, AppConfig, make_tokenizer
from halffull.deploy.limits import Limits, RequestLimits, endpoint_of
from halffull.deploy.peer_link import PeerLink, ingress_handle, node_host
from halffull.deploy.metrics import IngressMetrics, node_metrics_text
from halffull.deploy.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from halffull.deploy.protocol.common import Health, ModelList
from halffull.deploy.protocol.completions import CompletionRequest, CompletionResponse
from halffull.deploy.protocol.errors import ApiError, ErrorResponse, bad, from_validation
from halffull.deploy.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from halffull.deploy.serving import GenerationServing
from halffull.deploy.serving_tokenize import TokenizeServing
from halffull.replicas.deployment import LLMReplica, bind_replica_grpc_to_node_ip, process_memory

logger = logging.getLogger("ray.serve")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _answer(model, *, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a route: its 200 model (plus an SSE stream) and its error statuses."""
    ok: dict[str, Any] = {"model": model}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    return {200: ok, **_errors(400, 401, 404, 405, 413, 429, 503, 504)}


def _link_counts(link: PeerLink | None) -> dict[str, int]:
    if link is None:
        return {}
    return {"peers": len(link.live_peers()), "datagrams_sent": link.num_datagrams_sent,
            "bookings_sent": link.num_bookings_sent, "datagrams_received": link.num_received,
            "datagrams_dropped": link.num_dropped}


def _count(endpoint: str, status: int) -> None:
    limits = RequestLimits.limits
    if limits is not None:
        limits.on_reject(endpoint, status)


# ---- the FastAPI app ---------------------------------------------------------------------------------------
# serve.ingress pickles the FastAPI app (and so the route methods) when the class is decorated: every module
# name the methods use must be defined above this line. No ``from __future__ import annotations`` in this
# module: FastAPI must resolve the parameter annotations from the pickled methods' own globals.
fastapi_app = FastAPI(title="halffull OpenAI-compatible API", docs_url="/docs", redoc_url=None,
                      openapi_url="/openapi.json")
fastapi_app.add_middleware(RequestLimits)
fastapi_app.add_middleware(ApiKeyGuard)  # added last: runs first (unknown paths need a key too)


@fastapi_app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = from_validation(exc.errors())
    _count(endpoint_of(request.url.path.removeprefix(request.scope.get("root_path", ""))), err.status)
    return err.response()


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:  # FastAPI could not read the body as JSON (e.g. not UTF-8)
        err = bad(f"Request body is not valid JSON: {exc.detail}", code="invalid_json")
    else:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers)  # 405 keeps its Allow
    return err.response()


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("halffull ingress: unhandled error")
    return ApiError(500, f"Internal error: {type(exc).__name__}", code="internal_error").response()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096, graceful_shutdown_timeout_s=5.0,
                  graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(fastapi_app)
class OpenAIIngress:
    def __init__(self, llm, config: Mapping[str, Any], api_key_digests_hex: list[str] | tuple = ()):
        bind_replica_grpc_to_node_ip()
        self.config = config = AppConfig.from_args(config)
        # Keys given where the app was built, plus any in this replica's own environment.
        digests = {bytes.fromhex(d) for d in api_key_digests_hex} | set(api_key_digests(os.environ))
        ApiKeyGuard.digests = tuple(sorted(digests))
        self.metrics = metrics = IngressMetrics(config.router)
        RequestLimits.limits = Limits(config.ingress_max_ongoing_requests, config.max_body_bytes,
                                      config.retry_after_s, on_reject=self._rejected,
                                      on_active=metrics.active.set)
        tokenizer = make_tokenizer(config)
        self.model, self.max_model_len, self.created = config.model_name(), config.max_model_len(), int(time.time())
        # _by_reference=False: Serve's gRPC transport for this handle's calls (ray/serve/handle.py; Ray is pinned)
        generate = llm.options(stream=True, _by_reference=config.replica_calls == "actor").generate
        self.generation = GenerationServing(
            generate, tokenizer, model=self.model, max_model_len=self.max_model_len,
            backend=config.backend, prefix_block_size=config.prefix_block_size,
            max_output_tokens=config.max_output_tokens, replica_retries=config.replica_retries,
            request_timeout_s=config.request_timeout_s, retry_after_s=config.retry_after_s, metrics=metrics,
            channel=ChannelClient() if config.token_channel else None)
        self.tokenization = TokenizeServing(tokenizer, model=self.model, max_model_len=self.max_model_len)
        # The routers' bookings to the other ingress replicas (router/peers.py); Ray's own router shares none.
        self.peer_link = PeerLink(node_host(), ingress_handle) if config.router != RAY_DEFAULT_ROUTER else None
        if digests:
            logger.info("halffull ingress: API keys required (%d configured)", len(digests))

    def _rejected(self, endpoint: str, status: int) -> None:
        self.metrics.status(endpoint, status)
        if status == 429:  # only the admission check answers 429 before the route runs
            self.metrics.rejected.inc(tags={"reason": "ingress"})

    @property
    def num_active(self) -> int:
        return RequestLimits.limits.num_active

    # ---- plain endpoints -------------------------------------------------------------------------------
    @fastapi_app.get("/health", response_model=Health)
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/v1/models", response_model=ModelList)
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.created, "owned_by": "halffull",
            "max_model_len": self.max_model_len, "root": self.config.base_model(),
        }]}

    @fastapi_app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(self) -> PlainTextResponse:
        text = await asyncio.get_running_loop().run_in_executor(None, node_metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def peer_hello(self, source: str, host: str, port: int, token: str) -> bool:
        """A peer ingress replica announces where its routers' bookings are received (deploy/peer_link.py; not an
        HTTP route). Hearing one starts this replica's own link."""
        if self.peer_link is None:
            return False
        self.peer_link.ensure_started()
        self.peer_link.on_hello(source, host, port, token)
        return True

    def _start_peers(self) -> None:
        if self.peer_link is not None:
            self.peer_link.ensure_started()

    async def load(self) -> dict[str, Any]:
        """Generation requests in this ingress replica now, the runs reading the token channel, its pid and RSS
        (tests, soak; not an HTTP route)."""
        channel = self.generation.channel
        return {"num_active": self.num_active, "auth": bool(ApiKeyGuard.digests),
                "num_channel_runs": len(channel.runs) if channel is not None else 0,
                "peer_link": _link_counts(self.peer_link),
                **process_memory()}

    # ---- generation ------------------------------------------------------------------------------------
    @fastapi_app.post("/v1/completions", response_model=None, responses=_answer(CompletionResponse, stream=True))
    async def completions(self, body: CompletionRequest, request: Request):
        self._start_peers()
        return await self.generation.create(body, request, chat=False)

    @fastapi_app.post("/v1/chat/completions", response_model=None,
                      responses=_answer(ChatCompletionResponse, stream=True))
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._start_peers()
        return await self.generation.create(body, request, chat=True)

    # ---- tokenizer -------------------------------------------------------------------------------------
    @fastapi_app.post("/tokenize", response_model=TokenizeResponse, responses=_errors(400, 401, 404, 413))
    async def tokenize(self, body: TokenizeRequest):
        try:
            return self.tokenization.tokenize(body)
        except ApiError as err:
            self.metrics.status("tokenize", err.status)
            return err.response()

    @fastapi_app.post("/detokenize", response_model=DetokenizeResponse, responses=_errors(400, 401, 404, 413))
    async def detokenize(self, body: DetokenizeRequest):
        try:
            return self.tokenization.detokenize(body)
        except ApiError as err:
            self.metrics.status("detokenize", err.status)
            return err.response()


SEPARATE_THREAD = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
# name -> default ("": unset unless set where the app is built)
PROCESS_ENV = {"MALLOC_ARENA_MAX": "2", SEPARATE_THREAD: ""}


def process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables of the LLM replicas' processes (``runtime_env.env_vars``, set before they start):
    those of ``PROCESS_ENV``, where a value set where the app is built wins and an empty one leaves the variable
    unset (the default of glibc or Ray). ``ingress_env`` adds the ingress's own.

    ``MALLOC_ARENA_MAX=2``: glibc gives every thread that allocates its own malloc arena, and a Serve replica runs
    several (asyncio loop, Ray core worker, gRPC); freed memory scattered over many arenas is not given back, so
    resident memory creeps up under steady load. The 20-minute soak (1,656 requests, default app): the ingress
    grew +10.7% and the LLM replicas +6% with glibc's default, +6.8% and +4.6% with 2 arenas, at the same p99
    TTFT.

    ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD`` (Ray's default 1), passed on to every replica when exported
    where the app is built: ``0`` runs a replica's own code (the engine) on the replica's event loop instead of a
    second thread's. For the LLM replicas the default stays Ray's: behind HAProxy, one loop in every replica
    cost 4-6% of tokens/s at 128 streams on 2 cores (README "Streaming")."""
    out = {}
    for name, default in PROCESS_ENV.items():
        value = environ.get(name, default)
        if value:
            out[name] = value
    return out


def ingress_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables of the ingress replicas' processes: ``process_env``, and the ingress's code on the
    loop that serves HTTP (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``, as Ray's "throughput optimized"
    mode sets) unless that variable is exported where the app is built (an empty value: Ray's default, a second
    thread's loop).

    Why: with direct ingress the ASGI app otherwise runs on a second thread's loop and every SSE event crosses
    to the HTTP loop through Serve's message queue. Side by side behind HAProxy (README "Streaming"): less CPU
    per streamed token, a lower TTFT-out, no fewer tokens/s. The request router keeps its own loop (Ray's
    default): on the HTTP loop too, ``halffull bench serve`` fell to 0.90-0.92 of Ray's router's requests/s
    (halffull's router costs more per request than power-of-two), against 1.04 on its own loop."""
    out = process_env(environ)
    if SEPARATE_THREAD not in environ:
        out[SEPARATE_THREAD] = "0"
    return out


def build_app(args: Mapping[str, Any] | None = None):
    """The Serve application: ``OpenAIIngress`` in front of ``num_replicas`` ``LLMReplica``s. Serve's app
    builder (``import_path`` of a config file), so exactly one parameter, as Serve requires."""
    return build_app_with_env(args, os.environ)


def build_app_with_env(args: Mapping[str, Any] | None, environ: Mapping[str, str]):
    """``build_app``, its replica processes' environment taken from ``environ`` (``process_env``,
    ``ingress_env``)."""
    config = AppConfig.from_args(args)
    env = process_env(environ)
    runtime_env = {"env_vars": env} if env else {}
    ingress_runtime_env = {"env_vars": ingress_env(environ)}
    if config.backend == "vllm":
        config.vllm_config().check_engine_arg_names()  # here, not in AppConfig.check: it imports vLLM
    router_config = {"request_routing_stats_period_s": config.stats_period_s,
                     "request_routing_stats_timeout_s": max(2.0, 4 * config.stats_period_s)}
    if config.router != RAY_DEFAULT_ROUTER:
        router_config.update(
            request_router_class="halffull.router.serve_router:HalffullRequestRouter",
            request_router_kwargs={"policy": config.router, "policy_params": dict(config.router_params),
                                   "seed": config.router_seed},
        )
    backpressure = BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s)
    llm = LLMReplica.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options={"num_cpus": config.replica_num_cpus, "num_gpus": config.replica_num_gpus,
                           "runtime_env": runtime_env},
        request_router_config=RequestRouterConfig(**router_config),
    ).bind(**config.replica_options())
    digests = [d.hex() for d in api_key_digests(os.environ)]  # keys never leave this process, digests do
    return OpenAIIngress.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": ingress_runtime_env},
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests + INGRESS_BURST_SLOTS,
        max_queued_requests=config.ingress_max_queued_requests,
        backpressure_config=backpressure,
    ).bind(llm, dataclasses.asdict(config), digests)
