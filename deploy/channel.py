"""The ingress's side of the token channel (replicas/channel.py has the protocol and the replica's side).

``ChannelClient`` (one per ingress process, its id is the ``sink``) keeps one connection per LLM replica it
has sent requests to, opened when a replica's start event first names its channel address, and hands every
frame's tokens to the ``RunTokens`` of their request id. A ``Run`` (deploy/run.py) registers its attempt's
request id before sending it, reads its first batch, start / end / failure from the Serve stream and its later
batches from its ``RunTokens``:

  * end event: the run ends once it has read as many tokens as the end event counts (the end travels on the
    Serve stream, the tokens on the channel: either may arrive first); if they do not all come within
    ``END_GRACE_S`` the run fails (ChannelError), never hangs;
  * the connection closed or broke (replica process gone, network): every run reading from it fails with
    ChannelError (a replica failure: re-sent before its first token, an error event after).
"""

import asyncio
import logging
import uuid
from typing import Any

from halffull.replicas.channel import FrameDecoder, encode_frame

logger = logging.getLogger("ray.serve")

END_GRACE_S = 10.0


class ChannelError(ConnectionError):
    """The token channel to the replica broke, or the tokens an end event counts never came."""


class RunTokens:
    """One attempt's tokens: filled by the channel connection, ended by the Serve stream's end event.

    With ``first_on_stream`` (how LLMReplica sends: replicas/deployment.py) the first batch comes on the Serve
    stream (``push_first``) and the channel carries the rest: channel tokens that overtake the first batch
    wait for it, and the first batch is always read alone (its own SSE event, never merged with later ones).
    Unless the start event says the first batch comes on the channel (``first_on_channel``: the replica already
    had this ingress's connection): then the tokens of the first channel frame are the first batch, read alone
    (those of every frame that overtook the start event, where several did).
    """

    __slots__ = ("request_id", "tokens", "first", "num_received", "expected", "error", "_waiter", "_first_frame")

    def __init__(self, request_id: str, first_on_stream: bool = False):
        self.request_id = request_id
        self.tokens: list[int] = []
        # The first batch: None while awaited on the Serve stream, a list until read, () once read.
        self.first: list[int] | tuple | None = None if first_on_stream else ()
        self.num_received = 0
        self.expected: int | None = None  # the end event's num_output_tokens
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._first_frame = False  # the next channel push is the first batch (first_on_channel)

    def push(self, tokens: list[int]) -> None:
        """Tokens from the channel (in order; after the first batch when that comes on the Serve stream)."""
        if self._first_frame:
            self._first_frame = False
            self.first = tokens
        else:
            self.tokens += tokens
        self.num_received += len(tokens)
        self._wake()

    def first_on_channel(self) -> None:
        """The start event said the first batch comes on the channel, not on the Serve stream."""
        if self.first is not None:  # not awaiting one
            return
        if self.tokens:  # its frame overtook the start event
            self.first, self.tokens = self.tokens, []
            self._wake()
        else:
            self._first_frame = True

    def push_first(self, tokens: list[int]) -> None:
        """The first batch, from the Serve stream (``first_on_stream``)."""
        if self.first is not None:  # already had it: in order after it
            self.push(tokens)
            return
        self.first = tokens
        self.num_received += len(tokens)
        self._wake()

    def end(self, num_output_tokens: int) -> None:
        self.expected = num_output_tokens
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self) -> list[int]:
        """Every token received since the previous call (waits for one); StopAsyncIteration once all the
        tokens the end event counts were read; the failure, if any."""
        while True:
            first = self.first
            if first:  # the first batch from the Serve stream, alone
                self.first = ()
                return first
            if first is not None and self.tokens:
                batch, self.tokens = self.tokens, []
                return batch
            if self.expected is not None and self.num_received >= self.expected:
                raise StopAsyncIteration
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if self.expected is None:
                    await self._waiter
                else:  # the end came first: its tokens are on their way, or lost with the connection
                    try:
                        await asyncio.wait_for(self._waiter, END_GRACE_S)
                    except asyncio.TimeoutError:
                        raise ChannelError(f"{self.expected - self.num_received} tokens of {self.request_id} "
                                           f"never arrived on the token channel") from None
            finally:
                self._waiter = None


class _Connection(asyncio.Protocol):
    def __init__(self, client: "ChannelClient", address: tuple[str, int]):
        self.client, self.address = client, address
        self.decoder = FrameDecoder()
        self.members: set[str] = set()  # request ids reading from this connection
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(encode_frame({"sink": self.client.sink_id}))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ValueError as exc:
            logger.error("halffull ingress: bad token channel frame from %s: %r", self.address, exc)
            self.transport.close()
            return
        runs = self.client.runs
        for frame in frames:
            for request_id, tokens in frame.items():
                run = runs.get(request_id)
                if run is not None:  # else cancelled meanwhile: drop
                    run.push(tokens)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.client._lost(self, exc)


class ChannelClient:
    """See the module docstring. Use from one event loop (the ingress replica's)."""

    def __init__(self):
        self.sink_id = uuid.uuid4().hex
        self.runs: dict[str, RunTokens] = {}
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}

    def register(self, request_id: str, first_on_stream: bool = False) -> RunTokens:
        tokens = self.runs[request_id] = RunTokens(request_id, first_on_stream)
        return tokens

    def unregister(self, request_id: str) -> None:
        self.runs.pop(request_id, None)
        for conn in self._connections.values():
            conn.members.discard(request_id)

    async def attach(self, address: Any, tokens: RunTokens) -> None:
        """Read ``tokens``'s request from the replica at ``address`` ([host, port]); connects on first use."""
        host, port = str(address[0]), int(address[1])
        conn = await self._connection((host, port))
        if conn.closed:
            tokens.fail(ChannelError(f"token channel to {host}:{port} closed"))
            return
        conn.members.add(tokens.request_id)

    async def _connection(self, key: tuple[str, int]) -> _Connection:
        conn = self._connections.get(key)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(key)
        if pending is None:
            pending = self._connecting[key] = asyncio.ensure_future(self._connect(key))
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._connecting.pop(key, None)

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self, key), key[0], key[1])
        except OSError as exc:
            raise ChannelError(f"cannot connect to the token channel at {key[0]}:{key[1]}: {exc}") from exc
        self._connections[key] = conn
        return conn

    def _lost(self, conn: _Connection, exc: BaseException | None) -> None:
        if self._connections.get(conn.address) is conn:
            del self._connections[conn.address]
        error = ChannelError(f"token channel to {conn.address[0]}:{conn.address[1]} closed: {exc!r}")
        for request_id in conn.members:
            run = self.runs.get(request_id)
            if run is not None:
                run.fail(error)
        conn.members.clear()

    def close(self) -> None:
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.close()
