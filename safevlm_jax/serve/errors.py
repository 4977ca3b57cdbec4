"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status.

Every refusal the server makes is an `APIError`; the app turns it (and FastAPI's own
routing errors, and anything unexpected) into this JSON, so a client of OpenAI's API reads
our errors as it reads OpenAI's. `type` follows OpenAI: `invalid_request_error` for the
client's mistakes, `authentication_error` (401), `server_error` (5xx).
"""

from __future__ import annotations

from typing import Mapping

from fastapi.responses import JSONResponse

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_error"}


class APIError(Exception):
    """status: HTTP status; param: the request field at fault (dotted path) or None;
    code: a stable machine-readable reason (e.g. `image_too_large`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return _TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def param_path(loc) -> str:
    """A field's place as `param` names it: ('messages', 0, 'content') -> 'messages[0].content'
    (each name cut at 80 characters: a key can be as long as the body)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part:.80}" if out else f"{part:.80}")
    return out
