"""The OpenAI-compatible ingress and the app builder: ``serve run deploy/serve_config.yaml``.

::

    client -> Serve HTTP proxy (127.0.0.1:8000) -> OpenAIIngress (this file, FastAPI)
        validate -> tokenize once (deploy/tokenizer.py; vLLM: the model's, deploy/hf_tokenizer.py)
        -> routing kwarg: token count + prefix hashes
        -> DeploymentHandle(LLMReplica) -> HalffullRequestRouter (router/serve_router.py) -> policy.choose
        -> LLMReplica (replicas/deployment.py) -> engine backend -> token ids streamed back -> text / SSE

Endpoints
  POST /v1/completions        prompt: string, [string], token ids, or [token ids] (one prompt per request)
  POST /v1/chat/completions   messages -> the chat template of deploy/tokenizer.py (vLLM: the tokenizer's own)
  GET  /v1/models             the one served model
  GET  /health                200 {"status": "ok"} while the ingress is up
  GET  /metrics               halffull's Prometheus metrics, read from this node's Ray metrics agent

Request fields honoured: ``model`` (must be the served name; else 404), ``max_tokens`` (chat also
``max_completion_tokens``; default: the rest of the context, as vLLM), ``stream``,
``stream_options.include_usage``, ``ignore_eos`` (vLLM extra: run to ``max_tokens``; otherwise the simulated
model stops at its pseudo-EOS length, 16-256 tokens derived from the prompt: replicas/sim/realtime.py),
``priority`` (vLLM extra; lower runs first under the ``priority`` engine policy). Sampling fields
(temperature, top_p, seed, presence / frequency penalties) go to a vLLM engine; ``stop`` and ``user`` are
type-checked and otherwise ignored, as are all sampling fields by the simulated model (its output is
deterministic). Not supported (400 when set to a non-default value): ``n`` > 1, ``best_of`` > 1,
``echo``, ``logprobs``.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``, never a 500 for bad input:

  400  malformed JSON, missing or ill-typed fields, bad ``max_tokens`` (below 1, above ``max_output_tokens``),
       prompts beyond the context (``code: context_length_exceeded``)
  401  API keys are configured and the request has no valid ``Authorization: Bearer <key>`` (``invalid_api_key``)
  404  unknown model or path;  405  wrong method
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
A stream that fails after it started (its replica died after sending tokens, the timeout passed) ends with one
``data: {"error": ...}`` event and ``data: [DONE]``; ``halffull_stream_errors_total`` counts them.

Replica failure. A request whose replica fails before producing any output token for it (queued in Serve or
in the engine, or still in prefill) is re-sent, at most ``replica_retries`` times; the router has already
dropped the dead replica (Ray calls ``on_replica_actor_died``), so the re-send goes to a survivor. A request
that had started generating is not re-run behind the client's back (that would double its cost and latency
unseen): a stream ends with an error event, a non-streaming request gets a 503 the client may retry.
``x-halffull-replica`` / ``x-halffull-retries`` name the replica that answered (or failed) and the re-sends.

Auth (off by default). API keys come from ``HALFFULL_API_KEYS`` (comma-separated) and/or
``HALFFULL_API_KEYS_FILE`` (one key per line, ``#`` comments), read where the app is built (``serve run``) and in
each ingress replica's own environment; the union is accepted. Only SHA-256 digests leave the building
process. With any key configured, every route but ``GET /health`` (unknown paths included) answers 401
without ``Authorization: Bearer <key>``; comparison is ``hmac.compare_digest`` over digests, against every key.
A variable that is set but holds no key, or an unreadable key file, fails the deployment rather than leaving
the API open.

Routing data (computed once per request): the prompt's token count and chained hashes of its full blocks of
``prefix_block_size`` tokens (default 64: fine enough to credit a shared system prompt, coarse enough to keep
the router's prefix index and the call small; 4 engine blocks of 16), passed as the ``routing`` keyword
argument (router/serve_router.py). The router reads them; the replica ignores them.

Metrics (``ray.serve.metrics``: every process reports to its node's Ray metrics agent, so the series from all
ingress replicas aggregate in Prometheus). Scrape each Ray node's metrics agent,
``http://127.0.0.1:<metrics export port>/metrics`` (fix the port with ``ray start --metrics-export-port``;
Ray's Prometheus service discovery file lists all nodes), or read ``GET /metrics`` here, which returns this
node's ``halffull_*`` series. Names (Ray prefixes them with ``ray_``):
  halffull_requests_total{endpoint, status}                 requests by HTTP status
  halffull_routed_requests_total{llm_replica, policy}       which replica served each request (the routing
                                                            decision that stuck, after any rejection)
  halffull_ttft_seconds, halffull_tpot_seconds, halffull_e2e_seconds   histograms (DESIGN.md §7 definitions,
                                                            measured at the ingress)
  halffull_prompt_tokens_total, halffull_output_tokens_total, halffull_cached_prompt_tokens_total
  halffull_preemptions_total                                preemptions suffered by finished requests
  halffull_stream_errors_total{endpoint, code}              started streams that ended with an error event
  halffull_retries_total{reason}                            re-sends after a replica failure
  halffull_rejected_requests_total{reason}                  429s: ingress | queue | engine
  halffull_ingress_active_requests                          generation requests in this ingress replica now

Backends (``backend``): ``sim`` (default; simulated replicas: ``gpu``, ``model``, ``speedup``, ``engine``) or
``vllm`` (one vLLM ``AsyncLLM`` engine per replica, replicas/vllm/backend.py: the ``vllm`` section is
``VllmEngineConfig``, replicas/vllm/config.py; ``replica_num_gpus: 1`` on GPUs; examples deploy/vllm_gpu.yaml,
deploy/vllm_cpu.yaml). ``engine_policy`` / ``engine_params`` choose halffull's scheduler policy in both. With
vLLM the ingress tokenizes with the model's own Hugging Face tokenizer and chat template, prompt token ids
must be below the tokenizer's size, and the sampling fields above reach vLLM's ``SamplingParams``.

App arguments (``build_app``; YAML ``args``): see ``AppConfig``.
"""

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from halffull.deploy.tokenizer import CHAT_ROLES, SimTokenizer
from halffull.replicas.backend import SAMPLING_FIELDS
from halffull.replicas.deployment import (
    BACKENDS,
    MAX_ONGOING_REQUESTS,
    LLMReplica,
    bind_replica_grpc_to_node_ip,
    process_memory,
)
from halffull.replicas.sim.latency import LatencyModel
from halffull.replicas.sim.realtime import (
    EngineDeadError,
    EngineOverloadedError,
    SimEngineConfig,
    check_engine_params,
    check_field_types,
    known_fields,
)
from halffull.replicas.vllm.config import VllmEngineConfig  # no vLLM import: the config section only
from halffull.router import serve_router
from halffull.router.registry import make_policy

