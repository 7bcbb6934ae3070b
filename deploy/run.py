"""One request's run against the LLM deployment (``Run``) and the mapping of its failures to HTTP errors
(``classify``).

Replica failure. A request whose replica fails before producing any output token for it (queued in Serve or
in the engine, or still in prefill) is re-sent, at most ``replica_retries`` times; the router has already
dropped the dead replica (Ray calls ``on_replica_actor_died``), so the re-send goes to a survivor. A request
that had started generating is not re-run behind the client's back (that would double its cost and latency
unseen): a stream ends with an error event, a non-streaming request gets a 503 the client may retry.

Tokens. Each stream item after the start event is a batch (a list of token ids: everything the replica
produced since its previous item, replicas/deployment.py); ``batches()`` yields them as they are, one SSE event
each (deploy/serving.py), and ``num_tokens`` counts tokens, not items. With the token channel (``channel``, a
deploy/channel.py ``ChannelClient``) the request dict names this ingress's sink, the start event names the
replica's channel address, the first batch comes on the Serve stream (or at once on the channel, where the
start event says ``"first": "channel"``: the replica had this ingress's connection already), so it leaves as its
own event as soon as it arrives, and the later batches from the channel, while a task reads the end event or the failure
from the Serve stream; the rules below are the same on both paths (a broken channel is a replica
failure).

Failures (``classify``):
  400  the replica's ``validate`` refused the request (ValueError: it can never run there)
  429  Serve's queue for the LLM replicas is full (``BackPressureError``) or the engine's waiting queue is
       (``EngineOverloadedError``); ``code: overloaded``, ``Retry-After``
  503  the replica failed (``replica_unavailable``) or no replica is up (``unavailable``); ``Retry-After``
  504  no complete answer within ``request_timeout_s`` of arrival (``code: timeout``)
"""

import asyncio
import logging
import math
import time
from typing import Any, AsyncIterator

from ray import serve

from halffull.deploy.channel import ChannelClient, ChannelError, RunTokens
from halffull.deploy.protocol.errors import ApiError, bad, overloaded
from halffull.replicas.sim.realtime import EngineDeadError, EngineOverloadedError

logger = logging.getLogger("ray.serve")


def _replica_failed(exc: BaseException) -> bool:
    """The replica (not the request) failed: dead or unreachable actor, crashed engine. Safe to re-send."""
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, serve.exceptions.ReplicaUnavailableError,
                            EngineDeadError, ChannelError))


