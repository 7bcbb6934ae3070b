"""The token channel: one TCP connection per (ingress replica, LLM replica) pair that carries, per engine step,
every new token of every stream that ingress has on this replica, in one message. No Ray imports.

Why: a Ray Serve streaming item costs ~0.3-0.6 ms of CPU at each end (measured here, Ray 2.60), so one item
per stream per step cannot carry a GPU's ~10k tokens/s. The per-request Serve call stays (routing, admission,
cancellation, failure detection, usage); only the tokens move here.

::

    ingress (deploy/channel.py: ChannelClient, one per ingress process, id = "sink")
        -- request dict {"sink": id, ...} via the DeploymentHandle (routed as ever) -->  LLMReplica.generate
        <-- {"event": "start", "channel": [host, port]}   (Serve stream; "first": "channel" when this sink's
                                                            connection is up: the first batch comes here)
        <-- [first token ids]                              (Serve stream: never held back; on the channel at
                                                            once instead, with "first": "channel")
        -- connect host:port, hello frame {"sink": id} -->  TokenChannel (this module, one per LLM replica)
        <-- frames {"<request id>": [token ids], ...}      one per step (or per interval), every stream of the sink
        <-- {"event": "end", "num_output_tokens": N, ...}  (Serve stream, after the request's tokens were written)

Frames: 4-byte big-endian length, then a JSON object (no pickle: nothing executable crosses the socket). The
ingress sends one frame, ``{"sink": "<id>"}``; the replica then sends only that sink's tokens. A sink id is
128 random bits known only to its ingress and the replicas it called: a peer without it receives nothing.

Timing (``Sink.push``): a frame goes out no sooner than ``interval_s`` after the previous frame of the same
sink (at once when that was longer ago), so one frame carries every token of every stream of that ingress
produced in the meantime (interval 0: one frame per engine step, since every stream's consumer runs in the
same event-loop turn after a step and the flush is scheduled behind them). A stream's first batch is never
held back by the interval or by a connection not yet open: it comes here (``push_now``: a frame at once) only
when the sink's connection is already up, else on the Serve stream right behind the start event
(replicas/deployment.py). Tokens pushed before the ingress connected wait for it.

Listener: ``TokenChannel.start(host)`` binds ``host`` (the Ray node's own IP, as Ray's own ports: 127.0.0.1
on a loopback cluster) on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

logger = logging.getLogger(__name__)

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 26  # a frame larger than this is a protocol error (64 MiB: far above any step's tokens)
HELLO_TIMEOUT_S = 10.0
UNCLAIMED_S = 60.0  # tokens of an ended request whose ingress never connected are dropped after this


def encode_frame(obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(data)) + data


class FrameDecoder:
    """Bytes in (``feed``), decoded JSON frames out; ValueError on a malformed or oversized frame."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf
        buf += data
        out, at = [], 0
        while len(buf) - at >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, at)
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"token channel frame of {size} bytes")
            if len(buf) - at - HEADER.size < size:
                break
            start = at + HEADER.size
            out.append(json.loads(bytes(buf[start:start + size])))
            at = start + size
        del buf[:at]
        return out


class Sink:
    """One ingress's streams on this replica: the tokens not yet sent, and the connection (None until the
    ingress connected)."""

    def __init__(self, sink_id: str, interval_s: float):
        self.sink_id = sink_id
        self.interval_s = interval_s
        self.pending: dict[str, list[int]] = {}
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._timer_at = 0.0
        self._last_flush = -1e18
        self.num_frames = 0
        self.closed = False  # its ingress connected and went away: nothing pushed here is read any more


    @property
    def connected(self) -> bool:
        """Its ingress is connected: a flush writes a frame now."""
        return self.transport is not None and not self.transport.is_closing()

    def _queue(self, request_id: str, tokens: list[int]) -> bool:
        """Add ``tokens`` to ``request_id``'s pending ones; False when nobody will read them (closed)."""
        if self.closed:
            return False
        pending = self.pending.get(request_id)
        if pending is None:
            self.pending[request_id] = tokens
        else:
            pending += tokens
        return True

    def push(self, request_id: str, tokens: list[int]) -> None:
        """Queue ``tokens`` of ``request_id`` and schedule the frame (see the module docstring)."""
        if not self._queue(request_id, tokens):
            return
        loop = asyncio.get_running_loop()
        due = self._last_flush + self.interval_s
        if self._timer is not None:
            if self._timer_at <= due:
                return  # a frame is already due no later
            self._timer.cancel()
        self._timer_at = due
        self._timer = loop.call_at(due, self.flush) if due > loop.time() else loop.call_soon(self.flush)

    def push_now(self, request_id: str, tokens: list[int]) -> None:
        """Queue ``tokens`` and send them at once (with whatever else is pending), never held for the interval:
        a stream's first batch, a held answer's tokens."""
        if self._queue(request_id, tokens):
            self.flush()

    def flush(self) -> None:
        """Send every pending token now (no-op while the ingress is not connected)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.pending or not self.connected:
            return
        pending, self.pending = self.pending, {}
        self.transport.write(encode_frame(pending))
        self._last_flush = asyncio.get_running_loop().time()
        self.num_frames += 1

    def finish(self, request_id: str) -> None:
        """The request ended: its remaining tokens go out now, before its end event. If the ingress has not
        connected yet they wait for it, at most ``UNCLAIMED_S`` (an ingress that died before connecting)."""
        if request_id in self.pending:
            self.flush()
        if request_id in self.pending:
            asyncio.get_running_loop().call_later(UNCLAIMED_S, self.drop, request_id)

    def drop(self, request_id: str) -> None:
        self.pending.pop(request_id, None)


class TokenChannel:
    """The replica's side: a listener, and one ``Sink`` per ingress (see the module docstring)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.sinks: dict[str, Sink] = {}
        self.address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Future | None = None

    async def start(self, host: str) -> tuple[str, int]:
        """Listen on ``host`` (an ephemeral port); idempotent. Returns (host, port)."""
        if self.address is not None:
            return self.address
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._listen(host))
        return await asyncio.shield(self._starting)

    async def _listen(self, host: str) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._connected, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = (host, port)
        return self.address

    def sink(self, sink_id: str) -> Sink:
        sink = self.sinks.get(sink_id)
        if sink is None:
            sink = self.sinks[sink_id] = Sink(sink_id, self.interval_s)
        return sink

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = None
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER.size), HELLO_TIMEOUT_S)
            (size,) = HEADER.unpack(header)
            if size > 4096:
                raise ValueError("hello frame too large")
            hello = json.loads(await asyncio.wait_for(reader.readexactly(size), HELLO_TIMEOUT_S))
            sink_id = hello.get("sink") if isinstance(hello, dict) else None
            if not isinstance(sink_id, str) or not sink_id:
                raise ValueError("hello frame without a sink id")
            sink = self.sink(sink_id)
            if sink.transport is not None:
                sink.transport.close()  # the ingress reconnected: the new connection wins
            sink.transport = writer.transport
            sink.flush()
            await reader.read()  # the ingress sends nothing more: wait for it to close
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            logger.debug("token channel connection ended: %r", exc)
        finally:
            if sink is not None and sink.transport is writer.transport:
                # Its ingress is gone (or reconnects as a new sink): its streams' tokens have no reader, and
                # the ingress's Serve calls end (cancelled, or run out) without them.
                sink.transport = None
                sink.closed = True
                sink.pending.clear()
                if self.sinks.get(sink.sink_id) is sink:
                    del self.sinks[sink.sink_id]
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for sink in self.sinks.values():
            if sink.transport is not None:
                sink.transport.close()
        self.sinks.clear()
