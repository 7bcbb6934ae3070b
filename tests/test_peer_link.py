"""The ingress's UDP link for peer bookings (deploy/peer_link.py), without Ray: two links on 127.0.0.1 whose
hellos a fake Serve broadcast carries between them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time

import pytest

from halffull.deploy import peer_link
from halffull.deploy.peer_link import PeerLink
from halffull.router import peers
from tests.test_router_peers import Listener


class FakeBroadcast:
    """``DeploymentHandle.broadcast("peer_hello", ...)`` to a list of links (the deployment's replicas)."""

    def __init__(self, links: list[PeerLink], sources: list[str]):
        self.links, self.sources = links, sources

    def broadcast(self, method: str, source: str, host: str, port: int, token: str):
        assert method == "peer_hello"
        links, sources = self.links, self.sources

        class Response:
            async def results_async(self, timeout_s=None, return_exceptions=False):
                # every replica but the sender (each link process has its own PROCESS_ID live; here one process,
                # so the sender is told apart by its port)
                for link, name in zip(links, sources):
                    if link.port != port:
                        link.on_hello(name, host, port, token)
                return [True] * len(links)

        return Response()


@contextlib.contextmanager
def lone_link(poll_every_s: float):
    """A started link with no peers (call inside a running loop), closed on exit."""
    link = PeerLink("127.0.0.1", lambda: FakeBroadcast([], []), hello_every_s=60, poll_every_s=poll_every_s)
    link.ensure_started()
    try:
        yield link
    finally:
        link.close()


def send_raw(link: PeerLink, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in datagrams:
            s.sendto(data, ("127.0.0.1", link.port))


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def listener():
    got = Listener()
    peers.register(got)
    yield got
    peers.detach_sender()


@pytest.mark.skipif(sys.platform != "linux", reason="arrival times from the kernel (SO_TIMESTAMP) on Linux only")
def test_two_links_find_each_other_and_carry_bookings(listener):
    async def scenario():
        links: list[PeerLink] = []
        handle = FakeBroadcast(links, ["proc-a", "proc-b"])
        a = PeerLink("127.0.0.1", lambda: handle, hello_every_s=0.2, poll_every_s=60)
        b = PeerLink("127.0.0.1", lambda: handle, hello_every_s=0.2, poll_every_s=60)
        links += [a, b]
        try:
            a.ensure_started()
            b.ensure_started()
            await wait_for(lambda: len(a.live_peers()) == 1 and len(b.live_peers()) == 1)
            sent_at = time.time()
            batch = [peers.booking("r0", sent_at, 120, 30.0, (5, 6))]
            a.send(batch)
            await asyncio.sleep(0.05)
            assert listener.batches == []  # it waits in b's socket until a poll (a router's, before it decides)
            polled_at = time.time()
            assert peers.poll() == 1
            assert listener.batches == [batch] and b.num_received == 1 and a.num_bookings_sent == 1
            # its arrival time is the kernel's receive time, not the poll's
            assert sent_at <= listener.arrivals[0] <= polled_at - 0.04
            assert peers.poll() == 0 and b.poll() == 0  # nothing more: returns at once
        finally:
            a.close()
            b.close()

    asyncio.run(scenario())


def test_the_links_timer_delivers_when_no_router_polls(listener):
    async def scenario():
        with lone_link(poll_every_s=0.05) as link:
            send_raw(link, peers.encode(link.token, [peers.booking("r0", 1.0, 1, 1.0)]))
            await wait_for(lambda: listener.batches)
            assert listener.batches == [[("r0", 1.0, 1, 1.0, ())]] and link.num_received == 1

    asyncio.run(scenario())


def test_one_poll_takes_at_most_max_poll_datagrams(listener, monkeypatch):
    monkeypatch.setattr(peer_link, "MAX_POLL_DATAGRAMS", 3)

    async def scenario():
        with lone_link(poll_every_s=60) as link:
            send_raw(link, *(peers.encode(link.token, [peers.booking("r0", float(i), 1, 1.0)]) for i in range(5)))
            await wait_for(lambda: link.poll() == 3)
            assert link.poll() == 2 and link.poll() == 0
            assert [b[0][1] for b in listener.batches] == [0.0, 1.0, 2.0, 3.0, 4.0]  # in arrival order

    asyncio.run(scenario())


def test_datagrams_without_the_receivers_token_are_dropped(listener):
    async def scenario():
        with lone_link(poll_every_s=0.05) as link:
            send_raw(link, peers.encode("not-the-token", [peers.booking("r0", 1.0, 1, 1.0)]), b"\x00garbage")
            await wait_for(lambda: link.num_dropped == 2)
            assert listener.batches == [] and link.num_received == 0

    asyncio.run(scenario())


def test_a_silent_peer_expires():
    now = [0.0]
    link = PeerLink("127.0.0.1", lambda: None, expire_s=10.0, clock=lambda: now[0])
    link.on_hello("proc-x", "127.0.0.1", 9, "t")
    link.on_hello(peers.PROCESS_ID, "127.0.0.1", 10, "t")  # itself: ignored
    assert len(link.live_peers()) == 1
    now[0] = 10.5
    assert link.live_peers() == []


def test_a_large_batch_is_split_into_datagrams_under_the_limit():
    batch = [peers.booking(f"replica-{i}", 1.0 + i, 8000, 300.0, tuple(range(10**15, 10**15 + 64)))
             for i in range(200)]
    datagrams = peer_link._datagrams("t" * 32, batch)
    assert len(datagrams) > 1 and all(len(d) <= peer_link.MAX_DATAGRAM_BYTES for d in datagrams)
    assert [b for d in datagrams for b in peers.decode(d, "t" * 32)] == batch


def test_sending_to_a_peer_that_is_gone_never_raises():
    async def scenario():
        with lone_link(poll_every_s=60) as link:
            link.on_hello("proc-gone", "127.0.0.1", 1, "t")  # nothing listens on port 1
            for _ in range(3):
                link.send([peers.booking("r0", 1.0, 1, 1.0)])
            assert link.num_bookings_sent == 3

    asyncio.run(scenario())
