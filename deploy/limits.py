"""Request limits, as ASGI middleware ahead of routing and body parsing: admission (429) and body size (413).

  admission  a generation request (``POST /v1/completions``, ``POST /v1/chat/completions``) is refused with 429
             (``code: overloaded``, ``Retry-After``) while this ingress replica already handles
             ``ingress_max_ongoing_requests`` of them, before its body is read: the cheapest answer under a
             flood. An admitted request counts until its response ended (a stream: its last event, or the
             client went away).
  body size  a body over ``max_body_bytes`` is refused with 413 (``request_too_large``): from Content-Length
             before reading, else while reading a chunked body. The body is then handed on whole, so FastAPI
             parses (and pydantic validates) only bodies that passed.

``Limits`` (the settings and the live count) is a class attribute of ``RequestLimits`` set by the ingress
constructor, for the same reason as ``ApiKeyGuard.digests`` (deploy/auth.py): one ingress replica per Ray
worker process, and Serve pickles the route methods by value.
"""

from dataclasses import dataclass, field
from typing import Any, Callable

from halffull.deploy.protocol.errors import ApiError, bad, overloaded, too_large

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


@dataclass
class Limits:
    max_active: int  # ingress_max_ongoing_requests
    max_body_bytes: int
    retry_after_s: float
    on_reject: Callable[[str, int], None] = lambda endpoint, status: None  # metrics hook: (endpoint, status)
    on_active: Callable[[int], None] = lambda num_active: None  # metrics hook: the count after each change
    num_active: int = field(default=0)


def endpoint_of(path: str) -> str:
    """The metrics ``endpoint`` tag of a path: completions, chat, or the path's last segment."""
    return GENERATION_PATHS.get(path) or path.rstrip("/").rsplit("/", 1)[-1] or "root"


class RequestLimits:
    """Pure ASGI middleware (see the module docstring)."""

    limits: Limits | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limits = RequestLimits.limits
        if scope["type"] != "http" or limits is None:
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        generation = scope.get("method") == "POST" and path in GENERATION_PATHS
        if generation and limits.num_active >= limits.max_active:
            err = overloaded(f"The service is overloaded ({limits.num_active} requests in progress)",
                             limits.retry_after_s)
            await self._refuse(err, path, scope, receive, send)
            return
        if generation:
            limits.num_active += 1
            limits.on_active(limits.num_active)
        try:
            if scope.get("method") in _NO_BODY:
                await self.app(scope, receive, send)
                return
            try:
                body = await read_body(scope, receive, limits.max_body_bytes)
            except ApiError as err:
                await self._refuse(err, path, scope, receive, send)
                return
            if body is None:  # the client went away while sending
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            if generation:
                limits.num_active -= 1
                limits.on_active(limits.num_active)

    @staticmethod
    async def _refuse(err: ApiError, path: str, scope, receive, send) -> None:
        RequestLimits.limits.on_reject(endpoint_of(path), err.status)
        await err.response()(scope, receive, send)


async def read_body(scope: dict[str, Any], receive, limit: int) -> bytes | None:
    """The whole request body, or ApiError 413 past ``limit`` bytes (400 for a malformed Content-Length);
    None if the client disconnected."""
    length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
    if length is not None:
        if not length.isdigit():
            raise bad("Content-Length must be a non-negative integer", code="invalid_request")
        if int(length) > limit:
            raise too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that gives the buffered body once, then the client's own messages (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _route_path(scope: dict[str, Any]) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path