logger = logging.getLogger("ray.serve")

RAY_DEFAULT_ROUTER = "ray_default"  # Ray Serve's own PowerOfTwoChoicesRequestRouter (baseline)
TOKEN_ID_LIMIT = 1 << 40  # the simulated tokenizer's ids are below this
_MAX_INT = 1 << 62
_MAX_COUNT = 1 << 24  # limits and counts (Serve stores them as int32; 2x + slack must fit)
# Serve's own concurrency limit for an ingress replica is ingress_max_ongoing_requests + this: room for a burst
# to reach the ingress's cheap 429 (and for /health, /metrics) instead of waiting in the proxy, which retries a
# full replica with backoff (up to 0.5 s a try) before it answers anything.
INGRESS_BURST_SLOTS = 1024
API_KEYS_ENV = "HALFFULL_API_KEYS"
API_KEYS_FILE_ENV = "HALFFULL_API_KEYS_FILE"
OPEN_PATHS = frozenset({"/health"})  # answered without an API key


# ---- app configuration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AppConfig:
    """``serve_config.yaml`` ``args``. Unknown keys and ill-typed values fail; every default lives here."""

    num_replicas: int = 4  # LLMReplica replicas
    backend: str = "sim"  # "sim": simulated replicas (gpu, model, speedup, engine); "vllm": real engines (vllm)
    vllm: Mapping[str, Any] = field(default_factory=dict)  # VllmEngineConfig (replicas/vllm/config.py)
    router: str = "sal"  # a halffull.router.registry name, or "ray_default" (Ray's power-of-two router)
    router_params: Mapping[str, Any] = field(default_factory=dict)
    router_seed: int | None = None
    stats_period_s: float = 0.5  # request_routing_stats_period_s
    engine_policy: str = "larry"  # halffull.replicas.engine.policies name
    engine_params: Mapping[str, Any] = field(default_factory=dict)
    gpu: str = "h100"
    model: str = "llama3-8b"
    speedup: float = 1.0  # simulated step times are divided by this
    engine: Mapping[str, Any] = field(default_factory=dict)  # further SimEngineConfig options, e.g.
    #   max_waiting_requests (the engine's waiting-queue limit: 429 beyond it), max_model_len, max_num_seqs
    served_model_name: str | None = None  # default: the model profile name
    prefix_block_size: int = 64  # tokens per router prefix hash
    max_ongoing_requests: int = MAX_ONGOING_REQUESTS  # per LLMReplica
    replica_num_cpus: float = 0.0
    replica_num_gpus: float = 0.0  # per LLMReplica (vLLM on GPUs: 1, or tensor_parallel_size)
    ingress_replicas: int = 1
    # Generation requests one ingress replica handles at once (queued for a replica, running or streaming);
    # beyond it 429 at once (Serve's own limit for the ingress is this + INGRESS_BURST_SLOTS).
    ingress_max_ongoing_requests: int = 4096
    # ---- overload, failures, limits (README "Production notes") ----
    max_queued_requests: int = 1024  # per ingress replica: requests waiting for a free LLMReplica slot; then 429
    ingress_max_queued_requests: int = 256  # Serve's queue in front of each ingress replica; then Serve's 429
    retry_after_s: float = 1.0  # Retry-After of every 429 / 503
    replica_retries: int = 2  # re-sends of a request whose replica failed before producing output for it
    request_timeout_s: float | None = 600.0  # arrival -> last token; then 504 / an error event; None: no limit
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    max_output_tokens: int | None = None  # largest max_tokens accepted, and the default; None: rest of context

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> "AppConfig":
        args = known_fields(cls, args, "app argument")
        if isinstance(args.get("speedup"), str):
            try:
                args["speedup"] = float(args["speedup"])
            except ValueError:
                raise ValueError(f"app argument 'speedup' must be a number, got {args['speedup']!r}") from None
        config = cls(**check_field_types(cls, args, "app argument"))
        config.check()
        return config

    def check(self) -> None:
        if self.router != RAY_DEFAULT_ROUTER:
            make_policy(self.router, self.router_params)  # unknown names / params fail here, not in Serve
        for name, lo in (("num_replicas", 1), ("ingress_replicas", 1), ("max_ongoing_requests", 1),
                         ("ingress_max_ongoing_requests", 1), ("max_queued_requests", 1),
                         ("ingress_max_queued_requests", 1), ("max_body_bytes", 1024)):
            value = getattr(self, name)
            if not lo <= value <= _MAX_COUNT:
                raise ValueError(f"{name} must be in [{lo}, {_MAX_COUNT}], got {value}")
        if not 1 <= self.prefix_block_size <= 1 << 20:
            raise ValueError("prefix_block_size must be >= 1 (and at most 2**20)")
        if not 0 <= self.replica_retries <= 10:
            raise ValueError(f"replica_retries must be in [0, 10], got {self.replica_retries}")
        for name, value in (("stats_period_s", self.stats_period_s), ("retry_after_s", self.retry_after_s),
                            ("request_timeout_s", self.request_timeout_s)):
            if value is not None and not (math.isfinite(value) and value >= (0 if name == "retry_after_s" else 1e-3)):
                raise ValueError(f"{name} must be a finite number of seconds (> 0), got {value}")
        for name, hi in (("replica_num_cpus", 1024), ("replica_num_gpus", 64)):
            value = getattr(self, name)
            if not (0 <= value <= hi and (value == 0 or value >= 1e-4)):  # Ray's resource precision is 1e-4
                raise ValueError(f"{name} must be 0 or in [0.0001, {hi}], got {value}")
        if self.router_seed is not None and abs(self.router_seed) > _MAX_INT:
            raise ValueError("router_seed out of range")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be empty")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be >= 1, got {self.max_output_tokens}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "vllm":
            self.check_vllm()
            return
        if self.vllm:
            raise ValueError("vllm options need backend: vllm")
        engine = self.engine_config()  # engine options and the engine policy's params fail here
        LatencyModel.from_profile(engine.gpu, engine.model, engine.tp)

    def check_vllm(self) -> None:
        sim_only = [f.name for f in dataclasses.fields(self)
                    if f.name in ("gpu", "model", "speedup", "engine") and getattr(self, f.name) != _default(f)]
        if sim_only:
            raise ValueError(f"{sim_only} configure the simulated backend; with backend: vllm set the model and "
                             f"engine options under vllm:")
        check_engine_params(self.engine_policy, self.engine_params)
        tp = self.vllm_config().tensor_parallel_size
        if self.replica_num_gpus and self.replica_num_gpus != tp:
            raise ValueError(f"replica_num_gpus ({self.replica_num_gpus:g}) must equal vllm.tensor_parallel_size "
                             f"({tp}): one GPU per tensor-parallel rank")

    def vllm_config(self) -> VllmEngineConfig:
        return VllmEngineConfig.from_dict(self.vllm)

    def engine_config(self) -> SimEngineConfig:
        if not isinstance(self.engine, Mapping):
            raise ValueError(f"engine must be a mapping, got {type(self.engine).__name__}")
        overlap = {"gpu", "model", "speedup", "engine_policy", "engine_params"} & set(self.engine)
        if overlap:
            raise ValueError(f"set {sorted(overlap)} at the top level of the app arguments, not under engine")
        return SimEngineConfig.from_dict({
            **self.engine, "gpu": self.gpu, "model": self.model, "speedup": self.speedup,
            "engine_policy": self.engine_policy, "engine_params": dict(self.engine_params),
            "output_vocab": SimTokenizer.output_vocab(),
        })

    def max_model_len(self) -> int:
        if self.backend == "vllm":
            return self.vllm_config().max_model_len
        engine = self.engine_config()
        return engine.max_model_len or LatencyModel.from_profile(engine.gpu, engine.model, engine.tp).model.max_model_len

    def base_model(self) -> str:
        """The model behind the endpoint: the simulated profile's name, or vLLM's model path or id."""
        return self.vllm_config().model if self.backend == "vllm" else self.model

    def model_name(self) -> str:
        """The name clients use (``served_model_name``, else the base model)."""
        return self.served_model_name or self.base_model()

    def replica_options(self) -> dict[str, Any]:
        """``LLMReplica``'s constructor arguments (backend kind and its options)."""
        if self.backend == "vllm":
            return {"backend": "vllm", "engine": {**self.vllm_config().to_dict(), "engine_policy": self.engine_policy,
                                                  "engine_params": dict(self.engine_params)}}
        engine = self.engine_config()
        engine_dict = {f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)}
        engine_dict["output_vocab"] = list(engine.output_vocab or ())
        engine_dict["engine_params"] = dict(engine.engine_params)
        return {"backend": "sim", "engine": engine_dict}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def make_tokenizer(config: AppConfig):
    """The ingress's tokenizer: the simulated model's, or the real model's own (deploy/hf_tokenizer.py)."""
    if config.backend == "vllm":
        from halffull.deploy.hf_tokenizer import HfTokenizer

        return HfTokenizer.load(config.vllm_config().tokenizer_path)
    return SimTokenizer()


