"""Bad input through the real HTTP path: each case gets its 4xx and an OpenAI-shaped error body, fast.

One app for the module (one simulated replica, Llama-3-8B: context 8192 tokens).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

M = "llama3-8b"
CTX = 8192
LONG_TEXT = "abc " * 9000  # 9000 tokens (" abc" is one token): longer than the context
HUGE_TEXT = "x" * (4 * CTX + 1)  # refused before tokenizing
CHAT = [{"role": "user", "content": "hi"}]

# (id, method, path, body (dict -> JSON, bytes -> raw), status, code, param, message fragment)
CASES = [
    ("malformed-json", "POST", "/v1/completions", b'{"model": "llama3-8b", "prompt": ', 400, "invalid_json", None, "not valid JSON"),
    ("not-utf8", "POST", "/v1/completions", b"\xff\xfe\x00", 400, "invalid_json", None, "not valid JSON"),
    ("empty-body", "POST", "/v1/completions", b"", 400, "invalid_json", None, "not valid JSON"),
    ("body-is-list", "POST", "/v1/completions", [1, 2], 400, "invalid_json", None, "JSON object"),
    ("missing-model", "POST", "/v1/completions", {"prompt": "hi"}, 400, "missing_required_parameter", "model", "'model' is required"),
    ("model-not-string", "POST", "/v1/completions", {"model": 7, "prompt": "hi"}, 400, "invalid_type", "model", "string"),
    ("unknown-model", "POST", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model_not_found", "model", "does not exist"),
    ("unknown-model-chat", "POST", "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}, 404, "model_not_found", "model", "does not exist"),
    ("missing-prompt", "POST", "/v1/completions", {"model": M}, 400, "missing_required_parameter", "prompt", "'prompt' is required"),
    ("prompt-int", "POST", "/v1/completions", {"model": M, "prompt": 5}, 400, "invalid_type", "prompt", "must be a string"),
    ("prompt-empty", "POST", "/v1/completions", {"model": M, "prompt": ""}, 400, "invalid_value", "prompt", "must not be empty"),
    ("prompt-batch", "POST", "/v1/completions", {"model": M, "prompt": ["a", "b"]}, 400, "invalid_value", "prompt", "batched"),
    ("prompt-bad-token-id", "POST", "/v1/completions", {"model": M, "prompt": [1, -3]}, 400, "invalid_value", "prompt", "token ids"),
    ("prompt-too-long", "POST", "/v1/completions", {"model": M, "prompt": LONG_TEXT}, 400, "context_length_exceeded", "prompt", "maximum context length is 8192"),
    ("prompt-huge", "POST", "/v1/completions", {"model": M, "prompt": HUGE_TEXT}, 400, "context_length_exceeded", "prompt", "maximum context length"),
    ("max-tokens-zero", "POST", "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value", "max_tokens", "at least 1"),
    ("max-tokens-negative", "POST", "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": -5}, 400, "invalid_value", "max_tokens", "at least 1"),
    ("max-tokens-string", "POST", "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": "10"}, 400, "invalid_type", "max_tokens", "integer"),
    ("max-tokens-float", "POST", "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 1.5}, 400, "invalid_type", "max_tokens", "integer"),
    ("max-tokens-bool", "POST", "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": True}, 400, "invalid_type", "max_tokens", "integer"),
    ("max-tokens-huge", "POST", "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 10**12}, 400, "context_length_exceeded", "max_tokens", "maximum context length is 8192"),
    ("max-tokens-over-context", "POST", "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": CTX}, 400, "context_length_exceeded", "max_tokens", "Please reduce"),
    ("stream-not-bool", "POST", "/v1/completions", {"model": M, "prompt": "hi", "stream": "yes"}, 400, "invalid_type", "stream", "boolean"),
    ("temperature-range", "POST", "/v1/completions", {"model": M, "prompt": "hi", "temperature": 5}, 400, "invalid_value", "temperature", "[0, 2]"),
    ("ignore-eos-type", "POST", "/v1/completions", {"model": M, "prompt": "hi", "ignore_eos": 1}, 400, "invalid_type", "ignore_eos", "boolean"),
    ("priority-type", "POST", "/v1/completions", {"model": M, "prompt": "hi", "priority": "high"}, 400, "invalid_type", "priority", "integer"),
    ("n-two", "POST", "/v1/completions", {"model": M, "prompt": "hi", "n": 2}, 400, "invalid_value", "n", "n = 1"),
    ("stream-options-type", "POST", "/v1/completions", {"model": M, "prompt": "hi", "stream_options": []}, 400, "invalid_type", "stream_options", "object"),
    ("missing-messages", "POST", "/v1/chat/completions", {"model": M}, 400, "missing_required_parameter", "messages", "'messages' is required"),
    ("messages-empty", "POST", "/v1/chat/completions", {"model": M, "messages": []}, 400, "invalid_type", "messages", "non-empty list"),
    ("messages-not-list", "POST", "/v1/chat/completions", {"model": M, "messages": "hi"}, 400, "invalid_type", "messages", "non-empty list"),
    ("message-not-object", "POST", "/v1/chat/completions", {"model": M, "messages": ["hi"]}, 400, "invalid_type", "messages[0]", "object"),
    ("message-bad-role", "POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages[0].role", "must be one of"),
    ("message-no-content", "POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user"}]}, 400, "missing_required_parameter", "messages[0].content", "required"),
    ("message-content-type", "POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": 3}]}, 400, "invalid_type", "messages[0].content", "string"),
    ("message-bad-part", "POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "invalid_value", "messages[0].content", "text"),
    ("chat-too-long", "POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "context_length_exceeded", "messages", "maximum context length"),
    ("max-completion-tokens-zero", "POST", "/v1/chat/completions", {"model": M, "messages": CHAT, "max_completion_tokens": 0}, 400, "invalid_value", "max_completion_tokens", "at least 1"),
    ("chat-max-tokens-huge", "POST", "/v1/chat/completions", {"model": M, "messages": CHAT, "max_tokens": 9000}, 400, "context_length_exceeded", "max_tokens", "maximum context length"),
    ("wrong-method", "GET", "/v1/completions", None, 405, "method_not_allowed", None, "Method Not Allowed"),
    ("unknown-path", "POST", "/v1/embeddings", {"model": M, "input": "x"}, 404, "not_found", None, "Not Found"),
]


@pytest.fixture(scope="module")
def http(ray_cluster):
    url = ray_cluster.deploy("errors", {"num_replicas": 1, "speedup": 50.0})
    with httpx.Client(base_url=url, timeout=20) as client:
        yield client
    ray_cluster.delete("errors")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(http, case):
    _, method, path, body, status, code, param, fragment = case
    kwargs = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kwargs = {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}
    start = time.monotonic()
    response = http.request(method, path, **kwargs)
    assert time.monotonic() - start < 10
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_server_still_serves_after_bad_input(http):
    response = http.post("/v1/completions", json={"model": M, "prompt": "fine", "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2


def test_largest_request_that_fits_is_accepted(http):
    prompt = [300] * 100
    response = http.post("/v1/completions", json={"model": M, "prompt": prompt, "max_tokens": CTX - 100, "stream": True})
    assert response.status_code == 200  # accepted; httpx read the whole (pseudo-EOS-bounded) stream
    assert response.text.rstrip().endswith("data: [DONE]")
