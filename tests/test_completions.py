"""router/completions.py: output counts from the ingress to the routers of its process (pure logic, no Ray)."""

from __future__ import annotations

import pytest

from halffull.router import completions


class Listener:
    def __init__(self):
        self.heard: list[str] = []

    def _note_arrived(self, request_id: str) -> None:
        self.heard.append(request_id)


@pytest.fixture
def listener(monkeypatch):
    monkeypatch.setattr(completions, "_notes", type(completions._notes)())
    monkeypatch.setattr(completions, "_listeners", type(completions._listeners)())
    listener = Listener()
    completions.register(listener)
    return listener


def test_a_count_is_announced_and_taken_once(listener):
    completions.report_completion("a", 7)
    assert listener.heard == ["a"]
    assert completions.take_note("a") == 7
    assert completions.take_note("a") is None


def test_without_a_router_nothing_is_kept(monkeypatch):
    monkeypatch.setattr(completions, "_notes", type(completions._notes)())
    monkeypatch.setattr(completions, "_listeners", type(completions._listeners)())
    completions.report_completion("a", 7)
    assert completions.take_note("a") is None


def test_counts_nobody_takes_are_bounded_oldest_first(listener, monkeypatch):
    monkeypatch.setattr(completions, "MAX_NOTES", 3)
    for i in range(5):
        completions.report_completion(f"r{i}", i)
    assert [completions.take_note(f"r{i}") for i in range(5)] == [None, None, 2, 3, 4]


def test_a_router_that_is_gone_is_forgotten(listener):
    other = Listener()
    completions.register(other)
    del other
    completions.report_completion("a", 1)
    assert listener.heard == ["a"] and len(completions._listeners) == 1