def build_app(args: Mapping[str, Any] | None = None):
    """The Serve application: ``OpenAIIngress`` in front of ``num_replicas`` ``LLMReplica``s."""
    config = AppConfig.from_args(args)
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
        ray_actor_options={"num_cpus": config.replica_num_cpus, "num_gpus": config.replica_num_gpus},
        request_router_config=RequestRouterConfig(**router_config),
    ).bind(**config.replica_options())
    digests = [d.hex() for d in api_key_digests(os.environ)]  # keys never leave this process, digests do
    return OpenAIIngress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests + INGRESS_BURST_SLOTS,
        max_queued_requests=config.ingress_max_queued_requests,
        backpressure_config=backpressure,
    ).bind(llm, dataclasses.asdict(config), digests)


# ---- auth ----------------------------------------------------------------------------------------------
def load_api_keys(environ: Mapping[str, str]) -> list[str]:
    """Keys from ``HALFFULL_API_KEYS`` (comma-separated) and ``HALFFULL_API_KEYS_FILE`` (one per line, ``#``
    comments). [] when neither is set: auth is off. A source that is set but yields no key raises ValueError."""
    keys: list[str] = []
    if API_KEYS_ENV in environ:
        found = [k.strip() for k in environ[API_KEYS_ENV].split(",") if k.strip()]
        if not found:
            raise ValueError(f"{API_KEYS_ENV} is set but holds no key; unset it to turn auth off")
        keys += found
    path = environ.get(API_KEYS_FILE_ENV)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{API_KEYS_FILE_ENV}={path!r}: cannot read the key file: {exc}") from None
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"{API_KEYS_FILE_ENV}={path!r} holds no key; unset it to turn auth off")
        keys += found
    return keys


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")).digest()


