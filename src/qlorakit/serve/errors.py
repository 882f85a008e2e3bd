"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise :class:`APIError`; the app turns it into a JSON response with the right status and
headers (``Retry-After`` for 429 and 503). FastAPI's own validation errors (422) are answered as
400 ``invalid_request_error`` with the offending field in ``param``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ServeError", "APIError", "error_body", "bad_request", "not_found", "unauthorized", "rate_limited",
           "overloaded", "too_large", "policy_violation"]


class ServeError(ValueError):
    """A server setting, key file or adapter is wrong; the message says which and what was expected."""


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error answered to the client: HTTP status, OpenAI error fields, extra headers."""

    def __init__(self, status: int, message: str, type_: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        b = error_body(self.message, self.type, self.param, self.code)
        b["error"].update(self.extra)
        return b


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, "invalid_request_error", param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="qlorakit"'})


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def rate_limited(message: str, retry_after_s: float, code: str = "rate_limit_exceeded") -> APIError:
    return APIError(429, message, "rate_limit_error", code=code, headers={"Retry-After": _retry_after(retry_after_s)})


def overloaded(message: str, retry_after_s: float) -> APIError:
    return APIError(503, message, "server_overloaded", code="queue_full",
                    headers={"Retry-After": _retry_after(retry_after_s)})


def too_large(message: str) -> APIError:
    return APIError(413, message, "invalid_request_error", code="request_too_large")


def policy_violation(message: str, verdicts: list[dict[str, Any]]) -> APIError:
    return APIError(400, message, "invalid_request_error", param="messages", code="content_policy_violation",
                    extra={"guard_verdicts": verdicts})
