"""Fuzz the HTTP API through real Ray Serve (loopback) with hypothesis-generated requests: no 5xx, no hangs.

This complements tests/test_serve_schemathesis.py, which generates requests from the app's own OpenAPI
document (and so only what that document describes): the strategies below follow the OpenAI request shapes
instead, including what no schema would produce: raw bytes, arbitrary JSON, and near-valid bodies with every
known field drawn from valid values, edge cases and junk.

Every response must come within 15 s (httpx timeout) and be: a 2xx with a well-formed answer (a stream ends
with ``[DONE]`` and carries no error event), or a 4xx with an OpenAI-shaped error body. App ``rel-fuzz``: one
replica, speed-up 20, ``max_output_tokens`` 64 so valid requests finish fast. Examples are bounded and
derandomized (the same inputs on every run).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

M = "llama3-8b"
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def http(ray_cluster):
    url = ray_cluster.deploy("rel-fuzz", {"num_replicas": 1, "speedup": 20.0, "max_output_tokens": 64,
                                          "request_timeout_s": 10.0})
    with httpx.Client(base_url=url, timeout=15) as client:
        yield client
    ray_cluster.delete("rel-fuzz")


# ---- strategies ------------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 100),
                    st.floats(allow_nan=False), st.text(max_size=20))
json_like = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                         max_leaves=10)
token_ids = st.lists(st.integers(-5, 2**41), min_size=0, max_size=20)
prompts = st.one_of(st.text(max_size=200), token_ids, st.lists(st.text(max_size=20), max_size=3),
                    st.lists(token_ids, max_size=2), json_like)
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}),
                 max_size=3)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]),
                                    "content": st.one_of(st.text(max_size=50), parts, st.none(), st.integers())}),
             max_size=4),
    json_like,
)
small_ints = st.one_of(st.integers(-2, 100), st.integers(-(2**64), 2**64), st.just(True), st.floats(-1, 100),
                       st.text(max_size=3), st.none())
COMMON = {
    "model": st.one_of(st.just(M), st.just(M), st.text(max_size=10), st.integers(), st.none()),
    "max_tokens": small_ints, "stream": st.one_of(st.booleans(), json_like), "ignore_eos": st.one_of(st.booleans(), json_like),
    "priority": small_ints, "temperature": st.one_of(st.floats(-1, 3), json_like), "top_p": st.floats(-1, 2),
    "n": small_ints, "best_of": small_ints, "seed": small_ints, "stop": st.one_of(st.text(max_size=5), json_like),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), json_like)}), json_like),
    "echo": json_like, "logprobs": json_like, "user": json_like, "presence_penalty": st.floats(-3, 3),
}


def near_valid(kind: str):
    required = {"model": COMMON["model"], **({"messages": messages} if kind == "chat" else {"prompt": prompts})}
    optional = {k: v for k, v in COMMON.items() if k != "model"}
    if kind == "chat":
        optional["max_completion_tokens"] = small_ints
    return st.fixed_dictionaries(required, optional=optional)


def bodies(kind: str):
    return st.one_of(
        near_valid(kind).map(lambda b: ("json", b)),
        near_valid(kind).map(lambda b: ("json", b)),
        json_like.map(lambda b: ("json", b)),
        st.binary(max_size=300).map(lambda b: ("raw", b)),
    )


# ---- checks ----------------------------------------------------------------------------------------------
def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line]
        assert events[-1] == "data: [DONE]"
        for line in events[:-1]:
            assert "error" not in json.loads(line.removeprefix("data: "))
    else:
        payload = response.json()
        assert payload["choices"] and payload["usage"]["completion_tokens"] <= 64


def send(http: httpx.Client, path: str, body) -> httpx.Response:
    kind, value = body
    content = value if kind == "raw" else json.dumps(value).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"})


@FUZZ
@given(body=bodies("completions"))
def test_completions_fuzz(http, body):
    check(send(http, "/v1/completions", body))


@FUZZ
@given(body=bodies("chat"))
def test_chat_fuzz(http, body):
    check(send(http, "/v1/chat/completions", body))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.one_of(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                       "/v1", "/", "/v1/models/llama3-8b", "/v1/completions/"]),
                      st.text(alphabet="abc/%.-_~?=&", max_size=20).map(lambda p: "/" + p)),
       body=st.binary(max_size=64))
def test_any_method_and_path(http, method, path, body):
    response = http.request(method, path, content=body if method not in ("GET", "HEAD") else None)
    assert response.status_code < 500, (method, path, response.status_code, response.text[:200])
    # httpx resolves dot segments ("/.." leaves the app's route prefix): Serve's proxy answers those itself.
    ours = response.request.url.path.startswith(http.base_url.path.rstrip("/") + "/")
    if response.status_code >= 400 and method != "HEAD" and ours:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_still_serves_after_the_fuzz(http):
    response = http.post("/v1/completions", json={"model": M, "prompt": "after fuzz", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
