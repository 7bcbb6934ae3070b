"""The generation endpoints' logic (vLLM's ``serving_completion.py`` / ``serving_chat.py``): a validated request
(deploy/protocol/) -> prompt token ids -> one ``Run`` against the LLM deployment (deploy/run.py) -> a JSON
answer or an SSE stream.

Per request:
  * ``model`` must be the served name (404 ``model_not_found``).
  * Fields the backend cannot honour are refused (400 naming the field): with the simulated backend
    ``logit_bias`` (non-empty) and ``response_format`` other than text (``SIM_REFUSED``).
  * The prompt is tokenized once, with the ingress tokenizer; a text far beyond the context is refused before
    tokenizing, a prompt of ``max_model_len`` tokens or more after (``context_length_exceeded``). Prompt token
    ids must be below the tokenizer's size (``vocab_limit``; the simulated tokenizer: 2**40).
  * ``max_tokens`` (chat: ``max_completion_tokens`` first) defaults to the rest of the context, capped by
    ``max_output_tokens``; prompt + max_tokens beyond the context is ``context_length_exceeded``;
    ``min_tokens`` above ``max_tokens`` is refused.
  * Routing data, computed once: the prompt's token count and chained hashes of its full blocks of
    ``prefix_block_size`` tokens (default 64: fine enough to credit a shared system prompt, coarse enough to
    keep the router's prefix index and the call small; 4 engine blocks of 16), passed as the ``routing``
    keyword argument (router/serve_router.py). The router reads them; the replica ignores them.
  * What reaches the replica (replicas/deployment.py): prompt ids, max_tokens, min_tokens, ignore_eos,
    priority, ``hold`` (a non-streaming request without stop strings: its tokens after the first come in one
    piece at the end), and ``sampling`` (replicas/backend.py ``SAMPLING_FIELDS``: a vLLM engine's sampling fields,
    stop strings, logit_bias, response_format). The simulated engine honours min_tokens (no pseudo-EOS
    before it) and ignores ``sampling``.
  * Stop strings are applied here, on the decoded text, for every backend (``StopChecker``): the output ends
    before the first stop string, finish_reason "stop", and the engine request is aborted. A vLLM engine also
    gets them, so it stops by itself; its token ids still hold the stop string's tokens, so the text cut is
    needed there too.

Ids: the response's ``x-request-id`` header is Serve's request id (the client's ``x-request-id`` when it sent
one, else a UUID; Serve's proxy sets the header, so the app sets none: one header). The response ``id`` is
``cmpl-<that id>`` / ``chatcmpl-<that id>``; the engine and router id adds 8 random hex digits, so two requests
with the same client id never collide in an engine.

A stream that fails after it started (its replica died after sending tokens, the timeout passed) ends with one
``data: {"error": ...}`` event and ``data: [DONE]``; ``halffull_stream_errors_total`` counts them.
``x-halffull-replica`` / ``x-halffull-retries`` name the replica that answered (or failed) and the re-sends;
``x-halffull-ingress`` the ingress replica that served the request (with several ingress replicas).
"""

import asyncio
import json
import logging
import time
import uuid
import weakref
from typing import Any, Mapping

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from halffull.deploy.channel import ChannelClient
from halffull.deploy.metrics import IngressMetrics
from halffull.deploy.protocol.chat import ChatCompletionRequest
from halffull.deploy.protocol.common import SamplingRequest
from halffull.deploy.protocol.completions import TOKEN_ID_LIMIT, CompletionRequest
from halffull.deploy.protocol.errors import ApiError, bad
from halffull.deploy.run import Run, classify, rejected_reason
from halffull.deploy.stop import StopChecker
from halffull.deploy.tokenizer import message_text
from halffull.replicas.backend import SAMPLING_FIELDS
from halffull.router import serve_router
from halffull.router.completions import report_completion

logger = logging.getLogger("ray.serve")

SIM_REFUSED = {  # field -> why, for fields the simulated model cannot honour when set to a non-default value
    "logit_bias": "logit_bias needs a sampling engine: the simulated model's output is fixed.",
    "response_format": "response_format json_object / json_schema needs a vLLM engine (structured outputs); "
                       "the simulated model emits placeholder words.",
}


