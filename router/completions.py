"""Output token counts, from the ingress to the routers in its process.

The router never sees the token stream; the ingress does. When a request ends the ingress calls
``report_completion(request_id, num_output_tokens)``, and every halffull router in the process (one per
deployment handle) can take the count for the request it routed (``take_note``). The router may hear Ray's
``on_request_completed`` before or after the count arrives: a count that comes later is announced to each
registered router with ``router._note_arrived(request_id)`` (any thread).

Why this state lives here and not in router/serve_router.py: Ray Serve registers the module of a custom request
router for pickling *by value* (``RequestRouterConfig._serialize_request_router_cls``). The class reaches the
ingress as a copy whose methods carry private copies of that module's globals, so a registry kept there would
be one object for the ingress's ``report_completion`` and another for the routers: the counts would never
arrive. This module is pickled by reference (imported by name), so the ingress and its routers share one
registry. tests/test_serve_router.py checks this through Ray's own serialization, in a separate process.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Optional, Protocol

# Counts kept for routers that have not taken them yet, oldest dropped first. A count normally waits only for
# Ray's on_request_completed of the same request (about the same moment); one nobody takes (its router let it
# expire, or routed it with another handle) would otherwise stay: 4096 is over a minute of requests at a GPU's rate
# and under a megabyte.
MAX_NOTES = 4096


class NoteListener(Protocol):
    def _note_arrived(self, request_id: str) -> None: ...


_lock = threading.Lock()
_notes: OrderedDict[str, int] = OrderedDict()  # request id -> output tokens, bounded
_listeners: "weakref.WeakSet[NoteListener]" = weakref.WeakSet()


def register(router: NoteListener) -> None:
    """Announce later counts to ``router`` (held weakly: a router that is gone is forgotten)."""
    with _lock:
        _listeners.add(router)


def report_completion(request_id: str, num_output_tokens: int) -> None:
    """Tell this process's routers how many tokens a finished request produced (thread-safe)."""
    if not _listeners:
        return  # no halffull router in this process (e.g. Ray's default router)
    with _lock:
        _notes[request_id] = num_output_tokens
        while len(_notes) > MAX_NOTES:
            _notes.popitem(last=False)
        listeners = list(_listeners)
    for listener in listeners:
        listener._note_arrived(request_id)


def take_note(request_id: str) -> Optional[int]:
    """The count reported for ``request_id``, once (None if none arrived yet)."""
    with _lock:
        return _notes.pop(request_id, None)
