"""The ingress's protocol through real Ray Serve (loopback): pydantic validation and its error bodies, one
request id, stop strings and min_tokens on the simulated model, refused fields, /tokenize and /detokenize,
the OpenAPI document, 405's Allow.

One app for the module (one simulated replica, speed-up 50).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from halffull.deploy.tokenizer import SimTokenizer
from halffull.replicas.sim.realtime import pseudo_eos_tokens

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

M = "llama3-8b"
TOK = SimTokenizer()
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base_url(ray_cluster):
    url = ray_cluster.deploy("protocol", {"num_replicas": 1, "speedup": 50.0})
    yield url
    ray_cluster.delete("protocol")


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=30, max_retries=0) as c:
        yield c


def post_raw(http: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST a JSON text as it is (httpx's json= cannot send a lone surrogate escape)."""
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    return error


# ---- validation: lone surrogates, codes, stream_options ------------------------------------------------------
SURROGATES = [  # (id, path, raw JSON body, param)
    ("completion-prompt", "/v1/completions", '{"model": "llama3-8b", "prompt": "a \\ud800", "max_tokens": 4}', "prompt"),
    ("completion-prompt-list", "/v1/completions", '{"model": "llama3-8b", "prompt": ["\\udfff"], "max_tokens": 4}', "prompt"),
    ("model", "/v1/completions", '{"model": "llama3-\\ud800", "prompt": "a", "max_tokens": 4}', "model"),
    ("chat-content", "/v1/chat/completions", '{"model": "llama3-8b", "messages": [{"role": "user", "content": "a \\ud800"}]}', "messages[0].content"),
    ("chat-part", "/v1/chat/completions", '{"model": "llama3-8b", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages[0].content"),
    ("stop", "/v1/completions", '{"model": "llama3-8b", "prompt": "a", "stop": ["\\ud800"]}', "stop"),
    ("user", "/v1/completions", '{"model": "llama3-8b", "prompt": "a", "user": "\\ud800"}', "user"),
    ("tokenize", "/tokenize", '{"prompt": "\\ud800"}', "prompt"),
]


@pytest.mark.parametrize("case", SURROGATES, ids=[c[0] for c in SURROGATES])
def test_lone_surrogate_is_a_400(http, case):
    _, path, raw, param = case
    error = assert_error(post_raw(http, path, raw), 400, "invalid_value", param)
    assert "surrogate" in error["message"]


CODES = [  # (id, extra fields, code, param, message fragment)
    ("temperature-high", {"temperature": 5}, "invalid_value", "temperature", "[0, 2]"),
    ("top-p-zero", {"top_p": 0}, "invalid_value", "top_p", "(0, 1]"),
    ("penalty-low", {"frequency_penalty": -3}, "invalid_value", "frequency_penalty", "[-2, 2]"),
    ("max-tokens-zero", {"max_tokens": 0}, "invalid_value", "max_tokens", "at least 1"),
    ("min-tokens-negative", {"min_tokens": -1}, "invalid_value", "min_tokens", "at least 0"),
    ("temperature-string", {"temperature": "hot"}, "invalid_type", "temperature", "number"),
    ("top-p-bool", {"top_p": True}, "invalid_type", "top_p", "number"),
    ("seed-float", {"seed": 1.5}, "invalid_type", "seed", "integer"),
    ("stop-int", {"stop": 3}, "invalid_type", "stop", "string"),
    ("stream-options-without-stream", {"stream_options": {"include_usage": True}}, "invalid_value", "stream_options",
     "Stream options can only be defined when stream=True."),
    ("stream-options-stream-false", {"stream": False, "stream_options": {}}, "invalid_value", "stream_options",
     "stream=True"),
    ("min-tokens-over-max", {"min_tokens": 9, "max_tokens": 8}, "invalid_value", "min_tokens", "at most"),
]


@pytest.mark.parametrize("case", CODES, ids=[c[0] for c in CODES])
def test_error_codes_name_the_kind_of_mistake(http, case):
    _, extra, code, param, fragment = case
    response = http.post("/v1/completions", json={"model": M, "prompt": "hi", **extra})
    assert fragment in assert_error(response, 400, code, param)["message"]


# ---- fields the simulated backend cannot honour, and unsupported ones --------------------------------------------
REFUSED = [  # (id, path, extra fields, param)
    ("logit-bias", "/v1/completions", {"logit_bias": {"300": 5}}, "logit_bias"),
    ("response-format-json", "/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("response-format-schema", "/v1/chat/completions",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    ("suffix", "/v1/completions", {"suffix": "tail"}, "suffix"),
    ("logprobs-zero", "/v1/completions", {"logprobs": 0}, "logprobs"),
    ("chat-logprobs", "/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("top-logprobs", "/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("tools", "/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("tool-choice", "/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("continue-final-message", "/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("no-generation-prompt", "/v1/chat/completions", {"add_generation_prompt": False}, "add_generation_prompt"),
    ("echo", "/v1/completions", {"echo": True}, "echo"),
    ("best-of", "/v1/completions", {"best_of": 2}, "best_of"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_fields_that_cannot_be_honoured_are_refused(http, case):
    _, path, extra, param = case
    body = {"model": M, "max_tokens": 2, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"}), **extra}
    assert_error(http.post(path, json=body), 400, "invalid_value", param)


ACCEPTED_DEFAULTS = [  # the same fields at their "off" values are accepted
    ("response-format-text", "/v1/completions", {"response_format": {"type": "text"}}),
    ("logit-bias-empty", "/v1/completions", {"logit_bias": {}}),
    ("tool-choice-none", "/v1/chat/completions", {"tool_choice": "none", "tools": []}),
    ("chat-logprobs-false", "/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}),
    ("generation-prompt-true", "/v1/chat/completions", {"add_generation_prompt": True, "continue_final_message": False}),
]


@pytest.mark.parametrize("case", ACCEPTED_DEFAULTS, ids=[c[0] for c in ACCEPTED_DEFAULTS])
def test_off_values_are_accepted(http, case):
    _, path, extra = case
    body = {"model": M, "max_tokens": 2, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"}), **extra}
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


# ---- stop strings and min_tokens (simulated model) ------------------------------------------------------------
def reference_text(client: openai.OpenAI, prompt: str, n: int) -> str:
    return client.completions.create(model=M, prompt=prompt, max_tokens=n, extra_body={"ignore_eos": True}).choices[0].text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_stop_string_ends_generation_without_the_stop_string(client, stream):
    prompt = "stop strings end the output"
    full = reference_text(client, prompt, 30)
    words = TOK.decode(TOK.encode(full)[10:11])  # the 11th output token's text (one word)
    stop = words.strip() or words
    expected = full[:full.index(stop)]
    args = dict(model=M, prompt=prompt, max_tokens=30, stop=[stop, "never-emitted"], extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **args))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        out = client.completions.create(**args)
        text, finish = out.choices[0].text, [out.choices[0].finish_reason]
        ids = TOK.encode(full)  # tokens generated: up to the first one whose text completes the stop string
        assert out.usage.completion_tokens == next(k for k in range(1, len(ids) + 1) if stop in TOK.decode(ids[:k]))
    assert text == expected and stop not in text
    assert finish == ["stop"]


def test_stop_string_in_chat(client):
    messages = [{"role": "user", "content": "chat stop"}]
    full = client.chat.completions.create(model=M, messages=messages, max_tokens=20,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = TOK.decode(TOK.encode(full)[5:6])
    out = client.chat.completions.create(model=M, messages=messages, max_tokens=20, stop=stop,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_min_tokens_outlasts_the_pseudo_eos(client):
    prompt = "min tokens keep the simulated model going"
    eos = pseudo_eos_tokens(TOK.encode(prompt), 16, 256)
    plain = client.completions.create(model=M, prompt=prompt, max_tokens=eos + 50)
    assert plain.usage.completion_tokens == eos and plain.choices[0].finish_reason == "stop"
    longer = client.completions.create(model=M, prompt=prompt, max_tokens=eos + 50, extra_body={"min_tokens": eos + 7})
    assert longer.usage.completion_tokens == eos + 7 and longer.choices[0].finish_reason == "stop"


def test_stop_strings_wait_for_min_tokens(client):
    prompt = "stop after min tokens"
    full = reference_text(client, prompt, 24)
    ids = TOK.encode(full)
    stop = TOK.decode(ids[2:3])  # occurs early; with min_tokens 12 only an occurrence after the 12th token counts
    later = TOK.decode(ids[12:]).find(stop)
    out = client.completions.create(model=M, prompt=prompt, max_tokens=24, stop=stop,
                                    extra_body={"ignore_eos": True, "min_tokens": 12})
    text = out.choices[0].text
    assert text.startswith(TOK.decode(ids[:12]))
    if later < 0:
        assert (text, out.choices[0].finish_reason) == (full, "length")
    else:
        head = TOK.decode(ids[:12])
        assert (text, out.choices[0].finish_reason) == (head + TOK.decode(ids[12:])[:later], "stop")


# ---- ids, methods, OpenAPI ----------------------------------------------------------------------------------------
def test_one_request_id_header(client, http):
    raw = client.completions.with_raw_response.create(model=M, prompt="ids", max_tokens=2)
    out = raw.parse()
    assert raw.headers.get_list("x-request-id") == [out._request_id]
    assert out.id == f"cmpl-{out._request_id}"
    response = http.post("/v1/chat/completions", json={"model": M, "messages": CHAT, "max_tokens": 2},
                         headers={"x-request-id": "client-id-7"})
    assert response.headers.get_list("x-request-id") == ["client-id-7"]
    assert response.json()["id"] == "chatcmpl-client-id-7"


def test_the_same_client_request_id_twice_at_once(http):
    body = {"model": M, "prompt": "same id", "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "dup"}) as first:
        second = http.post("/v1/completions", json={**body, "stream": False}, headers={"x-request-id": "dup"})
        assert first.status_code == 200
        assert [line for line in first.iter_lines() if line][-1] == "data: [DONE]"
    assert second.status_code == 200 and second.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("method, path, allow", [("GET", "/v1/completions", "POST"), ("DELETE", "/health", "GET"),
                                                 ("GET", "/tokenize", "POST"), ("PUT", "/v1/models", "GET")],
                         ids=["get-completions", "delete-health", "get-tokenize", "put-models"])
def test_405_names_the_allowed_methods(http, method, path, allow):
    response = http.request(method, path)
    assert_error(response, 405, "method_not_allowed", None)
    assert response.headers["allow"] == allow


def test_openapi_document_and_docs(http):
    schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models"} <= set(schema["paths"])
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
    assert "ErrorResponse" in schema["components"]["schemas"]
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# ---- /tokenize, /detokenize -----------------------------------------------------------------------------------
def test_tokenize_counts_what_usage_counts(client, http):
    prompt = "Count these tokens, the same way usage does."
    usage = client.completions.create(model=M, prompt=prompt, max_tokens=1).usage
    out = http.post("/tokenize", json={"model": M, "prompt": prompt}).json()
    assert out == {"count": usage.prompt_tokens, "max_model_len": 8192, "tokens": TOK.encode(prompt)}
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    usage = client.chat.completions.create(model=M, messages=messages, max_tokens=1).usage
    out = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": True}).json()
    assert out["count"] == usage.prompt_tokens and out["tokens"] == TOK.apply_chat_template(messages)


def test_detokenize_round_trips(http):
    text = "round trip, ünïcode too"
    tokens = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert http.post("/detokenize", json={"model": M, "tokens": tokens}).json() == {"prompt": text}


TOKENIZE_ERRORS = [  # (id, path, body, status, code, param)
    ("unknown-model", "/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, "model_not_found", "model"),
    ("no-prompt", "/tokenize", {"model": M}, 400, "missing_required_parameter", "prompt"),
    ("prompt-int", "/tokenize", {"prompt": 3}, 400, "invalid_type", "prompt"),
    ("messages-empty", "/tokenize", {"messages": []}, 400, "invalid_type", "messages"),
    ("bad-role", "/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ("no-special-tokens", "/tokenize", {"prompt": "x", "add_special_tokens": False}, 400, "invalid_value", "add_special_tokens"),
    ("body-list", "/tokenize", [1], 400, "invalid_json", None),
    ("detok-unknown-model", "/detokenize", {"model": "gpt-9", "tokens": [300]}, 404, "model_not_found", "model"),
    ("detok-negative", "/detokenize", {"tokens": [-1]}, 400, "invalid_value", "tokens[0]"),
    ("detok-not-list", "/detokenize", {"tokens": "abc"}, 400, "invalid_type", "tokens"),
    ("detok-missing", "/detokenize", {}, 400, "missing_required_parameter", "tokens"),
]


@pytest.mark.parametrize("case", TOKENIZE_ERRORS, ids=[c[0] for c in TOKENIZE_ERRORS])
def test_tokenizer_endpoint_errors(http, case):
    _, path, body, status, code, param = case
    assert_error(post_raw(http, path, json.dumps(body)), status, code, param)
