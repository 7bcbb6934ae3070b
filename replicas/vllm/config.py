"""``VllmEngineConfig``: the ``vllm:`` section of a Serve config (``backend: vllm``). No vLLM import.

Every field but ``engine_args`` and ``env`` is a vLLM engine argument (``AsyncEngineArgs``) of the same name;
``None`` leaves vLLM's own default. The engine policy is not set here: the app's ``engine_policy`` /
``engine_params`` reach halffull's scheduler inside vLLM (replicas/vllm/scheduler.py) through
``additional_config``, and the backend (replicas/vllm/backend.py) chooses the scheduler class itself.

    model                    local directory (``~`` expanded) or Hugging Face hub id; required
    tokenizer                the ingress's and vLLM's tokenizer; default: the model's
    max_model_len            context length (prompt + output); required: the ingress validates against it
    dtype                    "auto" (the checkpoint's), "bfloat16", "float16", "float32"
    block_size               tokens per KV block (vLLM's default: 16 on GPU, 128 on CPU)
    num_gpu_blocks_override  fix the number of KV blocks (tests: small, to force preemptions)
    kv_cache_memory_bytes    KV cache size in bytes (CPU: always set it; else vLLM takes 92% of RAM)
    gpu_memory_utilization   fraction of GPU memory vLLM may use (vLLM's default 0.9)
    max_num_seqs             running requests per step (256)
    max_num_batched_tokens   token budget per step (vLLM's default depends on the device)
    enable_prefix_caching    True
    enforce_eager            False (True: no CUDA graphs; quicker start, slower steps)
    tensor_parallel_size     1 (GPUs per replica; set ``replica_num_gpus`` to match)
    seed                     0
    disable_log_stats        False: vLLM's per-request stats give each request's preemption count
    engine_args              any other ``AsyncEngineArgs`` field, passed as is (names checked when the app is
                             built, if vLLM is installed there); not the fields above, ``scheduler_cls`` or
                             ``additional_config``
    env                      environment variables set in each replica before vLLM is imported (its engine
                             process inherits them), e.g. ``VLLM_CPU_OMP_THREADS_BIND``, ``HF_HOME``

Unknown keys and ill-typed values fail with ValueError when the app is built (``AppConfig.check``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

# Engine arguments the backend owns: set through other keys, or chosen by the backend.
RESERVED_ENGINE_ARGS = frozenset({"scheduler_cls", "additional_config"})
DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str = ""
    max_model_len: int = 0
    tokenizer: str | None = None
    dtype: str = "auto"
    block_size: int | None = None
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    seed: int = 0
    disable_log_stats: bool = False
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "VllmEngineConfig":
        from halffull.replicas.sim.realtime import check_field_types, known_fields  # the one strict YAML checker

        values = known_fields(cls, values, "vllm option", " (other vLLM engine arguments go under vllm.engine_args)")
        config = cls(**check_field_types(cls, values, "vllm option"))
        config.check()
        return config

    def check(self) -> None:
        if not self.model.strip():
            raise ValueError("vllm.model is required: a local model directory or a Hugging Face hub id")
        if self.is_local_path(self.model) and not os.path.isdir(self.model_path):
            raise ValueError(f"vllm.model: no model directory at {self.model_path!r} (for the tiny CPU test model: "
                             f"`halffull make-tiny-model {self.model}`)")
        if not 2 <= self.max_model_len <= 1 << 24:
            raise ValueError(f"vllm.max_model_len is required: the context length (prompt + output tokens), in "
                             f"[2, 2**24]; got {self.max_model_len}")
        if self.dtype not in DTYPES:
            raise ValueError(f"vllm.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        for name, lo, hi in (("block_size", 1, 4096), ("num_gpu_blocks_override", 2, 1 << 26),
                             ("kv_cache_memory_bytes", 1 << 20, 1 << 50), ("max_num_seqs", 1, 1 << 20),
                             ("max_num_batched_tokens", 1, 1 << 24), ("tensor_parallel_size", 1, 64)):
            value = getattr(self, name)
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"vllm.{name} must be in [{lo}, {hi}], got {value}")
        util = self.gpu_memory_utilization
        if util is not None and not 0 < util <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {util}")
        if self.block_size and self.num_gpu_blocks_override:
            # vLLM keeps one block back (the null block) and refuses to start if max_model_len does not fit.
            capacity = (self.num_gpu_blocks_override - 1) * self.block_size
            if capacity < self.max_model_len:
                raise ValueError(f"vllm: {self.num_gpu_blocks_override - 1} usable KV blocks of {self.block_size} "
                                 f"tokens hold {capacity} tokens, less than max_model_len {self.max_model_len}")
        clash = sorted((set(self.engine_args) & ({f.name for f in dataclasses.fields(self)} | RESERVED_ENGINE_ARGS))
                       - {"engine_args", "env"})
        if clash:
            raise ValueError(f"vllm.engine_args {clash}: set them as vllm options (or, for scheduler_cls and "
                             f"additional_config, with engine_policy / engine_params)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise ValueError("vllm.env must map names to strings")

    @staticmethod
    def is_local_path(model: str) -> bool:
        """A filesystem path rather than a hub id (``org/name``)."""
        return model.startswith(("/", "./", "../", "~")) or os.path.isdir(os.path.expanduser(model))

    @property
    def model_path(self) -> str:
        return os.path.expanduser(self.model) if self.is_local_path(self.model) else self.model

    @property
    def tokenizer_path(self) -> str:
        name = self.tokenizer or self.model
        return os.path.expanduser(name) if self.is_local_path(name) else name

    def engine_kwargs(self) -> dict[str, Any]:
        """``AsyncEngineArgs`` keyword arguments (without the scheduler, which the backend adds)."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("engine_args", "env") and getattr(self, f.name) is not None}
        kwargs["model"] = self.model_path
        kwargs["tokenizer"] = self.tokenizer_path
        kwargs.update(self.engine_args)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["engine_args"] = dict(self.engine_args)
        out["env"] = dict(self.env)
        return out

    def check_engine_arg_names(self) -> None:
        """Unknown ``engine_args`` names fail (ValueError) when vLLM is installed here; else nothing."""
        if not self.engine_args:
            return
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(self.engine_args) - known)
        if unknown:
            raise ValueError(f"vllm.engine_args: unknown vLLM engine argument(s) {unknown}")