class GenerationServing:
    """Completions and chat completions over one LLM deployment handle (see the module docstring)."""

    def __init__(self, llm, tokenizer, *, model: str, max_model_len: int, backend: str, prefix_block_size: int,
                 max_output_tokens: int | None, replica_retries: int, request_timeout_s: float | None,
                 retry_after_s: float, metrics: IngressMetrics, channel: ChannelClient | None = None):
        self.llm, self.tokenizer, self.model = llm, tokenizer, model
        self.max_model_len, self.backend = max_model_len, backend
        self.prefix_block_size, self.max_output_tokens = prefix_block_size, max_output_tokens
        self.replica_retries, self.request_timeout_s = replica_retries, request_timeout_s
        self.retry_after_s, self.metrics = retry_after_s, metrics
        self.channel = channel  # the token channel (deploy/channel.py); None: tokens on the Serve stream
        global INGRESS_ID
        INGRESS_ID = _ingress_id()

    # ---- the request ---------------------------------------------------------------------------------------
    async def create(self, body: SamplingRequest, request: Request, *, chat: bool):
        endpoint = "chat" if chat else "completions"
        arrival = time.perf_counter()
        try:
            prompt_ids, max_tokens = self.prepare(body, chat=chat)
        except ApiError as err:
            self.metrics.status(endpoint, err.status)
            return err.response()
        serve_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{serve_id}"
        run = self._run(body, prompt_ids, max_tokens, f"{response_id}-{uuid.uuid4().hex[:8]}", arrival)
        try:
            await run.start()  # routed and accepted: errors until here are still HTTP errors
        except asyncio.CancelledError:
            run.cancel()
            raise
        except Exception as exc:
            return self._failed(run, exc, endpoint)
        output = _Output(self.tokenizer, body, run)
        if body.stream:
            events = self._sse(run, output, response_id, chat=chat, include_usage=body.include_usage(),
                               endpoint=endpoint)
            # A body that is dropped unstarted (client gone before the response began) never runs its finally:
            # cancel the replica's work when it is collected.
            weakref.finalize(events, run.cancel)
            return StreamingResponse(events, media_type="text/event-stream", headers=_run_headers(run))
        try:
            text = await output.collect()
        except asyncio.CancelledError:  # the client went away: stop the replica's work
            run.cancel()
            raise
        except Exception as exc:
            return self._failed(run, exc, endpoint)
        self._finished(run, endpoint)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": output.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": output.finish_reason}
        payload = {"id": response_id, "object": "chat.completion" if chat else "text_completion",
                   "created": int(time.time()), "model": self.model, "choices": [choice], "usage": run.usage()}
        return JSONResponse(payload, headers=_run_headers(run))

    def prepare(self, body: SamplingRequest, *, chat: bool) -> tuple[list[int], int]:
        """Prompt token ids and max_tokens of a validated request; ApiError for what the models cannot check."""
        check_model(body.model, self.model)
        if self.backend == "sim":
            refuse_for_sim(body)
        if chat:
            ids = chat_prompt_ids(body, self.tokenizer, self.max_model_len)
        else:
            ids = completion_prompt_ids(body, self.tokenizer, self.max_model_len)
        limits = {"max_tokens": body.max_tokens, "max_completion_tokens": getattr(body, "max_completion_tokens", None)}
        max_tokens = resolve_max_tokens(limits, len(ids), self.max_model_len, chat=chat,
                                        max_output_tokens=self.max_output_tokens)
        if body.min_tokens and body.min_tokens > max_tokens:
            raise bad(f"'min_tokens' ({body.min_tokens}) must be at most max_tokens ({max_tokens})", "min_tokens")
        return ids, max_tokens

    def _run(self, body: SamplingRequest, prompt_ids: list[int], max_tokens: int, request_id: str,
             arrival: float) -> Run:
        base = {"prompt_token_ids": prompt_ids, "max_tokens": max_tokens, "min_tokens": body.min_tokens or 0,
                "ignore_eos": bool(body.ignore_eos), "priority": body.priority or 0, "sampling": sampling(body)}
        if self.channel is not None:
            base["sink"] = self.channel.sink_id
        if not body.stream and not body.stop_strings():
            # Nobody reads the tokens before the end: the replica sends them in one piece (after the first,
            # which still says the request started generating). Not with stop strings: this ingress finds
            # them in the text as it comes and aborts the engine request there.
            base["hold"] = True
        prefix_block_size, llm = self.prefix_block_size, self.llm

        def call(attempt: int):
            rid = Run.attempt_id(request_id, attempt)
            routing = serve_router.routing_kwarg(rid, prompt_ids, max_tokens, prefix_block_size=prefix_block_size)
            return llm.remote({**base, "request_id": rid}, routing=routing)

        timeout = self.request_timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return Run(call, request_id, arrival, max_retries=self.replica_retries, deadline=deadline,
                   on_retry=lambda reason: self.metrics.retries.inc(tags={"reason": reason}),
                   num_prompt_tokens=len(prompt_ids), channel=self.channel)

    # ---- outcomes ------------------------------------------------------------------------------------------
    def _error(self, exc: BaseException, endpoint: str) -> ApiError:
        err = classify(exc, self.retry_after_s)
        self.metrics.status(endpoint, err.status)
        if err.status == 429:
            self.metrics.rejected.inc(tags={"reason": rejected_reason(exc)})
        return err

    def _failed(self, run: Run, exc: Exception, endpoint: str) -> JSONResponse:
        run.cancel()
        response = self._error(exc, endpoint).response()
        if run.replica:
            response.headers["x-halffull-replica"] = run.replica
        response.headers["x-halffull-retries"] = str(run.attempt)
        return response

    def _finished(self, run: Run, endpoint: str) -> None:
        self.metrics.status(endpoint, 200)
        try:
            self.metrics.finished(run)
        except Exception:
            logger.exception("halffull ingress: metrics failed")
        if run.end is not None:
            report_completion(Run.attempt_id(run.request_id, run.attempt), run.num_tokens)

    async def _sse(self, run: Run, output: "_Output", response_id: str, *, chat: bool, include_usage: bool,
                   endpoint: str):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_or_text: Any, finish_reason: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
            data = {"id": response_id, "object": obj, "created": created, "model": self.model, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        # The text events, the hot path (one per batch of tokens): the JSON of chunk(...) around the text, so
        # only the text is encoded per event (byte-identical to chunk()).
        head, tail = chunk({"content": "\0"} if chat else "\0", None).split('"\\u0000"')
        dumps = json.dumps

        done = False
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            async for text in output.texts():
                yield head + dumps(text) + tail
            yield chunk({} if chat else "", output.finish_reason)
            if include_usage:
                data = {"id": response_id, "object": obj, "created": created, "model": self.model, "choices": [],
                        "usage": run.usage()}
                yield f"data: {json.dumps(data)}\n\n"
            done = True
            self._finished(run, endpoint)
        except Exception as exc:
            run.cancel()
            err = self._error(exc, endpoint)
            self.metrics.stream_errors.inc(tags={"endpoint": endpoint, "code": err.code or "error"})
            yield f"data: {json.dumps(err.body())}\n\n"
            done = True
        finally:
            if not done:  # the client went away: stop the replica's work
                run.cancel()
        yield "data: [DONE]\n\n"


class _Output:
    """A run's output as text: decoded incrementally, cut at the first stop string (which aborts the run)."""

    def __init__(self, tokenizer, body: SamplingRequest, run: Run):
        self._decoder = tokenizer.stream_decoder()
        self._stop = StopChecker(body.stop_strings())
        self._min_tokens = body.min_tokens or 0
        self._run = run
        self.stopped = False

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else self._run.finish_reason

    async def texts(self):
        """Non-empty text pieces, in order: one per batch of tokens the replica sent (its first token alone:
        never held back), less what a possible stop string holds back.

        Without stop strings a batch is decoded at once. With them each token is checked on its own (the
        text ends at the first stop string that completes once ``min_tokens`` are out, and ``usage`` counts
        the tokens up to it, exactly as with one token per item); the text of a batch is still sent as one
        piece."""
        run, stop, decoder = self._run, self._stop, self._decoder
        async for batch in run.batches():
            if stop:
                text = self._feed_each(batch)
            else:
                text = decoder.feed(batch)
            if text:
                yield text
            if self.stopped:
                run.cancel()  # the engine need not go on
                return
        tail, self.stopped = stop.feed(decoder.flush(), active=run.num_tokens > self._min_tokens)
        tail += "" if self.stopped else stop.flush()
        if tail:
            yield tail

    def _feed_each(self, batch: list[int]) -> str:
        run, pieces = self._run, []
        before = run.num_tokens - len(batch)  # tokens counted before this batch
        for i, token in enumerate(batch):
            text, self.stopped = self._stop.feed(self._decoder.feed((token,)),
                                                 active=before + i + 1 > self._min_tokens)
            pieces.append(text)
            if self.stopped:
                run.unread(len(batch) - i - 1)
                break
        return "".join(pieces)

    async def collect(self) -> str:
        return "".join([text async for text in self.texts()])


def _run_headers(run: Run) -> dict[str, str]:
    return {"x-halffull-replica": run.replica or "", "x-halffull-retries": str(run.attempt),
            "x-halffull-ingress": INGRESS_ID}


def _ingress_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests)
        return "local"


