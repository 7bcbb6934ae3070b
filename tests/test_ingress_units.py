"""Pure pieces of the ingress without a Ray cluster: stop strings over a token stream, the pydantic ->
OpenAI error mapping, the request models' refusals, vLLM's ``SamplingParams`` keyword arguments."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from halffull.deploy.protocol.chat import ChatCompletionRequest
from halffull.deploy.protocol.completions import CompletionRequest
from halffull.deploy.protocol.errors import field_path, from_validation
from halffull.deploy.serving import refuse_for_sim, sampling
from halffull.deploy.stop import StopChecker
from halffull.replicas.vllm.backend import sampling_kwargs


# ---- stop strings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stop, pieces, sent, stopped",
    [
        (["END"], ["a", " E", "N", "D x"], ["a", " ", "", ""], True),  # split across pieces, never half-sent
        (["END"], ["a", " E", "x"], ["a", " ", "Ex"], False),  # a false start is released with the next piece
        (["ab", "b"], ["xab"], ["x"], True),  # the earliest match wins, whichever string it is
        ([], ["anything"], ["anything"], False),
        (["", "zz"], ["z", "q"], ["", "zq"], False),  # empty stop strings are dropped
    ],
    ids=["split", "false-start", "earliest", "none", "empty-dropped"],
)
def test_stop_checker(stop, pieces, sent, stopped):
    checker = StopChecker(stop)
    out = [checker.feed(p) for p in pieces]
    assert [text for text, _ in out] == sent
    assert out[-1][1] is stopped


def test_stop_checker_inactive_passes_text_and_flush_releases_the_held_tail():
    checker = StopChecker(["STOP"])
    assert checker.feed("a STOP", active=False) == ("a STOP", False)  # below min_tokens: not searched
    assert checker.feed("x ST") == ("x ", False)
    assert checker.flush() == "ST"


# ---- error mapping -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loc, path",
    [(("body", "messages", 0, "content"), "messages[0].content"), (("body",), None),
     (("body", "prompt_request", "prompt"), "prompt"), (("stop",), "stop")],
    ids=["nested", "body", "union-tag", "no-body-prefix"],
)
def test_field_path(loc, path):
    assert field_path(loc) == path


def errors_of(model, body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return from_validation([dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]).body()["error"]


MAPPING = [  # (id, model, body, code, param, message fragment)
    ("missing", CompletionRequest, {"prompt": "x"}, "missing_required_parameter", "model", "'model' is required"),
    ("type", CompletionRequest, {"model": 1, "prompt": "x"}, "invalid_type", "model", "must be a string, got 1"),
    ("range", CompletionRequest, {"model": "m", "prompt": "x", "top_p": 0}, "invalid_value", "top_p", "(0, 1]"),
    ("nan", CompletionRequest, {"model": "m", "prompt": "x", "temperature": float("nan")}, "invalid_value", "temperature", "finite"),
    ("sentence", CompletionRequest, {"model": "m", "prompt": "x", "n": 3}, "invalid_value", "n", "Only n = 1"),
    ("literal", ChatCompletionRequest, {"model": "m", "messages": [{"role": "x", "content": "c"}]}, "invalid_value",
     "messages[0].role", "must be one of"),
    ("surrogate", CompletionRequest, {"model": "m\ud800", "prompt": "x"}, "invalid_value", "model", "surrogate"),
    ("stream-options", CompletionRequest, {"model": "m", "prompt": "x", "stream_options": {}}, "invalid_value",
     "stream_options", "Stream options can only be defined when stream=True."),
]


@pytest.mark.parametrize("case", MAPPING, ids=[c[0] for c in MAPPING])
def test_validation_errors_map_to_openai_errors(case):
    _, model, body, code, param, fragment = case
    error = errors_of(model, body)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert fragment in error["message"]
    error["message"].encode("utf-8")  # renderable: no lone surrogate from the input


# ---- per-backend fields ------------------------------------------------------------------------------------
def test_sim_refuses_what_it_cannot_honour_and_vllm_gets_it():
    body = CompletionRequest.model_validate({
        "model": "m", "prompt": "x", "stop": ["a", ""], "logit_bias": {"7": 1.5}, "temperature": 0.5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}})
    with pytest.raises(Exception, match="logit_bias"):
        refuse_for_sim(body)
    sent = sampling(body)
    assert sent == {"temperature": 0.5, "stop": ["a"], "logit_bias": {"7": 1.5},
                    "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "n", "schema": {"type": "object"}}}}

    class Structured(dict):
        def __init__(self, **kw):
            super().__init__(kw)

    kwargs = sampling_kwargs(sent, Structured)
    assert kwargs["detokenize"] is True and kwargs["structured_outputs"] == {"json": {"type": "object"}}
    assert "response_format" not in kwargs
    assert sampling_kwargs({"response_format": {"type": "json_object"}}, Structured) == {
        "detokenize": False, "structured_outputs": {"json_object": True}}
