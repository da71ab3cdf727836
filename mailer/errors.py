"""Typed errors with stable codes, classified once.

An ``ApiError`` carries a stable ``code`` (what a caller branches on), an
HTTP-like ``status`` for the NATS micro error headers, the values its human
text needs, and the key of that text in ``mailer.texts`` (the code itself
unless one code has several wordings, e.g. ``throttled`` for a start and for a
test email). Anything else that escapes a handler becomes ``internal_error``
(500) and is logged with its traceback.

``retryable`` tells a caller whether the same request may succeed later
without being changed (throttles, outages) or never will (validation, rights).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

__all__ = [
    "CODES",
    "ApiError",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "QuotaSyncFailed",
    "Refused",
    "SendFailed",
    "Throttled",
    "Unauthenticated",
    "Unavailable",
    "ValidationFailed",
]

# Every code an error reply may carry, with its status: the API's stable
# vocabulary (docs/api.md lists what each means). Texts live in mailer.texts.
CODES: Final[Mapping[str, int]] = {
    "bad_request": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "attachment_not_found": 404,
    "import_not_found": 404,
    "invalid_state": 409,
    "campaign_sending": 409,
    "campaign_busy": 409,
    "quota_not_local": 409,
    "not_scheduled": 409,
    "payload_too_large": 413,
    "validation_error": 422,
    "too_many_in_one_call": 422,
    "too_many_recipients": 422,
    "recipients_limit": 422,
    "import_unreadable": 422,
    "empty_campaign": 422,
    # A campaign names an SMTP account that is not configured (MAILER_SMTP_ACCOUNTS).
    "unknown_account": 422,
    "attachment_too_large": 422,
    "attachments_total_too_large": 422,
    "throttled": 429,
    # The rate governor's reasons, when it refuses a test email's token.
    "rate_per_hour": 429,
    "daily_limit": 429,
    "quota_exhausted": 429,
    "outside_hours": 429,
    "internal_error": 500,
    "test_email_failed": 502,
    "quota_sync_failed": 502,
    "throttle_backend_unavailable": 503,
    "governor_unavailable": 503,
    "sender_unavailable": 503,
    "quota_sync_unavailable": 503,
}


class ApiError(Exception):
    status: ClassVar[int] = 500
    code: str = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, code: str | None = None, /, *, text_key: str | None = None, **values: Any):
        if code is not None:
            self.code = code
        self.text_key = text_key or self.code
        self.values = values
        super().__init__(self.code, values)


class BadRequest(ApiError):
    """Not JSON, not UTF-8, not an object: nothing could be read."""

    status = 400
    code = "bad_request"


class ValidationFailed(ApiError):
    """Readable, but a field is missing, unknown, of the wrong type or out of range."""

    status = 422
    code = "validation_error"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


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
    """The campaign's status does not allow this now (``invalid_state`` and kin)."""

    status = 409
    code = "invalid_state"


class Throttled(ApiError):
    """Too many starts or test emails this hour; ``retry_at`` says when it opens."""

    status = 429
    code = "throttled"
    retryable = True


class Refused(ApiError):
    """A sending rule said no (the rate governor's reason becomes the code)."""

    status = 429
    code = "rate_per_hour"
    retryable = True


class SendFailed(ApiError):
    """The SMTP server did not accept a test email; the send log has the attempt."""

    status = 502
    code = "test_email_failed"


class QuotaSyncFailed(ApiError):
    """The quota syncer answered with an error (the provider's API failed)."""

    status = 502
    code = "quota_sync_failed"
    retryable = True


class Unavailable(ApiError):
    """A backend this request needs is down: try again later."""

    status = 503
    code = "throttle_backend_unavailable"
    retryable = True
