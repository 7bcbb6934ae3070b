"""The ingress's link to its peer ingress replicas, for the routers' bookings (router/peers.py: the format and
the routers' side).

Serve runs one router per ingress replica. Each ``PeerLink`` (one per ingress process) carries the bookings its
routers post to every other ingress replica of the deployment:

* data: one UDP datagram per peer per batch (``peers.encode``: JSON, at most ``MAX_DATAGRAM_BYTES``, a larger
  batch is split), sent from the routers' own loop right after the decision (``peers.flush``). A datagram
  waits in the receiving link's socket until ``poll``: each router there polls before every decision, and the
  link every ``poll_every_s`` for routers that are not deciding; ``poll`` decodes what arrived and hands it to
  the routers here with its arrival time, the kernel's receive timestamp (``peers.deliver``). A datagram must
  carry the receiver's ``token`` (128 random bits), which only peers learned: anything else is dropped.
* membership: every ``hello_every_s`` each link announces (its process id, host, port, token) to every replica
  of its deployment with Ray Serve's ``DeploymentHandle.broadcast("peer_hello", ...)`` (Ray 2.60; the control
  plane use broadcast is made for); a peer not heard from for ``expire_s`` is dropped (a dead ingress
  replica). A link announces itself when it starts and when it first hears a peer, so new replicas join
  within a round trip.

Why UDP and not a Serve broadcast per batch (built first, measured on this 2-core host, 4 ingress replicas,
~47 requests/s): a broadcast crosses the sender's event loop, Ray's core worker and the receiver's request loop
before reaching its router, and its lag was median 10.0 ms, p90 18.2 ms; the simulator puts sal's 16-router
mean TTFT at 52.8 ms with a 5 ms lag and 44.7 ms with none, so every millisecond shows. A datagram goes from
the sender's router loop to the receiver's socket, where the next decision finds it (a receiver thread instead
added a median 0.9 ms of thread wake-up and hand-off on the loaded 2-core host: router/peers.py). Lost
datagrams are fine: a booking is a hint that the next
stats publication supersedes, and a router that hears nothing from its peers falls back to scaling what it
knows by its traffic share (router/share.py).

Host: the Ray node's own IP (as Ray's own ports and the token channel: 127.0.0.1 on a loopback cluster).
"""

import asyncio
import logging
import secrets
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Optional

from halffull.router import peers

logger = logging.getLogger("ray.serve")

HELLO_EVERY_S = 3.0
POLL_EVERY_S = 0.1  # the link's own poll, for routers that are not deciding (the socket buffer stays small)
MAX_POLL_DATAGRAMS = 256  # per poll: a decision never waits on a flood; the rest waits for the next poll
EXPIRE_S = 10.0  # three hellos missed
MAX_DATAGRAM_BYTES = 32768  # well under UDP's 64 KiB; a larger batch is split
_LOG_EVERY_S = 30.0


