"""loadtest/live/sse.py: the replay's SSE reader counts tokens, not events (a halffull event is one batch of
tokens), so TTFT, TPOT and E2E stay right when events carry several tokens."""

from __future__ import annotations

import itertools
import json

import pytest

from halffull.loadtest.live.sse import StreamError, read_completion_stream
from halffull.loadtest.sim.metrics import RequestRecord


def sse(*events) -> list[bytes]:
    lines = []
    for event in events:
        lines += [b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode()) + b"\n", b"\n"]
    return lines


def text(t: str) -> dict:
    return {"choices": [{"index": 0, "text": t, "finish_reason": None}], "usage": None}


def usage(n: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}


def reader(lines):
    it = iter(lines)
    return lambda: next(it, b"")


@pytest.mark.parametrize(
    "texts, num_tokens",
    [(["a", " b", " c", " d", " e"], 5), (["a", " b c", " d e"], 5), (["a", " b c d e f g h i"], 9)],
    ids=["one-token-events", "batched-events", "one-big-batch"],
)
def test_tokens_come_from_usage_and_tpot_divides_by_tokens(texts, num_tokens):
    clock = itertools.count(1.0, 1.0)  # each event with text arrives 1 s after the previous one
    result = read_completion_stream(reader(sse(*map(text, texts), usage(num_tokens), b"[DONE]")),
                                    clock=lambda: next(clock))
    assert result.num_output_tokens == num_tokens and result.num_events == len(texts)
    assert (result.first, result.last) == (1.0, float(len(texts)))
    record = RequestRecord("r", 0.0, result.first, result.last, 5, result.num_output_tokens)
    assert record.ttft == 1.0
    assert record.tpot == pytest.approx((len(texts) - 1) / (num_tokens - 1))  # per token, not per event


@pytest.mark.parametrize(
    "lines, message",
    [
        (sse(text("a"), text(" b"), b"[DONE]"), "without a usage chunk"),
        (sse(usage(0), b"[DONE]"), "without any text"),
        (sse(text("a"), {"error": {"message": "replica died", "code": "replica_unavailable"}}, b"[DONE]"),
         "error event"),
        (sse(text("a")), r"closed before data: \[DONE\]"),
    ],
    ids=["no-usage", "no-text", "error-event", "cut-off"],
)
def test_incomplete_streams_are_errors(lines, message):
    with pytest.raises(StreamError, match=message):
        read_completion_stream(reader(lines))
