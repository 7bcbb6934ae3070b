"""deploy/vllm_gpu.yaml and deploy/vllm_cpu.yaml, offline: each validates against Serve's schema and builds
through the app's own path (``build_app``: AppConfig, VllmEngineConfig, Serve's deployment options), so a
broken key fails here, not on a GPU cluster. No engine starts and vLLM is not needed (only the CPU file's
model directory is swapped for a temporary one: it is made by ``halffull make-tiny-model`` on a real box)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from halffull.deploy.app import AppConfig, build_app
from halffull.replicas.vllm.config import VllmEngineConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def app_args(name: str) -> dict:
    raw = yaml.safe_load((DEPLOY / name).read_text())
    schema = ServeDeploySchema.parse_obj(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "halffull.deploy.app:build_app"
    return raw["applications"][0]["args"]


def llm_deployment(app):
    llm = app._bound_deployment.init_args[0]
    return llm._bound_deployment


def test_gpu_config_builds_one_gpu_replicas_with_larry_and_sal():
    args = app_args("vllm_gpu.yaml")
    config = AppConfig.from_args(args)
    assert (config.backend, config.router, config.engine_policy) == ("vllm", "sal", "larry")
    vllm = config.vllm_config()
    assert "Llama-3-8B-Instruct" in vllm.model and vllm.max_model_len == 8192
    assert (vllm.max_num_seqs, vllm.max_num_batched_tokens, vllm.dtype) == (256, 8192, "bfloat16")
    assert config.replica_num_gpus == vllm.tensor_parallel_size == 1
    deployment = llm_deployment(build_app(args))
    assert deployment._deployment_config.num_replicas == config.num_replicas
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment._deployment_config.request_router_config.request_router_kwargs["policy"] == "sal"
    kwargs = deployment.init_kwargs
    assert kwargs["backend"] == "vllm"
    assert (kwargs["engine"]["engine_policy"], kwargs["engine"]["model"]) == ("larry", vllm.model)


def test_cpu_config_builds_with_the_tiny_model_settings(tmp_path):
    args = app_args("vllm_cpu.yaml")
    assert args["vllm"]["model"] == "/tmp/halffull-tiny-llama"  # what the README's make-tiny-model writes
    args["vllm"]["model"] = str(tmp_path)
    config = AppConfig.from_args(args)
    vllm = config.vllm_config()
    assert config.num_replicas == 2 and config.replica_num_gpus == 0
    assert vllm.kv_cache_memory_bytes and vllm.kv_cache_memory_bytes <= 1 << 30  # bounded (VLLM_CPU.md)
    assert (vllm.num_gpu_blocks_override - 1) * vllm.block_size >= vllm.max_model_len
    assert config.max_model_len() == vllm.max_model_len and config.model_name() == "tiny-llama"
    deployment = llm_deployment(build_app(args))
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment.init_kwargs["engine"]["block_size"] == vllm.block_size


@pytest.mark.parametrize(
    "vllm, extra, message",
    [
        ({}, {}, "vllm.model is required"),
        ({"model": "org/m"}, {}, "max_model_len is required"),
        ({"model": "org/m", "max_model_len": 64, "max_num_seq": 4}, {}, "unknown vllm option"),
        ({"model": "org/m", "max_model_len": 64, "dtype": "fp8"}, {}, "dtype"),
        ({"model": "org/m", "max_model_len": 512, "block_size": 32, "num_gpu_blocks_override": 8}, {}, "less than"),
        ({"model": "org/m", "max_model_len": 64, "engine_args": {"scheduler_cls": "x.Y"}}, {}, "engine_policy"),
        ({"model": "org/m", "max_model_len": 64, "engine_args": {"max_model_len": 9}}, {}, "vllm options"),
        ({"model": "org/m", "max_model_len": 64, "env": {"A": 1}}, {}, "names to strings"),
        ({"model": "/no/such/dir", "max_model_len": 64}, {}, "no model directory"),
        ({"model": "org/m", "max_model_len": 64}, {"gpu": "a100"}, "simulated backend"),
        ({"model": "org/m", "max_model_len": 64}, {"engine": {"num_blocks": 8}}, "simulated backend"),
        ({"model": "org/m", "max_model_len": 64}, {"engine_policy": "lifo"}, "unknown engine policy"),
        ({"model": "org/m", "max_model_len": 64}, {"replica_num_gpus": -1}, "replica_num_gpus"),
        ({"model": "org/m", "max_model_len": 64}, {"replica_num_gpus": 2}, "tensor_parallel_size"),
        ({"model": "org/m", "max_model_len": 64}, {"backend": "tgi"}, "backend must be"),
    ],
    ids=["no-model", "no-max-model-len", "typo", "dtype", "blocks-too-few", "scheduler-cls", "duplicate-arg",
         "env-not-str", "missing-dir", "sim-gpu", "sim-engine", "engine-policy", "gpus", "gpus-vs-tp", "backend"],
)
def test_bad_vllm_config_fails_at_build(vllm, extra, message):
    with pytest.raises(ValueError, match=message):
        build_app({"backend": "vllm", "vllm": vllm, **extra})


def test_vllm_section_needs_the_vllm_backend():
    with pytest.raises(ValueError, match="backend: vllm"):
        AppConfig.from_args({"vllm": {"model": "org/m", "max_model_len": 64}})


def test_engine_kwargs_pass_through():
    config = VllmEngineConfig.from_dict({"model": "org/m", "max_model_len": 64, "block_size": 16,
                                         "engine_args": {"swap_space": 0}})
    kwargs = config.engine_kwargs()
    assert kwargs["model"] == kwargs["tokenizer"] == "org/m"
    assert (kwargs["max_model_len"], kwargs["block_size"], kwargs["swap_space"]) == (64, 16, 0)
    assert "num_gpu_blocks_override" not in kwargs  # None: vLLM's own default
    assert "engine_args" not in kwargs and "env" not in kwargs


def test_hf_stream_decoder_matches_full_decode():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from halffull.deploy.hf_tokenizer import HfTokenizer
    from halffull.replicas.vllm.tiny_model import build_tokenizer

    tok = HfTokenizer(build_tokenizer(), "tiny")
    text = "Héllo wörld — schedulers 🚀 are half-full. 42"
    ids = tok.encode(text)
    decoder = tok.stream_decoder()
    pieces = [decoder.feed([t]) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}])
    assert tok.decode(chat, skip_special_tokens=False).endswith("<|user|>\nab</s>\n<|assistant|>\n")