def api_key_digests(environ: Mapping[str, str]) -> list[bytes]:
    return sorted({key_digest(k) for k in load_api_keys(environ)})


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def key_allowed(token: bytes | None, digests: tuple[bytes, ...]) -> bool:
    """Constant-time check of ``token`` against every configured key digest (no early exit)."""
    presented = key_digest(token if token is not None else b"")
    ok = False
    for digest in digests:
        ok |= hmac.compare_digest(presented, digest)
    return ok and token is not None


# ---- errors --------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def overloaded(message: str, retry_after_s: float) -> ApiError:
    """429 with Retry-After (whole seconds, rounded up, as RFC 9110 wants)."""
    return ApiError(429, f"{message}; retry after {math.ceil(retry_after_s)} s.", code="overloaded",
                    type="rate_limit_error", headers={"retry-after": str(math.ceil(retry_after_s))})


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")


def unauthorized() -> ApiError:
    return ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"})


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---- request validation (pure functions, unit-tested) ----------------------------------------------------
def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("Request body must be a JSON object", code="invalid_json")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(body: Mapping[str, Any], key: str, check, expected: str):
    value = body.get(key)
    if value is not None and not check(value):
        raise _bad(f"'{key}' must be {expected}, got {json.dumps(value)[:80]}", key, code="invalid_type")
    return value


def _check_common(body: Mapping[str, Any]) -> None:
    _optional(body, "stream", lambda v: isinstance(v, bool), "a boolean")
    _optional(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean")
    _optional(body, "priority", lambda v: _is_int(v) and abs(v) < _MAX_INT, "an integer")
    _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]")
    _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    _optional(body, "presence_penalty", lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]")
    _optional(body, "frequency_penalty", lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]")
    _optional(body, "seed", _is_int, "an integer")
    _optional(body, "user", lambda v: isinstance(v, str), "a string")
    _optional(body, "stop", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
              "a string or a list of strings")
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is not None:
        _optional(options, "include_usage", lambda v: isinstance(v, bool), "a boolean")
    n = _optional(body, "n", _is_int, "an integer")
    if n is not None and n != 1:
        raise _bad("only n = 1 is supported", "n")
    best_of = _optional(body, "best_of", _is_int, "an integer")
    if best_of is not None and best_of != 1:
        raise _bad("only best_of = 1 is supported", "best_of")
    if body.get("echo"):
        raise _bad("echo is not supported", "echo")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs are not supported", "logprobs")


def _check_token_ids(ids: list, param: str, limit: int = TOKEN_ID_LIMIT) -> list[int]:
    if not all(_is_int(t) and 0 <= t < limit for t in ids):
        raise _bad(f"'{param}' token ids must be integers in [0, {limit})", param)
    return ids


def completion_prompt_ids(body: Mapping[str, Any], tokenizer: SimTokenizer, max_model_len: int) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("'prompt' is required", "prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        _check_text_size(len(prompt), max_model_len, "prompt", tokenizer)
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = _check_token_ids(prompt, "prompt", getattr(tokenizer, "vocab_limit", TOKEN_ID_LIMIT))
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("batched prompts are not supported: send one prompt per request", "prompt")
    else:
        raise _bad("'prompt' must be a string, a list of token ids, or a list with one of those", "prompt",
                   code="invalid_type")
    if not ids:
        raise _bad("'prompt' must not be empty", "prompt")
    return ids


def chat_prompt_ids(body: Mapping[str, Any], tokenizer: SimTokenizer, max_model_len: int) -> list[int]:
    if "messages" not in body or body["messages"] is None:
        raise _bad("'messages' is required", "messages", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages", code="invalid_type")
    size = 0
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{param}' must be an object", param, code="invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"'{param}.role' must be one of {sorted(CHAT_ROLES)}, got {json.dumps(role)[:40]}",
                       f"{param}.role")
        content = message.get("content")
        if content is None and role != "assistant":
            raise _bad(f"'{param}.content' is required", f"{param}.content", code="missing_required_parameter")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"'{param}.content' parts must be {{\"type\": \"text\", \"text\": string}} objects",
                           f"{param}.content")
            size += sum(len(p["text"]) for p in content)
        elif content is not None and not isinstance(content, str):
            raise _bad(f"'{param}.content' must be a string or a list of text parts", f"{param}.content",
                       code="invalid_type")
        else:
            size += len(content or "")
    _check_text_size(size, max_model_len, "messages", tokenizer)
    try:
        return tokenizer.apply_chat_template(messages)
    except ValueError as exc:  # a real model's tokenizer without a chat template
        raise _bad(str(exc), "messages") from None