class Run:
    """One request against the LLM deployment: start event, batches of token ids (lists), end event; re-sends
    and a deadline.

    ``call(attempt)`` sends attempt ``attempt`` (0, 1, ...) and returns its response stream. A replica failure
    (``_replica_failed``) before the first output token re-sends, at most ``max_retries`` times (in ``start``,
    ``batches`` and ``collect``); after it, the failure is the caller's. Every wait ends at ``deadline``
    (event-loop time; None: none) with TimeoutError.
    """

    def __init__(self, call, request_id: str, arrival: float, *, max_retries: int = 0,
                 deadline: float | None = None, on_retry=None, num_prompt_tokens: int = 0,
                 channel: ChannelClient | None = None):
        self._call = call
        self.channel = channel
        self._tokens: RunTokens | None = None  # this attempt's tokens on the token channel
        self._watch: asyncio.Task | None = None  # reads the Serve stream (end, failure) while tokens come there
        self.num_prompt_tokens = num_prompt_tokens  # usage's prompt count until the end event gives the engine's
        self.request_id = request_id
        self.arrival = arrival
        self.max_retries = max_retries
        self.deadline = deadline
        self._on_retry = on_retry
        self.attempt = 0
        self.stream = None
        self.done = False  # the current stream ran to its end: nothing to cancel
        self._reset()

    @staticmethod
    def attempt_id(request_id: str, attempt: int) -> str:
        """The engine / router request id of one attempt (distinct, so a re-send never collides)."""
        return request_id if attempt == 0 else f"{request_id}-retry{attempt}"

    def _reset(self) -> None:
        self.replica: str | None = None
        self.end: dict[str, Any] | None = None
        self.num_tokens = 0
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    async def _next(self):
        """The next item of the Serve stream, by the deadline."""
        return await self._by_deadline(self.stream.__anext__)

    async def _next_batch(self) -> list[int]:
        """The next batch from the token channel, by the deadline."""
        return await self._by_deadline(self._tokens.next_batch)

    async def _by_deadline(self, read):
        if self.deadline is None:
            return await read()
        async with asyncio.timeout_at(self.deadline):
            return await read()

    async def start(self) -> None:
        """Send the request; return once a replica accepted it (its start event)."""
        while True:
            if self.channel is not None:  # registered before sending: its tokens may come before its start
                self._release()  # a re-send: the failed attempt reads nothing more
                self._tokens = self.channel.register(self.attempt_id(self.request_id, self.attempt),
                                                     first_on_stream=True)
            self.stream = self._call(self.attempt)
            self.done = False
            try:
                first = await self._next()
                if isinstance(first, dict) and first.get("event") == "start":
                    await self._attach(first)
            except Exception as exc:  # the stream may still run (our deadline): cancel() must still act
                if not self._may_retry(exc):
                    raise
                await self._before_retry(exc)
                continue
            if isinstance(first, dict) and first.get("event") == "overloaded":
                self.done = True
                raise EngineOverloadedError(first.get("message") or "the engine's waiting queue is full")
            if not (isinstance(first, dict) and first.get("event") == "start"):
                raise RuntimeError(f"unexpected first stream item {first!r}")
            self.replica = first.get("replica")
            return

    async def _attach(self, start: dict[str, Any]) -> None:
        """Read this attempt's tokens from the token channel the start event names (if any; else from the
        Serve stream), and its end or failure from the Serve stream, in a task."""
        tokens = self._tokens
        if tokens is None:
            return
        if "channel" not in start:  # a replica without the channel: tokens come on the Serve stream
            self._release()
            return
        if start.get("first") == "channel":
            tokens.first_on_channel()
        await self.channel.attach(start["channel"], tokens)
        self._watch = asyncio.get_running_loop().create_task(self._watch_stream(tokens))

    async def _watch_stream(self, tokens: RunTokens) -> None:
        try:
            while True:
                item = await self.stream.__anext__()
                if isinstance(item, dict):
                    if item.get("event") == "end" and tokens is self._tokens:
                        self.end = item
                        tokens.end(int(item.get("num_output_tokens") or 0))
                else:  # the first batch (replicas/deployment.py: it never waits for the channel)
                    tokens.push_first(item)
        except StopAsyncIteration:
            if tokens is self._tokens:
                self.done = True
            if tokens.expected is None:
                tokens.fail(RuntimeError("the replica's stream ended without an end event"))
        except asyncio.CancelledError:
            tokens.fail(ChannelError("cancelled"))
            raise
        except BaseException as exc:  # the replica failed (or our cancel): the reader raises it
            tokens.fail(exc)

    def _release(self) -> None:
        """Stop reading this attempt from the token channel."""
        tokens, self._tokens = self._tokens, None
        if tokens is not None:
            self.channel.unregister(tokens.request_id)
        watch, self._watch = self._watch, None
        if watch is not None and not watch.done():
            watch.cancel()

    def _may_retry(self, exc: BaseException) -> bool:
        return self.attempt < self.max_retries and _replica_failed(exc)

    async def _before_retry(self, exc: BaseException) -> None:
        self.cancel()
        self.attempt += 1
        self._reset()
        if self._on_retry is not None:
            self._on_retry(type(exc).__name__)
        # Give the router a moment to learn the replica's death (it hears it from the failed call itself).
        await asyncio.sleep(0.02 * self.attempt)

    def _account(self, item) -> list[int] | None:
        """Account one stream item: the end event (kept), or a batch of output token ids (returned)."""
        if isinstance(item, dict):
            if item.get("event") == "end":
                self.end = item
            return None
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.num_tokens += len(item)
        return item

    async def batches(self) -> AsyncIterator[list[int]]:
        """Output token ids as they come, one list per stream item (everything the replica produced since its
        previous item); re-sends only before the first token."""
        while True:
            try:
                item = await (self._next() if self._tokens is None else self._next_batch())
            except StopAsyncIteration:
                self.done = True
                self._release()
                return
            except Exception as exc:  # the stream may still run (our deadline): cancel() must still act
                if self.num_tokens or not self._may_retry(exc):
                    raise
                await self._before_retry(exc)
                await self.start()
                continue
            batch = self._account(item)
            if batch:
                yield batch

    def unread(self, num_tokens: int) -> None:
        """Take back the last ``num_tokens`` counted tokens: the output ended before them (a stop string), so
        ``usage`` counts exactly the tokens the answer used."""
        self.num_tokens -= num_tokens

    async def collect(self) -> list[int]:
        """All output token ids (non-streaming), with the same re-send rule."""
        return [token async for batch in self.batches() for token in batch]

    @property
    def finish_reason(self) -> str:
        return (self.end or {}).get("finish_reason") or "stop"

    def usage(self) -> dict[str, Any]:
        end = self.end or {}
        prompt = end.get("num_prompt_tokens", self.num_prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": self.num_tokens,
                "total_tokens": prompt + self.num_tokens,
                "prompt_tokens_details": {"cached_tokens": end.get("num_cached_tokens", 0)}}

    def cancel(self) -> None:
        """Cancel the current attempt on its replica (the engine aborts it and frees its KV blocks)."""
        self._release()
        if self.stream is None or self.done:
            return
        self.done = True
        try:
            self.stream.cancel()
        except Exception:  # already finished
            pass



def classify(exc: BaseException, retry_after_s: float = 1.0) -> ApiError:
    """A failure from the LLM deployment as an HTTP error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValueError):  # the replica's validate(): the request can never run
        message = str(exc).strip().splitlines()[-1].removeprefix("ValueError: ")
        return bad(message[:500], code="invalid_request")
    if isinstance(exc, serve.exceptions.BackPressureError):
        return overloaded(f"The service is overloaded: {exc.message}", retry_after_s)
    if isinstance(exc, EngineOverloadedError):
        message = str(exc).strip().splitlines()[-1].split(": ", 1)[-1]
        return overloaded(f"The service is overloaded: {message}", retry_after_s)
    if isinstance(exc, TimeoutError):
        return ApiError(504, "The request did not complete within the server's request timeout.", code="timeout")
    retry = {"retry-after": str(math.ceil(retry_after_s))}
    if _replica_failed(exc):
        return ApiError(503, "The model replica serving this request failed; retry the request.",
                        code="replica_unavailable", headers=retry)
    if isinstance(exc, serve.exceptions.DeploymentUnavailableError):
        return ApiError(503, "The model is not available right now; retry later.", code="unavailable",
                        headers=retry)
    logger.error("halffull ingress: request failed: %r", exc)
    return ApiError(500, f"Internal error: {type(exc).__name__}", code="internal_error")


def rejected_reason(exc: BaseException) -> str:
    return "engine" if isinstance(exc, EngineOverloadedError) else "queue"