INGRESS_ID = ""  # this ingress replica's id, set by GenerationServing


# ---- checks that need the server's state (pure functions, unit-tested) ---------------------------------------
def check_model(model: str, served: str) -> None:
    if model != served:
        raise ApiError(404, f"The model '{model[:100]}' does not exist; this server serves '{served}'.",
                       param="model", code="model_not_found")


def refuse_for_sim(body: SamplingRequest) -> None:
    """400 for a field the simulated model cannot honour (``SIM_REFUSED``), set to a non-default value."""
    set_fields = {"logit_bias": bool(body.logit_bias),
                  "response_format": body.response_format is not None and not body.response_format.is_text()}
    for name, is_set in set_fields.items():
        if is_set:
            raise bad(SIM_REFUSED[name], name)


def sampling(body: SamplingRequest) -> dict[str, Any]:
    """The ``SAMPLING_FIELDS`` the client set, as plain JSON values (a vLLM engine applies them)."""
    out = {}
    for name in SAMPLING_FIELDS:
        value = getattr(body, name, None)
        if name == "stop":
            value = body.stop_strings() or None
        elif name == "response_format":
            value = None if value is None or value.is_text() else value.model_dump(by_alias=True, exclude_none=True)
        if value is not None and value != {}:
            out[name] = value
    return out


