"""Reading an OpenAI completion stream (SSE) for the replay (loadtest/live/locustfile.py): no locust import, so
tests can use it without gevent's monkey-patching.

The server may put several tokens in one event (halffull sends one event per batch the replica produced, and
OpenAI clients accept multi-token deltas), so tokens are counted from the final ``usage`` chunk, never from the
number of events: TTFT is the arrival of the first event with text, E2E the arrival of the last one, and
TPOT = (E2E - TTFT) / (output tokens - 1) with the usage's token count.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable


class StreamError(Exception):
    """The stream failed: HTTP error, error event, no text, no usage, closed before ``data: [DONE]``."""


@dataclass
class StreamResult:
    usage: dict[str, Any]
    num_events: int  # events with text (one or more tokens each)
    first: float  # clock time the first event with text arrived
    last: float  # ... the last one

    @property
    def num_output_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or 0)


def read_completion_stream(readline: Callable[[], bytes], clock: Callable[[], float] = time.perf_counter) -> StreamResult:
    """Read SSE lines (``readline()`` returns one line, b"" at the end) up to ``data: [DONE]``."""
    usage = None
    events = 0
    first = last = None
    while True:
        line = readline()
        if not line:
            raise StreamError("stream closed before data: [DONE]")
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise StreamError(f"error event: {json.dumps(event['error'])[:300]}")
        if event.get("usage"):
            usage = event["usage"]
        choices = event.get("choices") or ()
        if choices and choices[0].get("text"):
            now = clock()
            if first is None:
                first = now
            last = now
            events += 1
    if first is None:
        raise StreamError("stream ended without any text")
    if not usage or not usage.get("completion_tokens"):
        # Events may carry several tokens each: without usage the token count (and TPOT) is unknown.
        raise StreamError("stream ended without a usage chunk (stream_options.include_usage)")
    return StreamResult(usage, events, first, last)
