"""End to end through real Ray Serve (loopback): the openai client against the ingress, two simulated replicas.

One app for the module (speed-up 50: a token every ~0.15 ms of model time); the session's Ray cluster.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from halffull.deploy.tokenizer import SimTokenizer
from halffull.replicas.sim.realtime import pseudo_eos_tokens
from tests.serve_support import replica_actor, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

MODEL = "llama3-8b"
TOK = SimTokenizer()


@pytest.fixture(scope="module")
def base_url(ray_cluster):
    url = ray_cluster.deploy("e2e", {"num_replicas": 2, "router": "sal", "speedup": 50.0})
    yield url
    ray_cluster.delete("e2e")


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=30, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def test_completion_usage_counts_and_text(client):
    prompt = "The GPU is half-empty or half-full, depending on the scheduler."
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL
    assert out.usage.prompt_tokens == len(TOK.encode(prompt))
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert len(TOK.encode(choice.text)) == 12  # every output word is one token


def test_completion_stops_at_pseudo_eos_without_ignore_eos(client):
    prompt = "Stop when the simulated model says so."
    expected = pseudo_eos_tokens(TOK.encode(prompt), 16, 256)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1000)
    assert out.usage.completion_tokens == expected
    assert out.choices[0].finish_reason == "stop"


def test_completion_is_deterministic_per_prompt(client):
    args = dict(model=MODEL, prompt="same prompt, same text", max_tokens=10, extra_body={"ignore_eos": True})
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


def test_completion_token_id_prompt(client):
    ids = TOK.encode("prompt given as token ids")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=3)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 3


def test_completion_streaming(client):
    stream = client.completions.create(model=MODEL, prompt="Stream me", max_tokens=9, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    # One SSE event per batch the replica sent. How many tokens each holds depends on timing (at speed-up 50
    # the 9 tokens take ~1.4 ms, less than one wake-up of a busy replica), so only the total is exact here;
    # the first batch travelling alone is checked without timing in test_token_channel.py and
    # test_stream_batches.py.
    assert len(TOK.encode("".join(c.choices[0].text for c in text_chunks))) == 9
    assert 1 <= len(text_chunks) <= 9
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == len(TOK.encode("Stream me"))


def test_chat_non_streaming(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Half full?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(TOK.apply_chat_template(messages))
    assert out.usage.completion_tokens == 7
    assert len(TOK.encode(out.choices[0].message.content)) == 7


def test_chat_streaming(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "work"}]}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(TOK.encode(content)) == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == len(TOK.apply_chat_template(messages))


def test_raw_sse_ends_with_done(http):
    body = {"model": MODEL, "prompt": "raw", "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-halffull-replica"]
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_models_and_health(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_prefix_sharing_hits_the_cache(client):
    """A long shared system prompt: the second request reuses the first one's KV blocks when routed there."""
    system = "You are a helpful assistant. " * 60
    out = None
    for i in range(4):
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}],
            max_tokens=2)
    # sal credits the router-known prefix, so the repeats land where the prefix was sent and hit the cache.
    assert out.usage.prompt_tokens_details.cached_tokens >= 16 * (len(TOK.encode(system)) // 16) - 64


def test_metrics_exposed(http, client):
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="count me", max_tokens=2)

    def scrape():
        text = http.get("/metrics").text
        needed = ("ray_halffull_requests_total", "ray_halffull_ttft_seconds_bucket", "ray_halffull_tpot_seconds_bucket",
                  "ray_halffull_routed_requests_total", "ray_halffull_output_tokens_total")
        return text if all(name in text for name in needed) else None

    text = wait_until(scrape, timeout=60, interval=1.0, message="halffull metrics on /metrics")
    routed = [line for line in text.splitlines() if line.startswith("ray_halffull_routed_requests_total")]
    assert any('policy="sal"' in line and "llm_replica=" in line for line in routed)


def test_client_disconnect_aborts_the_request_on_the_replica(http):
    import ray

    def replica_stats(replica: str) -> dict:
        return ray.get(replica_actor("e2e", replica).record_routing_stats.remote(), timeout=10)

    body = {"model": MODEL, "prompt": "abandon me", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        replica = response.headers["x-halffull-replica"]
        before = replica_stats(replica)
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # 8000 tokens take >1 s at speed-up 50; the abort must free the replica well before that.
    after = wait_until(lambda: (s := replica_stats(replica))["num_aborted"] > before["num_aborted"] and s, 10,
                       interval=0.05, message="the replica to abort the abandoned request")
    assert after["num_finished"] == before["num_finished"]
    wait_until(lambda: replica_stats(replica)["num_running"] == 0, 10, message="the replica to be idle")


def test_replica_processes_start_with_the_app_process_env(base_url):
    """deploy/app.py process_env / ingress_env reach the processes themselves (runtime_env, set before the worker
    starts): two malloc arenas everywhere; the ingress's code on the loop that serves HTTP, the LLM replicas on
    Ray's own choice of loops."""
    import psutil

    found: dict[str, set] = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = (proc.info["cmdline"] or [""])[0]
        if title.startswith("ray::ServeReplica:e2e:"):  # proctitle: ray::ServeReplica:<app>:<deployment>[...]
            role = title.split(":")[4].split(".")[0].split()[0]
            env = proc.environ()
            found.setdefault(role, set()).add((env.get("MALLOC_ARENA_MAX"),
                                               env.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")))
    assert found == {"OpenAIIngress": {("2", "0")}, "LLMReplica": {("2", None)}}, found
