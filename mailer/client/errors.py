"""The API's error replies as exceptions: one class per error code.

Every class carries the reply's ``code`` (stable: branch on it or on the
class), ``message`` (for people, in the caller's language), ``details`` (the
values the message was built from, all strings) and ``status`` (HTTP-like).
``retryable`` says whether the same request may succeed later unchanged
(throttles, outages, a busy campaign) or never will (validation, rights).

Three codes are the client's own, for requests no mailer answered:
``connection_failed`` (the NATS server could not be reached or refused the
credentials), ``no_responders`` (nobody serves the subject: mailer is down or
the prefix is wrong) and ``timeout``; all three are retryable.
"""

from __future__ import annotations

__all__ = [
    "ERRORS",
    "AttachmentNotFound",
    "AttachmentTooLarge",
    "AttachmentsTotalTooLarge",
    "BadRequest",
    "CampaignBusy",
    "CampaignSending",
    "ConnectionFailed",
    "DailyLimit",
    "EmptyCampaign",
    "Forbidden",
    "GovernorUnavailable",
    "ImportNotFound",
    "ImportUnreadable",
    "InternalError",
    "InvalidState",
    "MailerError",
    "NoResponders",
    "NotFound",
    "NotScheduled",
    "OutsideHours",
    "PayloadTooLarge",
    "QuotaExhausted",
    "QuotaNotLocal",
    "QuotaSyncFailed",
    "QuotaSyncUnavailable",
    "RatePerHour",
    "RecipientsLimit",
    "RequestTimeout",
    "SenderUnavailable",
    "TestEmailFailed",
    "ThrottleBackendUnavailable",
    "Throttled",
    "TooManyInOneCall",
    "TooManyRecipients",
    "Unauthenticated",
    "UnknownAccount",
    "ValidationError",
    "error_for",
]


class MailerError(Exception):
    """An error reply of the mailer API (or no reply at all: ``NoResponders``, ``RequestTimeout``).

    A code this client does not know (a newer server) is a plain ``MailerError``
    with that code, retryable when its status is 429 or 503.
    """

    code: str = ""
    status: int = 500
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, str] | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, str] = dict(details or {})
        # Instance values differ from the class's only for a code the client does not know.
        self.code = code or type(self).code
        self.status = status if status is not None else type(self).status
        if type(self) is MailerError:
            self.retryable = self.status in (429, 503)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(MailerError):
    code, status = "bad_request", 400


class Unauthenticated(MailerError):
    code, status = "unauthenticated", 401


class Forbidden(MailerError):
    code, status = "forbidden", 403


class NotFound(MailerError):
    code, status = "not_found", 404


class AttachmentNotFound(MailerError):
    code, status = "attachment_not_found", 404


class ImportNotFound(MailerError):
    """recipients.import names no uploaded file (never uploaded, or removed after a day)."""

    code, status = "import_not_found", 404


class ImportUnreadable(MailerError):
    """The uploaded file is not UTF-8, not CSV, or has no email column: nothing was added."""

    code, status = "import_unreadable", 422


class InvalidState(MailerError):
    """The campaign's status does not allow it (``details["status"]``)."""

    code, status = "invalid_state", 409


class CampaignSending(MailerError):
    """Delete of a sending campaign: pause or cancel it first."""

    code, status = "campaign_sending", 409


class CampaignBusy(MailerError):
    """Delete while the campaign's actor finishes its last batch: retry in a minute."""

    code, status, retryable = "campaign_busy", 409, True


class QuotaNotLocal(MailerError):
    """quota.set while the quota comes from the provider (MAILER_QUOTA_PROVIDER=http)."""

    code, status = "quota_not_local", 409


class NotScheduled(MailerError):
    """Unschedule of a campaign that is not waiting for a scheduled start."""

    code, status = "not_scheduled", 409


class PayloadTooLarge(MailerError):
    code, status = "payload_too_large", 413


class ValidationError(MailerError):
    code, status = "validation_error", 422