class PeerLink:
    """This ingress process's end of the peer bookings (module docstring)."""

    def __init__(self, host: str, handle_factory: Callable[[], Any], *, hello_every_s: float = HELLO_EVERY_S,
                 expire_s: float = EXPIRE_S, poll_every_s: float = POLL_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.host, self._handle_factory, self._handle = host, handle_factory, None
        self.hello_every_s, self.expire_s, self.poll_every_s, self._clock = hello_every_s, expire_s, poll_every_s, clock
        self.token = secrets.token_hex(16)
        self.port: Optional[int] = None
        self._sock: Optional[socket.socket] = None
        self._peers: dict[str, tuple[tuple[str, int], str, float]] = {}  # process id -> (address, token, heard at)
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._task: Optional[asyncio.Task] = None
        self._poll_task: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None
        self.num_datagrams_sent = self.num_bookings_sent = self.num_received = self.num_dropped = 0
        self._last_log = -_LOG_EVERY_S

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Bind, attach to the routers, start the hellos and the timer poll (on the running loop; idempotent,
        restarts a crashed task)."""
        if self._sock is None:
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self.host, 0))
            sock.setblocking(False)
            if SO_TIMESTAMP is not None:  # the kernel stamps each datagram's arrival
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
            self._sock, self.port = sock, sock.getsockname()[1]
            peers.attach_sender(self.send, self.poll)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._hello_loop())
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = loop.create_task(self._poll_loop())

    def close(self) -> None:
        peers.detach_sender()
        for task in (self._task, self._poll_task):
            if task is not None:
                task.cancel()
        self._task = self._poll_task = None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # ---- membership -----------------------------------------------------------------------------------------
    def on_hello(self, source: str, host: str, port: int, token: str) -> None:
        """A peer announced itself (``OpenAIIngress.peer_hello``)."""
        if source == peers.PROCESS_ID or not (isinstance(host, str) and isinstance(port, int)
                                               and isinstance(token, str)):
            return
        with self._lock:
            new = source not in self._peers
            self._peers[source] = ((host, port), token, self._clock())
        if new and self._wake is not None:
            self._wake.set()  # answer a newcomer at once, so it learns of us without waiting a period

    def live_peers(self) -> list[tuple[tuple[str, int], str]]:
        now = self._clock()
        with self._lock:
            for source in [s for s, (_, _, heard) in self._peers.items() if now - heard > self.expire_s]:
                del self._peers[source]
            return [(address, token) for address, token, _ in self._peers.values()]

    async def _hello_loop(self) -> None:
        while True:
            await self._hello()
            try:
                await asyncio.wait_for(self._wake.wait(), self.hello_every_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _hello(self) -> None:
        try:
            if self._handle is None:
                self._handle = self._handle_factory()
            results = await self._handle.broadcast("peer_hello", peers.PROCESS_ID, self.host, self.port,
                                                   self.token).results_async(timeout_s=self.hello_every_s,
                                                                             return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
        except Exception as exc:  # no replicas listed yet, a handle that broke: the next period tries again
            errors = [exc]
        if errors:
            self._log("halffull ingress: peer hello not delivered to %d ingress replica(s): %r", len(errors), errors[0])

    # ---- data -----------------------------------------------------------------------------------------------
    def send(self, batch: list) -> None:
        """One datagram (or more, split by size) of ``batch`` to every live peer; never raises, never blocks."""
        sock = self._sock
        if sock is None or not batch:
            return
        for address, token in self.live_peers():
            for data in _datagrams(token, batch):
                try:
                    sock.sendto(data, address)
                    self.num_datagrams_sent += 1
                except OSError as exc:  # a full buffer, a peer gone: bookings are hints
                    self._log("halffull ingress: peer datagram to %s not sent: %r", address, exc)
        self.num_bookings_sent += len(batch)

    def poll(self) -> int:
        """Deliver what the peers sent that has arrived (at most ``MAX_POLL_DATAGRAMS``), each batch with its
        arrival time; the number of batches delivered. Never blocks, never raises (any thread)."""
        sock, delivered = self._sock, 0
        if sock is None:
            return 0
        # The routers' loop and the link's timer: one reader at a time (keeps arrival order); a poll that finds
        # the other one reading returns at once, and that one delivers.
        if not self._poll_lock.acquire(blocking=False):
            return 0
        try:
            for _ in range(MAX_POLL_DATAGRAMS):
                try:
                    data, ancdata, _, _ = sock.recvmsg(65536, _TIMESTAMP_SPACE)
                except OSError:  # BlockingIOError: nothing more; or the socket closed
                    break
                batch = peers.decode(data, self.token)
                if batch is None:
                    self.num_dropped += 1
                    continue
                self.num_received += 1
                peers.deliver(batch, _arrival(ancdata))
                delivered += 1
        finally:
            self._poll_lock.release()
        return delivered

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_every_s)
            self.poll()

    def _log(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning(message, *args)


# Linux's SO_TIMESTAMP (asm-generic/socket.h; Python's socket module does not name it): each datagram comes with
# the kernel's receive time as a struct timeval (ancillary data of the same type). Elsewhere: the poll's time.
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29 if sys.platform == "linux" else None)
_TIMESTAMP_SPACE = socket.CMSG_SPACE(16)  # one struct timeval


def _arrival(ancdata: list) -> float:
    """The kernel's receive time of a datagram (``SO_TIMESTAMP``, the ``time.time()`` clock), or now."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP and len(data) >= 16:
            seconds, micros = struct.unpack("qq", data[:16])
            return seconds + micros * 1e-6
    return time.time()


def _datagrams(token: str, batch: list) -> list[bytes]:
    data = peers.encode(token, batch)
    if len(data) <= MAX_DATAGRAM_BYTES or len(batch) == 1:
        return [data]  # (one booking is at most ~1.5 KB: MAX_HASHES hashes)
    half = len(batch) // 2
    return _datagrams(token, batch[:half]) + _datagrams(token, batch[half:])


def ingress_handle() -> Any:
    """A handle to this replica's own deployment (every ingress replica, this one included), its router on a
    separate loop so the hellos stay off the request loop."""
    from ray import serve

    context = serve.get_replica_context()
    handle = serve.get_deployment_handle(context.deployment, app_name=context.app_name)
    if getattr(handle, "is_initialized", True) is False:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def node_host() -> str:
    import ray

    return ray.util.get_node_ip_address()