def completion_prompt_ids(body: CompletionRequest, tokenizer, max_model_len: int) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, str):
        check_text_size(len(prompt), max_model_len, "prompt", tokenizer)
        ids = tokenizer.encode(prompt)
    else:
        limit = getattr(tokenizer, "vocab_limit", TOKEN_ID_LIMIT)
        if not all(t < limit for t in prompt):
            raise bad(f"'prompt' token ids must be integers in [0, {limit})", "prompt")
        ids = prompt
    if not ids:
        raise bad("'prompt' must not be empty", "prompt")
    return ids


def chat_prompt_ids(body: ChatCompletionRequest, tokenizer, max_model_len: int) -> list[int]:
    messages = [m.as_dict() for m in body.messages]
    check_text_size(sum(len(message_text(m["content"])) for m in messages), max_model_len, "messages", tokenizer)
    try:
        return tokenizer.apply_chat_template(messages)
    except ValueError as exc:  # a real model's tokenizer without a chat template
        raise bad(str(exc), "messages") from None


def check_text_size(num_chars: int, max_model_len: int, param: str, tokenizer: Any = None) -> None:
    # Every token covers at most 4 bytes (a real model's tokenizer: at most ``max_chars_per_token``) and every
    # character is at least 1 byte, so a longer text has more than max_model_len tokens; refuse it before
    # tokenizing.
    if num_chars > getattr(tokenizer, "max_chars_per_token", 4) * max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens; the {param} is "
                       f"far longer ({num_chars} characters).", param=param, code="context_length_exceeded")


def resolve_max_tokens(body: Mapping[str, Any], num_prompt: int, max_model_len: int, *, chat: bool,
                       max_output_tokens: int | None = None) -> int:
    """The request's max_tokens (validated >= 1 by the models), checked against the context and the server's
    cap; default: the rest of the context, capped by ``max_output_tokens``."""
    key, value = "max_tokens", body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        key, value = "max_completion_tokens", body["max_completion_tokens"]
    prompt_param = "messages" if chat else "prompt"
    if num_prompt >= max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                       f"request has {num_prompt} input tokens. Please reduce the length of the input.",
                       param=prompt_param, code="context_length_exceeded")
    if value is None:
        rest = max_model_len - num_prompt  # vLLM's default: the rest of the context
        return rest if max_output_tokens is None else min(rest, max_output_tokens)
    if max_output_tokens is not None and value > max_output_tokens:
        raise bad(f"'{key}' must be at most {max_output_tokens} on this server, got {value}", key)
    if num_prompt + value > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {num_prompt + value} tokens ({num_prompt} in the {prompt_param}, {value} in "
                       f"the completion). Please reduce the length of the {prompt_param} or completion.",
                       param=key, code="context_length_exceeded")
    return value