def _check_text_size(num_chars: int, max_model_len: int, param: str, tokenizer: Any = None) -> None:
    # Every token covers at most 4 bytes (a real model's tokenizer: at most ``max_chars_per_token``) and every
    # character is at least 1 byte, so a longer text has more than max_model_len tokens; refuse it before
    # tokenizing.
    if num_chars > getattr(tokenizer, "max_chars_per_token", 4) * max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens; the {param} is "
                       f"far longer ({num_chars} characters).", param=param, code="context_length_exceeded")


def resolve_max_tokens(body: Mapping[str, Any], num_prompt: int, max_model_len: int, *, chat: bool,
                       max_output_tokens: int | None = None) -> int:
    """The request's max_tokens, checked; default: the rest of the context, capped by ``max_output_tokens``."""
    key = "max_tokens"
    value = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        key, value = "max_completion_tokens", body["max_completion_tokens"]
    prompt_param = "messages" if chat else "prompt"
    if num_prompt >= max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                       f"request has {num_prompt} input tokens. Please reduce the length of the input.",
                       param=prompt_param, code="context_length_exceeded")
    if value is None:
        rest = max_model_len - num_prompt  # vLLM's default: the rest of the context
        return rest if max_output_tokens is None else min(rest, max_output_tokens)
    if not _is_int(value):
        raise _bad(f"'{key}' must be an integer, got {json.dumps(value)[:40]}", key, code="invalid_type")
    if value < 1:
        raise _bad(f"'{key}' must be at least 1, got {value}", key)
    if max_output_tokens is not None and value > max_output_tokens:
        raise _bad(f"'{key}' must be at most {max_output_tokens} on this server, got {value}", key)
    if num_prompt + value > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {num_prompt + value} tokens ({num_prompt} in the {prompt_param}, {value} in "
                       f"the completion). Please reduce the length of the {prompt_param} or completion.",
                       param=key, code="context_length_exceeded")
    return value


# ---- metrics -------------------------------------------------------------------------------------------
_TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
_TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0]
_E2E_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class _Metrics:
    def __init__(self, policy: str):
        self.policy = policy
        self.requests = metrics.Counter("halffull_requests", "Requests by endpoint and HTTP status.",
                                        tag_keys=("endpoint", "status"))
        self.routed = metrics.Counter("halffull_routed_requests", "Requests served, by LLM replica.",
                                      tag_keys=("llm_replica", "policy"))
        self.ttft = metrics.Histogram("halffull_ttft_seconds", "Time to first token.", boundaries=_TTFT_BUCKETS)
        self.tpot = metrics.Histogram("halffull_tpot_seconds", "Time per output token after the first.",
                                      boundaries=_TPOT_BUCKETS)
        self.e2e = metrics.Histogram("halffull_e2e_seconds", "Request latency, arrival to last token.",
                                     boundaries=_E2E_BUCKETS)
        self.prompt_tokens = metrics.Counter("halffull_prompt_tokens", "Prompt tokens of finished requests.")
        self.cached_tokens = metrics.Counter("halffull_cached_prompt_tokens", "Prompt tokens served from cache.")
        self.output_tokens = metrics.Counter("halffull_output_tokens", "Output tokens generated.")
        self.preemptions = metrics.Counter("halffull_preemptions", "Preemptions of finished requests.")
        self.stream_errors = metrics.Counter("halffull_stream_errors",
                                             "Started streams that ended with an error event.",
                                             tag_keys=("endpoint", "code"))
        self.retries = metrics.Counter("halffull_retries", "Re-sends after a replica failure.", tag_keys=("reason",))
        self.rejected = metrics.Counter("halffull_rejected_requests", "Requests refused with 429, by the limit hit.",
                                        tag_keys=("reason",))
        self.active = metrics.Gauge("halffull_ingress_active_requests",
                                    "Generation requests in this ingress replica now.")

    def status(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})

    def finished(self, run: "_Run") -> None:
        end = run.end or {}
        self.routed.inc(tags={"llm_replica": run.replica or "unknown", "policy": self.policy})
        if run.first_token_time is not None:
            ttft = run.first_token_time - run.arrival
            self.ttft.observe(ttft)
            e2e = run.last_token_time - run.arrival
            self.e2e.observe(e2e)
            if run.num_tokens > 1:
                self.tpot.observe((e2e - ttft) / (run.num_tokens - 1))
        self.prompt_tokens.inc(end.get("num_prompt_tokens", 0) or 0)
        if end.get("num_cached_tokens"):
            self.cached_tokens.inc(end["num_cached_tokens"])
        if run.num_tokens:
            self.output_tokens.inc(run.num_tokens)
        if end.get("num_preemptions"):
            self.preemptions.inc(end["num_preemptions"])


