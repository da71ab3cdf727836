"""Typed errors with stable codes, classified once.

An ``ApiError`` carries a stable ``code`` (the key of its text in
``mailer.texts``), an HTTP-like ``status`` for the NATS micro error headers,
and the values its text needs. Anything else that escapes a handler becomes
``internal_error`` (500) and is logged with its traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "Unauthenticated",
    "Unavailable",
    "ValidationFailed",
]


class ApiError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, code: str | None = None, /, **values: Any) -> None:
        if code is not None:
            self.code = code
        self.values = values
        super().__init__(self.code, values)


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class ValidationFailed(ApiError):
    status = 422
    code = "validation_error"


class Unauthenticated(ApiError):
    status = 401
    code = "unauthenticated"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "invalid_state"


class Unavailable(ApiError):
    status = 503
    code = "throttle_backend_unavailable"
