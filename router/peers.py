"""Bookings shared between the routers of one fleet: each router tells its peers where it sent each request.

Serve runs one router per ingress replica (DESIGN.md §3). Between two publications of a replica's stats (every
``stats_period_s``, delivered about 0.11 s late) every router sees only its own sends, so N routers acting on
the same stale view pile onto the same replica (Mitzenmacher, "How useful is old information?"). A booking is
what a router learns the moment it decides; broadcast to its peers, it lets each of them count the others'
sends in its deltas too, as Ray's ``KVAwareRouter`` replicates its reservations to peer ingress replicas and
NVIDIA Dynamo's routers sync theirs.

A booking (a plain tuple, what crosses processes)::

    (replica_id: str, routed_time: float, prompt_tokens: int, decode_tokens: float, prefix_hashes: tuple[int])

``routed_time`` is the sender's ``time.time()``; ``prompt_tokens`` its uncached prompt tokens on that replica and
``decode_tokens`` its expected output (what it records in its own accounting); ``prefix_hashes`` at most
``MAX_HASHES`` of the request's chained prefix hashes, so a receiver's prefix index finds the conversation at
once (not only one stats period later, router/feed.py).

A receiver (``apply``) adds each valid booking for a replica it knows to its accounting
(``RouterAccounting.on_peer_routed``: counted in the deltas until the replica's stats pass ``routed_time``, and
in the traffic share, which so rises to about 1 when every peer's bookings arrive) and hands the hashes to the
policy's ``on_peer_routed``. A malformed booking is skipped, never raised: it comes from another process.

Nothing here can fail or hang a request: bookings are sent after the decision, in the background, and a router
whose peers fall silent sees its traffic share drop and scales what it knows by it (router/share.py), as it did
before bookings existed. Everything is bounded: the outbox (``MAX_OUTBOX``, oldest dropped), a batch
(``MAX_BATCH``), the bookings a receiver holds (``accounting.MAX_PEER_BOOKINGS`` per replica, dropped once the
stats cover them).

The live channel (this module's process state; the simulator only uses ``booking``, ``apply`` and ``InTransit``).
Routers in this process ``post`` bookings; after the current loop step ``flush`` hands them, as one batch, to the
ingress's link (deploy/peer_link.py: one UDP datagram per peer, ``encode``/``decode``). In the peer's process the
datagram waits in the link's socket until the next routing decision there ``poll``s it (the link also polls on
a timer, for a router that is not deciding): the link calls ``deliver`` with the kernel's arrival time, which
hands the batch to every router registered there, and each router applies what it holds before it decides. So a
decision sees every booking that reached its process before it, with no thread hand-off in between. (With a
receiver thread, built first, a booking reached that thread a median 1.0 ms after the decision on the loaded
2-core host, and the router's loop 0.4 ms after that.) Why this state
lives here and not in router/serve_router.py: Ray pickles a custom router's module by value, so a registry
there would be a private copy in each router (router/completions.py says more). No link attached (a handle
outside an ingress): ``post`` drops the booking.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import uuid
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

Booking = tuple  # (replica_id, routed_time, prompt_tokens, decode_tokens, prefix_hashes)

MAX_HASHES = 64  # 64 blocks of a prompt (32k tokens at 512 per block): deeper prefixes add little, cost bytes
MAX_BATCH = 1024  # bookings per batch handed to the link (which splits a batch into datagrams by size)
MAX_OUTBOX = 8192  # bookings waiting for the sender; a stuck sender drops the oldest

PROCESS_ID = uuid.uuid4().hex  # this process among its peers (deploy/peer_link.py)


def booking(replica_id: str, at: float, prompt_tokens: int, decode_tokens: float,
            prefix_hashes: Sequence[int] = ()) -> Booking:
    """One booking (the module docstring's tuple)."""
    return (replica_id, at, prompt_tokens, decode_tokens, tuple(prefix_hashes[:MAX_HASHES]))


def _valid(b: Any) -> bool:
    if type(b) is not tuple or len(b) != 5:
        return False
    replica_id, at, prompt, decode, hashes = b
    return (type(replica_id) is str and type(at) is float and math.isfinite(at)
            and type(prompt) is int and prompt >= 0
            and type(decode) in (int, float) and math.isfinite(decode) and decode >= 0
            and type(hashes) is tuple and len(hashes) <= MAX_HASHES and all(type(h) is int for h in hashes))


def apply(bookings: Iterable[Any], accounting: Any, policy: Any, now: float,
          known: Optional[Callable[[str], bool]] = None,
          on_applied: Optional[Callable[[float], None]] = None) -> int:
    """Add peers' ``bookings``, arrived at ``now``, to a router's ``accounting`` and ``policy``; returns how many
    were applied.

    ``known(replica_id)``: only bookings for replicas this router routes to (None: all); others (another
    deployment's, a replica that left) would never be pruned by stats. ``on_applied(routed_time)`` is called for
    each booking applied (the Ray adapter logs the lags).
    """
    on_peer_routed = getattr(policy, "on_peer_routed", None)
    n = 0
    for b in bookings:
        if not _valid(b) or (known is not None and not known(b[0])):
            continue
        replica_id, at, prompt, decode, hashes = b
        accounting.on_peer_routed(replica_id, at=at, prompt_tokens=prompt, decode_tokens=float(decode), now=now)
        if on_peer_routed is not None and hashes:
            on_peer_routed(hashes, replica_id)
        if on_applied is not None:
            on_applied(at)
        n += 1
    return n


class InTransit:
    """How many peers' decisions a decision of this router cannot see: those made within the peers' lag of it.

    Learned from the bookings that arrive, so bursts count as they happen (requests that arrive together reach
    every router together; the Mooncake trace's timestamps come in 3 s buckets, tens of requests at once):

        lag     running mean (weight ``lag_weight`` per booking) of ``now - routed_time`` at a booking's
                arrival, clamped to [0, ``max_lag_s``] (a clock step or a booking stuck behind a dead peer
                cannot blow it up)
        pairs   for each arriving booking routed at t, this router's own sends after t - lag (its own
                decisions that booking's peer could not see, or that could not see it), summed
        value   pairs / own sends (both exponentially decayed over ``tau_s``, so a silent peer set goes to 0):
                the peers' decisions concurrent with one of ours. Arrivals that do not bunch give about
                2 * peer rate * lag; a burst spread over N routers about the burst's size times (N - 1) / N.

    (Also scaling a router's own sends within the lag by the peers' bookings per own send, as the unseen rest of
    a burst, was measured and left out: Mooncake x4.5, 4 replicas, 8 routers, mean TTFT 0.325 s with it, 0.332
    s without, no change on Azure.)

    ``value`` changes only on ``on_booking``, ``on_sent`` and ``on_tick`` (the router calls it on each new
    publication). Params are fixed, not tuned: ``tau_s`` 2 s (four stats periods), ``lag_weight`` 0.05,
    ``max_lag_s`` 1 s; the last 64 own send times are kept.
    """

    __slots__ = ("tau_s", "lag_weight", "max_lag_s", "value", "lag", "_own", "_pairs", "_at", "_sent")

    def __init__(self, tau_s: float = 2.0, lag_weight: float = 0.05, max_lag_s: float = 1.0) -> None:
        self.tau_s, self.lag_weight, self.max_lag_s = tau_s, lag_weight, max_lag_s
        self.value = 0.0
        self.lag: float | None = None
        self._own = 0.0  # own sends, decayed
        self._pairs = 0.0  # (peer booking, own send within the lag of it) pairs, decayed
        self._at: float | None = None
        self._sent: deque[float] = deque(maxlen=64)  # own send times, newest last

    def on_booking(self, routed_time: float, now: float) -> None:
        lag = now - routed_time
        lag = 0.0 if lag < 0 else (self.max_lag_s if lag > self.max_lag_s else lag)
        self.lag = lag if self.lag is None else self.lag + self.lag_weight * (lag - self.lag)
        self._decay(now)
        horizon, mine = routed_time - self.lag, 0
        for t in reversed(self._sent):
            if t <= horizon:
                break
            mine += 1
        self._pairs += mine
        self._update()

    def on_sent(self, now: float) -> None:
        self._decay(now)
        self._own += 1.0
        self._sent.append(now)
        self._update()

    def on_tick(self, now: float) -> None:
        self._decay(now)
        self._update()

    def _update(self) -> None:
        self.value = self._pairs / self._own if self._own > 0 else 0.0

    def _decay(self, now: float) -> None:
        if self._at is None or now > self._at:
            if self._at is not None:
                factor = math.exp((self._at - now) / self.tau_s)
                self._own *= factor
                self._pairs *= factor
            self._at = now


def shares_bookings(policy: Any) -> bool:
    """Whether ``policy`` sends and takes bookings: its params say so (``peer_bookings``); policies without
    the switch (pow2 = Ray's default, which shares nothing) never do."""
    return bool(getattr(getattr(policy, "params", None), "peer_bookings", False))


# ---- the live channel: this process's routers <-> its ingress's link (deploy/peer_link.py) ------------------------
class PeerListener(Protocol):
    def _peer_bookings(self, batch: list, arrived: float) -> None: ...


_lock = threading.Lock()
_outbox: deque = deque(maxlen=MAX_OUTBOX)
_send: Optional[Callable[[list], None]] = None
_poll: Optional[Callable[[], int]] = None
_scheduled = False  # a flush is scheduled on the posting loop
_listeners: "weakref.WeakSet[PeerListener]" = weakref.WeakSet()


def attach_sender(send: Callable[[list], None], poll: Optional[Callable[[], int]] = None) -> None:
    """The ingress's link: ``send(batch)`` (never raises, never blocks) carries a batch to every peer; ``poll()``
    (never raises, never blocks) ``deliver``s what the peers sent that arrived since, returning how many
    batches."""
    global _send, _poll
    with _lock:
        _send, _poll = send, poll


def detach_sender() -> None:
    """No link any more (it closed): nothing is sent or polled."""
    global _send, _poll
    with _lock:
        _send = _poll = None
        _outbox.clear()


def poll() -> int:
    """Take what the peers sent and this process has not delivered yet (a router calls it before each decision):
    the number of batches delivered, 0 without a link."""
    receive = _poll
    return receive() if receive is not None else 0


def post(b: Booking) -> bool:
    """Queue a booking for the peers; False when no link is attached (dropped). Called on a router's loop, it
    sends after the current loop step (the bookings of a burst go in one batch, and the routing decision never
    waits for the send); with no running loop, at once."""
    global _scheduled
    with _lock:
        if _send is None:
            return False
        _outbox.append(b)
        if _scheduled:
            return True
        _scheduled = True
    try:
        asyncio.get_running_loop().call_soon(flush)
    except RuntimeError:
        flush()
    return True


def flush() -> None:
    """Send everything queued, in batches of at most ``MAX_BATCH``."""
    global _scheduled
    while True:
        with _lock:
            send = _send
            n = min(MAX_BATCH, len(_outbox))
            batch = [_outbox.popleft() for _ in range(n)]
            if not _outbox:
                _scheduled = False
        if not batch or send is None:
            return
        send(batch)


def register(router: PeerListener) -> None:
    """Hand peers' batches to ``router`` (held weakly)."""
    with _lock:
        _listeners.add(router)


def deliver(batch: list, arrived: float) -> int:
    """A batch from a peer that reached this process at ``arrived`` (``time.time()`` clock): to every router
    registered in this process (any thread; each applies it before its next decision). Returns the number of
    routers it went to."""
    if type(batch) is not list:
        return 0
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener._peer_bookings(batch, arrived)
    return len(listeners)


# ---- the wire format of a batch (deploy/peer_link.py: one UDP datagram) --------------------------------------------
def encode(token: str, batch: Sequence[Booking]) -> bytes:
    """JSON, no pickle: nothing executable crosses the socket. ``token`` is the receiver's secret."""
    return json.dumps({"t": token, "b": batch}, separators=(",", ":")).encode()


def decode(data: bytes, token: str) -> list | None:
    """The bookings of a datagram addressed with ``token`` (tuples again), or None when it is not ours or not
    well formed (never raises). Each booking is still checked by ``apply``."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if type(obj) is not dict or obj.get("t") != token or type(obj.get("b")) is not list:
        return None
    out = []
    for b in obj["b"]:
        if type(b) is list and len(b) == 5 and type(b[4]) is list:
            if type(b[1]) is int:
                b[1] = float(b[1])
            out.append((b[0], b[1], b[2], b[3], tuple(b[4])))
    return out
