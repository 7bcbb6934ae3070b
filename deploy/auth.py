"""API keys (off by default), checked by an ASGI middleware ahead of routing (unknown paths and wrong methods
need a key too).

Keys come from ``HALFFULL_API_KEYS`` (comma-separated) and/or ``HALFFULL_API_KEYS_FILE`` (one key per line,
``#`` comments), read where the app is built (``serve run``) and in each ingress replica's own environment; the
union is accepted. Only SHA-256 digests leave the building process. With any key configured, every route but
``GET /health`` (unknown paths, ``/openapi.json`` and ``/docs`` included) answers 401 without
``Authorization: Bearer <key>``; comparison is ``hmac.compare_digest`` over digests, against every key. A
variable that is set but holds no key, or an unreadable key file, fails the deployment rather than leaving the
API open.
"""

import hashlib
import hmac
from typing import Mapping

from halffull.deploy.protocol.errors import unauthorized

API_KEYS_ENV = "HALFFULL_API_KEYS"
API_KEYS_FILE_ENV = "HALFFULL_API_KEYS_FILE"
OPEN_PATHS = frozenset({"/health"})  # answered without an API key


def load_api_keys(environ: Mapping[str, str]) -> list[str]:
    """Keys from ``HALFFULL_API_KEYS`` (comma-separated) and ``HALFFULL_API_KEYS_FILE`` (one per line, ``#``
    comments). [] when neither is set: auth is off. A source that is set but yields no key raises ValueError."""
    keys: list[str] = []
    if API_KEYS_ENV in environ:
        found = [k.strip() for k in environ[API_KEYS_ENV].split(",") if k.strip()]
        if not found:
            raise ValueError(f"{API_KEYS_ENV} is set but holds no key; unset it to turn auth off")
        keys += found
    path = environ.get(API_KEYS_FILE_ENV)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{API_KEYS_FILE_ENV}={path!r}: cannot read the key file: {exc}") from None
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"{API_KEYS_FILE_ENV}={path!r} holds no key; unset it to turn auth off")
        keys += found
    return keys


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")).digest()


def api_key_digests(environ: Mapping[str, str]) -> list[bytes]:
    return sorted({key_digest(k) for k in load_api_keys(environ)})


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def key_allowed(token: bytes | None, digests: tuple[bytes, ...]) -> bool:
    """Constant-time check of ``token`` against every configured key digest (no early exit)."""
    presented = key_digest(token if token is not None else b"")
    ok = False
    for digest in digests:
        ok |= hmac.compare_digest(presented, digest)
    return ok and token is not None


class ApiKeyGuard:
    """Pure ASGI (not BaseHTTPMiddleware, which would buffer streams and break disconnect handling).

    ``digests`` is a class attribute set by the ingress constructor (one ingress replica per Ray worker
    process). Not a module global: Serve pickles the ingress methods by value, so a ``global`` statement in
    them would write to a copy of this module's namespace; the class itself is pickled by reference.
    """

    digests: tuple[bytes, ...] = ()

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        digests = ApiKeyGuard.digests
        if scope["type"] == "http" and digests:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            if path not in OPEN_PATHS:
                header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
                if not key_allowed(bearer_token(header), digests):
                    await unauthorized().response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)

