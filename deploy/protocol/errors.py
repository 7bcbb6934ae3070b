"""The one error model: every failure answers ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's).

``ApiError`` is raised anywhere on the request path and rendered by ``response()``. ``from_validation``
maps pydantic's errors (FastAPI's ``RequestValidationError``) onto it; the first error wins:

  pydantic error type                              status  code                         message
  json_invalid                                      400    invalid_json                 Request body is not valid JSON: ...
  missing body / body not an object                 400    invalid_json                 ... must be a JSON object
  missing, missing_required_parameter               400    missing_required_parameter   '<param>' is required
  *_type (string_type, int_type, model_type, ...)   400    invalid_type                 '<param>' must be <a kind>, got <value>
  everything else (ranges, literals, our checks)    400    invalid_value                '<param>' <what is wrong>, got <value>

``param`` is the field path as OpenAI writes it: ``messages[0].content``. Custom checks in the models raise
``PydanticCustomError(code, "must be ...")`` with ``code`` one of ``invalid_type`` / ``invalid_value`` /
``missing_required_parameter`` and a message that is a fragment ("must be ...": the param and the value
are put around it) or a whole sentence ending with "." (used as it is), so the code names the kind of mistake: a wrong JSON type is ``invalid_type``,
a value of the right type out of range ``invalid_value``.

Messages never carry a lone surrogate (JSON bodies may hold one, UTF-8 cannot): values are quoted with
``json.dumps`` (ASCII escapes) and a message is made encodable before it is rendered.
"""

import json
import math
from typing import Any, Iterable, Mapping, Sequence

from fastapi.responses import JSONResponse
from pydantic import BaseModel

# Union tags that pydantic puts into an error's location (tagged unions, e.g. /tokenize's two shapes): not
# part of the field path a client sees.
UNION_TAGS = frozenset({"prompt_request", "messages_request"})
CODES = frozenset({"invalid_type", "invalid_value", "missing_required_parameter"})
_KINDS = {  # pydantic's type-error types -> what the field must be
    "string_type": "a string", "int_type": "an integer", "bool_type": "a boolean", "float_type": "a number",
    "model_type": "an object", "dict_type": "an object", "model_attributes_type": "an object",
    "list_type": "a list", "none_required": "null", "is_instance_of": "an object",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body; ``type`` defaults by status (4xx: invalid_request_error)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, _encodable(message), param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: float) -> ApiError:
    """429 with Retry-After (whole seconds, rounded up, as RFC 9110 wants)."""
    return ApiError(429, f"{message}; retry after {math.ceil(retry_after_s)} s.", code="overloaded",
                    type="rate_limit_error", headers={"retry-after": str(math.ceil(retry_after_s))})


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")


def unauthorized() -> ApiError:
    return ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"})


def shown(value: Any, limit: int = 80) -> str:
    """A request value quoted for a message: JSON, ASCII-escaped, cut to ``limit`` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text[:limit]


def field_path(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``; None for the body itself."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in UNION_TAGS:
            path += f".{part}" if path else str(part)
    return path or None


def from_validation(errors: Iterable[Mapping[str, Any]]) -> ApiError:
    """The first of pydantic's ``errors`` as an ``ApiError`` (see the module docstring)."""
    error = next(iter(errors), None)
    if error is None:
        return bad("Invalid request")
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    loc = tuple(error.get("loc") or ())
    param = field_path(loc)
    if kind == "json_invalid":
        return bad(f"Request body is not valid JSON: {ctx.get('error', error.get('msg'))}", code="invalid_json")
    if param is None:  # the body as a whole
        return _body_error(kind, error.get("input"))
    got = f", got {shown(error.get('input'))}"
    if kind in ("missing", "missing_required_parameter"):
        return bad(f"'{param}' is required", param, code="missing_required_parameter")
    if kind in CODES:  # our own checks: a fragment ("must be ...") or a whole sentence (ends with ".")
        msg = error.get("msg") or ""
        return bad(msg if msg.endswith(".") else f"'{param}' {msg}{got}", param, code=kind)
    if kind in _KINDS:
        return bad(f"'{param}' must be {_KINDS[kind]}{got}", param, code="invalid_type")
    if kind == "literal_error":
        return bad(f"'{param}' must be one of {ctx.get('expected')}{got}", param)
    return bad(f"'{param}': {error.get('msg')}{got}", param)


def _body_error(kind: str, value: Any) -> ApiError:
    if kind == "missing":  # FastAPI reads an empty body as no body
        return bad("Request body is not valid JSON: the body is empty", code="invalid_json")
    if isinstance(value, (bytes, bytearray)):  # not parsed: not sent as JSON
        return bad("Request body must be a JSON object sent with Content-Type: application/json",
                   code="invalid_json")
    return bad("Request body must be a JSON object", code="invalid_json")


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