# ---- one request's run against the LLM deployment ---------------------------------------------------------
def _replica_failed(exc: BaseException) -> bool:
    """The replica (not the request) failed: dead or unreachable actor, crashed engine. Safe to re-send."""
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, serve.exceptions.ReplicaUnavailableError,
                            EngineDeadError))


class _Run:
    """One request against the LLM deployment: start event, token ids, end event; re-sends and a deadline.

    ``call(attempt)`` sends attempt ``attempt`` (0, 1, ...) and returns its response stream. A replica failure
    (``_replica_failed``) before the first output token re-sends, at most ``max_retries`` times (in ``start``,
    ``tokens`` and ``collect``); after it, the failure is the caller's. Every wait ends at ``deadline``
    (event-loop time; None: none) with TimeoutError.
    """

    def __init__(self, call, request_id: str, arrival: float, *, max_retries: int = 0,
                 deadline: float | None = None, on_retry=None):
        self._call = call
        self.request_id = request_id
        self.arrival = arrival
        self.max_retries = max_retries
        self.deadline = deadline
        self._on_retry = on_retry
        self.attempt = 0
        self.stream = None
        self.done = False  # the current stream ran to its end: nothing to cancel
        self._reset()

    @staticmethod
    def attempt_id(request_id: str, attempt: int) -> str:
        """The engine / router request id of one attempt (distinct, so a re-send never collides)."""
        return request_id if attempt == 0 else f"{request_id}-retry{attempt}"

    def _reset(self) -> None:
        self.replica: str | None = None
        self.end: dict[str, Any] | None = None
        self.num_tokens = 0
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    async def _next(self):
        if self.deadline is None:
            return await self.stream.__anext__()
        async with asyncio.timeout_at(self.deadline):
            return await self.stream.__anext__()

    async def start(self) -> None:
        """Send the request; return once a replica accepted it (its start event)."""
        while True:
            self.stream = self._call(self.attempt)
            self.done = False
            try:
                first = await self._next()
            except Exception as exc:  # the stream may still run (our deadline): cancel() must still act
                if not self._may_retry(exc):
                    raise
                await self._before_retry(exc)
                continue
            if isinstance(first, dict) and first.get("event") == "overloaded":
                self.done = True
                raise EngineOverloadedError(first.get("message") or "the engine's waiting queue is full")
            if not (isinstance(first, dict) and first.get("event") == "start"):
                raise RuntimeError(f"unexpected first stream item {first!r}")
            self.replica = first.get("replica")
            return

    def _may_retry(self, exc: BaseException) -> bool:
        return self.attempt < self.max_retries and _replica_failed(exc)

    async def _before_retry(self, exc: BaseException) -> None:
        self.cancel()
        self.attempt += 1
        self._reset()
        if self._on_retry is not None:
            self._on_retry(type(exc).__name__)
        # Give the router a moment to learn the replica's death (it hears it from the failed call itself).
        await asyncio.sleep(0.02 * self.attempt)

    def _token(self, item) -> bool:
        """Account one stream item; True if it is an output token."""
        if isinstance(item, dict):
            if item.get("event") == "end":
                self.end = item
            return False
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.num_tokens += 1
        return True

    async def tokens(self) -> AsyncIterator[int]:
        """Output token ids as they come; re-sends only before the first token."""
        while True:
            try:
                item = await self._next()
            except StopAsyncIteration:
                self.done = True
                return
            except Exception as exc:  # the stream may still run (our deadline): cancel() must still act
                if self.num_tokens or not self._may_retry(exc):
                    raise
                await self._before_retry(exc)
                await self.start()
                continue
            if self._token(item):
                yield item

    async def collect(self) -> list[int]:
        """All output token ids (non-streaming), with the same re-send rule."""
        return [token async for token in self.tokens()]

    @property
    def finish_reason(self) -> str:
        return (self.end or {}).get("finish_reason") or "stop"

    def usage(self) -> dict[str, Any]:
        end = self.end or {}
        prompt = end.get("num_prompt_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": self.num_tokens,
                "total_tokens": prompt + self.num_tokens,
                "prompt_tokens_details": {"cached_tokens": end.get("num_cached_tokens", 0)}}

    def cancel(self) -> None:
        """Cancel the current attempt on its replica (the engine aborts it and frees its KV blocks)."""
        if self.stream is None or self.done:
            return
        self.done = True
        try:
            self.stream.cancel()
        except Exception:  # already finished
            pass


class _Admission:
    """One generation request counted against ``ingress_max_ongoing_requests``; ``release`` is idempotent."""

    __slots__ = ("_ingress", "_held")

    def __init__(self, ingress: "OpenAIIngress"):
        self._ingress = ingress
        self._held = True
        ingress.num_active += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._ingress.num_active -= 1


def _abandoned(run: _Run, admission: _Admission) -> None:
    """A streaming body that was dropped without running to its end (e.g. never started): clean up."""
    run.cancel()
    admission.release()