class TooManyInOneCall(MailerError):
    code, status = "too_many_in_one_call", 422


class TooManyRecipients(MailerError):
    code, status = "too_many_recipients", 422


class RecipientsLimit(MailerError):
    """A recipients.add that would take the campaign over its cap: nothing was added."""

    code, status = "recipients_limit", 422


class EmptyCampaign(MailerError):
    code, status = "empty_campaign", 422


class UnknownAccount(MailerError):
    """The campaign names an SMTP account that is not configured (details: ``field``,
    ``account``, ``accounts``)."""

    code, status = "unknown_account", 422


class AttachmentTooLarge(MailerError):
    code, status = "attachment_too_large", 422


class AttachmentsTotalTooLarge(MailerError):
    code, status = "attachments_total_too_large", 422


class Throttled(MailerError):
    """Too many starts or test emails this hour (``details["retry_at"]``)."""

    code, status, retryable = "throttled", 429, True


class RatePerHour(MailerError):
    code, status, retryable = "rate_per_hour", 429, True


class DailyLimit(MailerError):
    code, status, retryable = "daily_limit", 429, True


class QuotaExhausted(MailerError):
    code, status, retryable = "quota_exhausted", 429, True


class OutsideHours(MailerError):
    code, status, retryable = "outside_hours", 429, True


class InternalError(MailerError):
    code, status = "internal_error", 500


class TestEmailFailed(MailerError):
    __test__ = False  # not a pytest test class, whatever its name
    code, status = "test_email_failed", 502


class QuotaSyncFailed(MailerError):
    code, status, retryable = "quota_sync_failed", 502, True


class ThrottleBackendUnavailable(MailerError):
    code, status, retryable = "throttle_backend_unavailable", 503, True


class GovernorUnavailable(MailerError):
    code, status, retryable = "governor_unavailable", 503, True


class SenderUnavailable(MailerError):
    code, status, retryable = "sender_unavailable", 503, True


class QuotaSyncUnavailable(MailerError):
    code, status, retryable = "quota_sync_unavailable", 503, True


class NoResponders(MailerError):
    """Nobody serves the subject: mailer is not running there, or the prefix is wrong."""

    code, status, retryable = "no_responders", 503, True


class RequestTimeout(MailerError):
    """No reply in time: the request may or may not have been carried out."""

    code, status, retryable = "timeout", 504, True


class ConnectionFailed(MailerError):
    """The NATS server could not be reached in time, or refused the credentials."""

    code, status, retryable = "connection_failed", 503, True


# Every class above by its code: what an error reply's code becomes.
ERRORS: dict[str, type[MailerError]] = {
    cls.code: cls
    for cls in (
        QuotaNotLocal,
        BadRequest,
        Unauthenticated,
        Forbidden,
        NotFound,
        AttachmentNotFound,
        ImportNotFound,
        ImportUnreadable,
        InvalidState,
        CampaignSending,
        CampaignBusy,
        NotScheduled,
        PayloadTooLarge,
        ValidationError,
        TooManyInOneCall,
        TooManyRecipients,
        RecipientsLimit,
        EmptyCampaign,
        UnknownAccount,
        AttachmentTooLarge,
        AttachmentsTotalTooLarge,
        Throttled,
        RatePerHour,
        DailyLimit,
        QuotaExhausted,
        OutsideHours,
        InternalError,
        TestEmailFailed,
        QuotaSyncFailed,
        ThrottleBackendUnavailable,
        GovernorUnavailable,
        SenderUnavailable,
        QuotaSyncUnavailable,
        NoResponders,
        RequestTimeout,
        ConnectionFailed,
    )
}


def error_for(code: str, message: str, details: dict[str, str] | None, status: int) -> MailerError:
    """The exception of an error reply: its code's class, or ``MailerError`` for a new code."""
    cls = ERRORS.get(code)
    if cls is None:
        return MailerError(message, details=details, code=code, status=status)
    return cls(message, details=details, status=status)
