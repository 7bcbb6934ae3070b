"""The app's configuration: ``AppConfig``, the ``args`` of a Serve config file (``build_app``), one dataclass
holding every default; unknown keys and ill-typed values fail where the app is built, not in Serve.

Backends (``backend``): ``sim`` (default; simulated replicas: ``gpu``, ``model``, ``speedup``, ``engine``) or
``vllm`` (one vLLM ``AsyncLLM`` engine per replica, replicas/vllm/backend.py: the ``vllm`` section is
``VllmEngineConfig``, replicas/vllm/config.py; ``replica_num_gpus: 1`` on GPUs; examples deploy/vllm_gpu.yaml,
deploy/vllm_cpu.yaml). ``engine_policy`` / ``engine_params`` choose halffull's scheduler policy in both. With
vLLM the ingress tokenizes with the model's own Hugging Face tokenizer and chat template (``make_tokenizer``),
and prompt token ids must be below the tokenizer's size.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from halffull.deploy.tokenizer import SimTokenizer
from halffull.replicas.deployment import BACKENDS, MAX_ONGOING_REQUESTS, MAX_STREAM_INTERVAL_MS, STREAM_INTERVAL_MS
from halffull.replicas.sim.profile_model import latency_model
from halffull.replicas.sim.realtime import SimEngineConfig, check_engine_params, check_field_types, known_fields
from halffull.replicas.vllm.config import VllmEngineConfig  # no vLLM import: the config section only
from halffull.router.registry import make_policy

REPLICA_CALLS = ("grpc", "actor")  # AppConfig.replica_calls
RAY_DEFAULT_ROUTER = "ray_default"  # Ray Serve's own PowerOfTwoChoicesRequestRouter (baseline)
_MAX_INT = 1 << 62
_MAX_COUNT = 1 << 24  # limits and counts (Serve stores them as int32; 2x + slack must fit)
# Serve's own concurrency limit for an ingress replica is ingress_max_ongoing_requests + this: room for a burst
# to reach the ingress's cheap 429 (and for /health, /metrics) instead of waiting in the proxy, which retries a
# full replica with backoff (up to 0.5 s a try) before it answers anything.
INGRESS_BURST_SLOTS = 1024


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
    # Streaming (replicas/deployment.py "Batches"): a stream's first token goes out at once; each later item
    # carries every token produced since the previous one and waits at most this long after it (0: one item
    # per engine step). Larger: less CPU per token, burstier token arrival at the client.
    stream_interval_ms: float = STREAM_INTERVAL_MS
    # Tokens from LLM replicas to the ingress over the token channel (replicas/channel.py: one TCP connection per
    # ingress x replica on the node IP, one message per engine step for all of that ingress's streams) instead of
    # one Serve stream item per stream per batch (~0.3-0.6 ms of CPU at each end per item).
    token_channel: bool = True
    # How the ingress calls the LLM replicas (the per-request Serve call: routing, admission, the first batch,
    # cancellation, failures): "grpc", the replicas' inter-deployment gRPC servers (the node IP), by value; or
    # "actor", Ray actor calls and object references (Serve's default). gRPC costs less CPU per request.
    replica_calls: str = "grpc"
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
        if not 0 <= self.stream_interval_ms <= MAX_STREAM_INTERVAL_MS:
            raise ValueError(f"stream_interval_ms must be in [0, {MAX_STREAM_INTERVAL_MS:g}], "
                             f"got {self.stream_interval_ms}")
        if self.replica_calls not in REPLICA_CALLS:
            raise ValueError(f"replica_calls must be one of {list(REPLICA_CALLS)}, got {self.replica_calls!r}")
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
        latency_model(engine.gpu, engine.model, engine.tp)

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
        return engine.max_model_len or latency_model(engine.gpu, engine.model, engine.tp).model.max_model_len

    def base_model(self) -> str:
        """The model behind the endpoint: the simulated profile's name, or vLLM's model path or id."""
        return self.vllm_config().model if self.backend == "vllm" else self.model

    def model_name(self) -> str:
        """The name clients use (``served_model_name``, else the base model)."""
        return self.served_model_name or self.base_model()

    def replica_options(self) -> dict[str, Any]:
        """``LLMReplica``'s constructor arguments (backend kind and its options)."""
        if self.backend == "vllm":
            return {"backend": "vllm", "stream_interval_ms": self.stream_interval_ms,
                    "engine": {**self.vllm_config().to_dict(), "engine_policy": self.engine_policy,
                               "engine_params": dict(self.engine_params)}}
        engine = self.engine_config()
        engine_dict = {f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)}
        engine_dict["output_vocab"] = list(engine.output_vocab or ())
        engine_dict["engine_params"] = dict(engine.engine_params)
        return {"backend": "sim", "engine": engine_dict, "stream_interval_ms": self.stream_interval_ms}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def make_tokenizer(config: AppConfig):
    """The ingress's tokenizer: the simulated model's, or the real model's own (deploy/hf_tokenizer.py)."""
    if config.backend == "vllm":
        from halffull.deploy.hf_tokenizer import HfTokenizer

        return HfTokenizer.load(config.vllm_config().tokenizer_path)
    return SimTokenizer()