def _classify(exc: BaseException, retry_after_s: float = 1.0) -> ApiError:
    """A failure from the LLM deployment as an HTTP error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValueError):  # the replica's validate(): the request can never run
        message = str(exc).strip().splitlines()[-1].removeprefix("ValueError: ")
        return _bad(message[:500], code="invalid_request")
    if isinstance(exc, serve.exceptions.BackPressureError):
        return overloaded(f"The service is overloaded: {exc.message}", retry_after_s)
    if isinstance(exc, EngineOverloadedError):
        message = str(exc).strip().splitlines()[-1].split(": ", 1)[-1]
        return overloaded(f"The service is overloaded: {message}", retry_after_s)
    if isinstance(exc, TimeoutError):
        return ApiError(504, "The request did not complete within the server's request timeout.", code="timeout")
    retry = {"retry-after": str(math.ceil(retry_after_s))}
    if _replica_failed(exc):
        return ApiError(503, "The model replica serving this request failed; retry the request.",
                        code="replica_unavailable", headers=retry)
    if isinstance(exc, serve.exceptions.DeploymentUnavailableError):
        return ApiError(503, "The model is not available right now; retry later.", code="unavailable",
                        headers=retry)
    logger.error("halffull ingress: request failed: %r", exc)
    return ApiError(500, f"Internal error: {type(exc).__name__}", code="internal_error")


def _rejected_reason(exc: BaseException) -> str:
    return "engine" if isinstance(exc, EngineOverloadedError) else "queue"


def _node_metrics_text() -> str:
    """This node's halffull_* series from the Ray metrics agent (blocking; run in a thread)."""
    import urllib.request

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None or not node.get("MetricsExportPort"):
        return "# no metrics agent found on this node\n"
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return "".join(line + "\n" for line in text.splitlines() if "halffull_" in line)


# ---- auth, as ASGI middleware (ahead of routing: unknown paths and wrong methods need a key too) --------------
class _ApiKeyGuard:
    """Pure ASGI (not BaseHTTPMiddleware, which would buffer streams and break disconnect handling).

    ``digests`` is a class attribute set by the ingress constructor (one ingress replica per Ray worker
    process). Not a module global: Serve pickles the ingress methods by value, so a ``global`` statement in
    them would write to a copy of this module's namespace; the class itself is pickled by reference.
    """

    digests: tuple[bytes, ...] = ()

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        digests = _ApiKeyGuard.digests
        if scope["type"] == "http" and digests:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            if path not in OPEN_PATHS:
                header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
                if not key_allowed(bearer_token(header), digests):
                    await unauthorized().response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)


# ---- the ingress deployment ----------------------------------------------------------------------------
# serve.ingress pickles the FastAPI app (and so the route methods) when the class is decorated: every module
# name the methods use must be defined above this line. No ``from __future__ import annotations`` in this
# module: FastAPI must resolve ``request: Request`` from the pickled methods' own globals.
fastapi_app = FastAPI(title="halffull OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
fastapi_app.add_middleware(_ApiKeyGuard)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, str(exc.detail), code=code).response()


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
        self.config = AppConfig.from_args(config)
        # Keys given where the app was built, plus any in this replica's own environment.
        digests = {bytes.fromhex(d) for d in api_key_digests_hex} | set(api_key_digests(os.environ))
        _ApiKeyGuard.digests = tuple(sorted(digests))
        self.llm = llm.options(stream=True).generate
        self.tokenizer = make_tokenizer(self.config)
        self.model = self.config.model_name()
        self.root_model = self.config.base_model()
        self.max_model_len = self.config.max_model_len()
        self.prefix_block_size = self.config.prefix_block_size
        self.created = int(time.time())
        self.metrics = _Metrics(self.config.router)
        self.num_active = 0
        if digests:
            logger.info("halffull ingress: API keys required (%d configured)", len(digests))

    # ---- plain endpoints -------------------------------------------------------------------------------
    @fastapi_app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.created, "owned_by": "halffull",
            "max_model_len": self.max_model_len,
            "root": self.root_model,
        }]}

    @fastapi_app.get("/metrics")
    async def prometheus(self) -> PlainTextResponse:
        text = await asyncio.get_running_loop().run_in_executor(None, _node_metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def load(self) -> dict[str, Any]:
        """Generation requests in this ingress replica now, its pid and RSS (tests, soak; not an HTTP route)."""
        return {"num_active": self.num_active, "auth": bool(_ApiKeyGuard.digests), **process_memory()}

    # ---- generation ------------------------------------------------------------------------------------
    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool):
        endpoint = "chat" if chat else "completions"
        arrival = time.perf_counter()
        config = self.config
        if self.num_active >= config.ingress_max_ongoing_requests:
            # Refuse before reading the body: the cheapest answer under a flood.
            self.metrics.rejected.inc(tags={"reason": "ingress"})
            self.metrics.status(endpoint, 429)
            return overloaded(f"The service is overloaded ({self.num_active} requests in progress)",
                              config.retry_after_s).response()
        admission = _Admission(self)
        self.metrics.active.set(self.num_active)
        handed_over = False
        try:
            timeout = config.request_timeout_s
            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
            try:
                body = parse_body(await self._read_body(request))
                prompt_ids, max_tokens = self._validate(body, chat=chat)
            except ApiError as err:
                self.metrics.status(endpoint, err.status)
                return err.response()
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            base = {"prompt_token_ids": prompt_ids, "max_tokens": max_tokens,
                    "ignore_eos": bool(body.get("ignore_eos")), "priority": body.get("priority") or 0,
                    "sampling": {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}}
            prefix_block_size = self.prefix_block_size

            def call(attempt: int):
                rid = _Run.attempt_id(request_id, attempt)
                routing = serve_router.routing_kwarg(rid, prompt_ids, max_tokens, prefix_block_size=prefix_block_size)
                return self.llm.remote({**base, "request_id": rid}, routing=routing)

            run = _Run(call, request_id, arrival, max_retries=config.replica_retries, deadline=deadline,
                       on_retry=lambda reason: self.metrics.retries.inc(tags={"reason": reason}))
            try:
                await run.start()  # routed and accepted: errors until here are still HTTP errors
            except asyncio.CancelledError:
                run.cancel()
                raise
            except Exception as exc:
                return self._failed(run, exc, endpoint)
            headers = {"x-request-id": request_id, "x-halffull-replica": run.replica or "",
                       "x-halffull-retries": str(run.attempt)}
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                events = self._sse(run, request_id, chat=chat, include_usage=include_usage, endpoint=endpoint,
                                   admission=admission)
                # A body that is dropped unstarted (client gone before the response began) never runs its
                # finally: release the admission and cancel the replica's work when it is collected.
                weakref.finalize(events, _abandoned, run, admission)
                handed_over = True
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            try:
                token_ids = await run.collect()
            except asyncio.CancelledError:  # the client went away: stop the replica's work
                run.cancel()
                raise
            except Exception as exc:
                return self._failed(run, exc, endpoint)
            headers["x-halffull-replica"] = run.replica or ""
            headers["x-halffull-retries"] = str(run.attempt)
            self._finished(run, endpoint, 200)
            text = self.tokenizer.decode(token_ids)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": run.finish_reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish_reason}
            payload = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                       "created": int(time.time()), "model": self.model, "choices": [choice], "usage": run.usage()}
            return JSONResponse(payload, headers=headers)
        finally:
            if not handed_over:
                admission.release()
                self.metrics.active.set(self.num_active)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) past ``max_body_bytes``: from Content-Length before reading, else while
        reading a chunked body."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise _bad("Content-Length must be a non-negative integer", code="invalid_request")
            if int(length) > limit:
                raise too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _validate(self, body: Mapping[str, Any], *, chat: bool) -> tuple[list[int], int]:
        model = body.get("model")
        if model is None:
            raise _bad("'model' is required", "model", code="missing_required_parameter")
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model", code="invalid_type")
        if model != self.model:
            raise ApiError(404, f"The model '{model[:100]}' does not exist; this server serves '{self.model}'.",
                           param="model", code="model_not_found")
        _check_common(body)
        if chat:
            ids = chat_prompt_ids(body, self.tokenizer, self.max_model_len)
        else:
            ids = completion_prompt_ids(body, self.tokenizer, self.max_model_len)
        return ids, resolve_max_tokens(body, len(ids), self.max_model_len, chat=chat,
                                       max_output_tokens=self.config.max_output_tokens)

    def _error(self, exc: BaseException, endpoint: str) -> ApiError:
        err = _classify(exc, self.config.retry_after_s)
        self.metrics.status(endpoint, err.status)
        if err.status == 429:
            self.metrics.rejected.inc(tags={"reason": _rejected_reason(exc)})
        return err

    def _failed(self, run: _Run, exc: Exception, endpoint: str) -> JSONResponse:
        run.cancel()
        response = self._error(exc, endpoint).response()
        if run.replica:
            response.headers["x-halffull-replica"] = run.replica
        response.headers["x-halffull-retries"] = str(run.attempt)
        return response

    def _finished(self, run: _Run, endpoint: str, status: int) -> None:
        self.metrics.status(endpoint, status)
        try:
            self.metrics.finished(run)
        except Exception:
            logger.exception("halffull ingress: metrics failed")
        if run.end is not None:
            serve_router.report_completion(_Run.attempt_id(run.request_id, run.attempt), run.num_tokens)

    async def _sse(self, run: _Run, request_id: str, *, chat: bool, include_usage: bool, endpoint: str,
                   admission: _Admission):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        decoder = self.tokenizer.stream_decoder()

        def chunk(delta_or_text: Any, finish_reason: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
            data = {"id": request_id, "object": obj, "created": created, "model": self.model, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        done = False
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            async for token in run.tokens():
                text = decoder.feed((token,))
                if text:
                    yield chunk({"content": text} if chat else text, None)
            tail = decoder.flush()
            if tail:
                yield chunk({"content": tail} if chat else tail, None)
            yield chunk({} if chat else "", run.finish_reason)
            if include_usage:
                data = {"id": request_id, "object": obj, "created": created, "model": self.model, "choices": [],
                        "usage": run.usage()}
                yield f"data: {json.dumps(data)}\n\n"
            done = True
            self._finished(run, endpoint, 200)
        except Exception as exc:
            run.cancel()
            err = self._error(exc, endpoint)
            self.metrics.stream_errors.inc(tags={"endpoint": endpoint, "code": err.code or "error"})
            yield f"data: {json.dumps(err.body())}\n\n"
            done = True
        finally:
            if not done:  # the client went away: stop the replica's work
                run.cancel()
            admission.release()
            self.metrics.active.set(self.num_active)
        yield "data: [DONE]\n\n"
