"""Messages on the wire: requests, replies and events of the NATS API.

Every request is decoded strictly: unknown fields and wrong types are errors.
Internal actor messages live beside their actors; these are the public ones
(and the rate governor's, which crosses processes).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "MAX_INVALID_LISTED",
    "ActiveCampaign",
    "AttachmentAdd",
    "AttachmentList",
    "AttachmentRef",
    "AttachmentView",
    "AuditEntry",
    "AuditList",
    "AuditPage",
    "CampaignCreate",
    "CampaignDeleted",
    "CampaignEvent",
    "CampaignList",
    "CampaignPage",
    "CampaignRef",
    "CampaignStart",
    "CampaignUpdate",
    "CampaignView",
    "EmailRef",
    "Empty",
    "ErrorBody",
    "ErrorReply",
    "ImportProgress",
    "InvalidAddress",
    "InvalidLine",
    "ManagerStatus",
    "NotRemoved",
    "Notice",
    "QueueView",
    "QueuedCampaign",
    "QuotaSyncRequest",
    "QuotaView",
    "RecipientIn",
    "RecipientList",
    "RecipientPage",
    "RecipientView",
    "RecipientsAdd",
    "RecipientsAdded",
    "RecipientsImport",
    "RecipientsImported",
    "RecipientsRemove",
    "RecipientsRemoved",
    "ResolveInDoubt",
    "ResolveReply",
    "RetryFailed",
    "RetryReply",
    "RunCampaign",
    "RunReply",
    "RunnerLoad",
    "StartReply",
    "StartWarning",
    "StatusRequest",
    "SuppressionAdd",
    "SuppressionList",
    "SuppressionPage",
    "SuppressionReason",
    "SuppressionRemoved",
    "SuppressionView",
    "TestEmail",
    "TestEmailSent",
    "TokenReply",
    "TokenRequest",
    "TokenReturn",
    "TokenReturned",
    "UnsubscribeAdd",
    "UnsubscribeList",
    "UnsubscribePage",
    "UnsubscribeRemoved",
    "UnsubscribeView",
    "Wake",
    "imports_bucket",
]

# Header-safe single-line text: CR/LF would allow header injection. \A..\Z,
# not ^..$: "$" also matches before a trailing newline, which would let
# "Subject\n" through. NUL is refused everywhere (PostgreSQL text cannot hold it).
_ONE_LINE = r"\A[^\r\n\x00]*\Z"
Line = Annotated[str, Meta(min_length=1, max_length=998, pattern=_ONE_LINE)]
Name = Annotated[str, Meta(max_length=200, pattern=_ONE_LINE)]
Body = Annotated[str, Meta(max_length=1_000_000)]
# A database id (bigint): a larger number is refused before it reaches SQL.
Id = Annotated[int, Meta(ge=1, le=2**63 - 1)]
CampaignName = Annotated[str, Meta(min_length=1, max_length=200, pattern=_ONE_LINE)]
Priority = Annotated[int, Meta(ge=-100, le=100)]
# An SMTP account's name (MAILER_SMTP_ACCOUNTS); whether it is configured is the API's check.
AccountName = Annotated[str, Meta(min_length=1, max_length=64)]
Email = Annotated[str, Meta(min_length=1, max_length=320)]
PageLimit = Annotated[int, Meta(ge=1, le=500)]
UserId = Annotated[str, Meta(min_length=1, max_length=200, pattern=_ONE_LINE)]
CampaignStatus = Literal[
    "draft", "ready", "sending", "paused", "sent", "completed_with_errors", "cancelled"
]
RecipientStatus = Literal[
    "pending",
    "sending",
    "sent",
    "failed",
    "unsubscribed",
    "in_doubt",
    "bounced",
    "complained",
    "suppressed",
]


class _Strict(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class CampaignCreate(_Strict):
    name: CampaignName
    subject: Line
    body_text: Body | None = None
    body_html: Body | None = None
    priority: Priority = 0
    # The SMTP account it goes through (null: the default) and the one used
    # while that account's circuit breaker is open (null: none).
    account: AccountName | None = None
    backup_account: AccountName | None = None


class CampaignRef(_Strict):
    campaign_id: Id


class CampaignStart(_Strict):
    """``send_at``: start then instead of now (RFC 3339 with an offset; a time
    not in the future starts now)."""

    campaign_id: Id
    send_at: datetime | None = None


class RetryFailed(_Strict):
    """``permanent``: also the recipients that failed permanently (5xx)."""

    campaign_id: Id
    permanent: bool = False


class RetryReply(Struct, kw_only=True):
    campaign: CampaignView
    requeued: int


class ResolveInDoubt(_Strict):
    """An operator's decision on in-doubt recipients (admin only)."""

    campaign_id: Id
    recipient_ids: Annotated[list[Id], Meta(min_length=1, max_length=5000)]
    to: Literal["sent", "failed", "retry"]
    note: Annotated[str, Meta(max_length=300, pattern=_ONE_LINE)] = ""


class ResolveReply(Struct, kw_only=True):
    campaign: CampaignView
    resolved: list[int]  # the recipients that were in doubt and now are not
    warning: str | None = None  # for "retry": it may send a message twice


class RecipientIn(_Strict):
    email: Annotated[str, Meta(min_length=1, max_length=320)]
    name: Name | None = None
    variables: dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=2000)]] = (
        msgspec.field(default_factory=dict)
    )


class RecipientsAdd(_Strict):
    campaign_id: Id
    recipients: list[RecipientIn]


class InvalidAddress(Struct, kw_only=True):
    email: str
    reason: str


class RecipientsAdded(Struct, kw_only=True):
    added: int
    duplicates: int
    invalid: list[InvalidAddress]


def imports_bucket(prefix: str) -> str:
    """The JetStream Object Store bucket ``recipients.import`` reads uploads from."""
    return "mailer_imports_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in prefix)


#: Invalid lines an import's reply lists (all are counted in ``invalid_count``).
MAX_INVALID_LISTED = 1000


class RecipientsImport(_Strict):
    campaign_id: Id
    # The uploaded file's name in the imports bucket (imports_bucket(prefix)).
    object: Annotated[str, Meta(min_length=1, max_length=255)]
    format: Literal["csv", "jsonl"] = "csv"


class InvalidLine(Struct, kw_only=True):
    line: int
    email: str
    reason: str


class RecipientsImported(Struct, kw_only=True):
    lines: int  # recipient lines read (a CSV's header and blank lines not counted)
    added: int
    duplicates: int  # of the file's own lines, or of recipients already in the campaign
    invalid_count: int
    invalid: list[InvalidLine]  # the first MAX_INVALID_LISTED


class ImportProgress(Struct, kw_only=True):
    """``<prefix>.import.progress.<campaign_id>`` (core NATS, not stored), while an import runs."""

    campaign_id: int
    object: str
    stage: Literal["reading", "writing", "done", "failed"]
    lines: int
    invalid: int
    added: int = 0


class QueueView(Struct, kw_only=True):
    priority: int
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    defer_reason: str | None
    deferred_until: datetime | None
    consecutive_transient_errors: int
    # The SMTP account whose limit or breaker the wait is for (null: none named).
    defer_account: str | None = None


class CampaignView(Struct, kw_only=True):
    id: int
    owner_id: str
    name: str
    subject: str
    status: str
    priority: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    counts: dict[str, int]
    queue: QueueView | None = None
    # The SMTP account (null: the default) and the backup (null: none).
    account: str | None = None
    backup_account: str | None = None
    # The forecast (mailer.forecast): its first message, for a campaign that
    # has not sent yet; its last; and why the last cannot be known when null
    # (quota_exhausted, paused, draft, unknown). Null on finished campaigns.
    estimated_start_at: datetime | None = None
    estimated_completion_at: datetime | None = None
    estimate_reason: str | None = None


class StartWarning(Struct, kw_only=True):
    """Something the manager should know about an accepted start."""

    code: str
    message: str


class StartReply(Struct, kw_only=True):
    campaign: CampaignView
    warnings: list[StartWarning]


class ErrorBody(Struct, kw_only=True):
    code: str
    message: str
    details: dict[str, str] | None = None


class ErrorReply(Struct, kw_only=True):
    error: ErrorBody


class TokenRequest(_Strict):
    """A campaign asks the rate governor for up to ``want`` send tokens."""

    campaign_id: int
    owner_id: str
    want: Annotated[int, Meta(ge=1, le=10_000)]
    kind: Literal["campaign", "test"] = "campaign"
    # The SMTP account whose limits apply (its key: '' the default's; mailer.accounts).
    account: str = ""


class TokenReply(Struct, kw_only=True):
    granted: int
    # The name of the SMTP account whose limits decided (the reason texts say it).
    account: str = ""
    reason: str | None = None
    retry_at: datetime | None = None
    used: int = 0
    limit: int = 0
    # The owner's sends of the local day and their daily limit (0: none): the
    # {sent}/{limit} of the ``daily_limit`` text in mailer/texts.py.
    daily_sent: int = 0
    daily_limit: int = 0
    # The window of a grant, decided on the governor's clock: the hour it is
    # counted in (its start, UTC), the owner's local day, when the governor
    # decided, and until when the tokens may be used — the end of that hour,
    # of that day or of working hours, whichever is first. A token not handed
    # to SMTP before ``valid_until`` is never used (it stays spent).
    hour_start: datetime | None = None
    day: date | None = None
    decided_at: datetime | None = None
    valid_until: datetime | None = None

    def usable_until(self, asked_at: datetime) -> datetime | None:
        """Until when, on the asker's clock, the granted tokens may be handed to SMTP.

        ``valid_until`` is on the governor's clock. What was left of it when the
        governor decided, counted from ``asked_at`` (the asker's clock before it
        asked), ends no later on the asker's clock: so whichever of the two
        comes first is used, and a skew between pods can only shorten a grant.
        None: no limit (a governor that does not say).
        """
        if self.valid_until is None:
            return None
        if self.decided_at is None:
            return self.valid_until
        return min(self.valid_until, asked_at + (self.valid_until - self.decided_at))


class TokenReturn(_Strict):
    """The quota of granted tokens that never reached SMTP (a stop, a pause, an
    unused prefetch, a grant that ran out), given back to the monthly allowance.

    Only the quota: it has no window, so a token burned there would keep a
    campaign "waiting for the quota" until the next sync while the quota is not
    used up. The hour's and the day's tokens stay spent (better to under-send):
    they come back with their window, which the wait then names. ``decided_at``
    is the grant's (``TokenReply.decided_at``): nothing goes back when a sync
    ran since then, because a sync counts unsent grants as unspent already.
    """

    campaign_id: int
    count: Annotated[int, Meta(ge=1, le=10_000)]
    decided_at: datetime
    account: str = ""


class TokenReturned(Struct, kw_only=True):
    returned: int  # 0: a sync ran since the grant (it counted them already)


class RunCampaign(Struct, kw_only=True):
    """The leader asks a process (the least loaded, else the runners' queue
    group) to run a campaign: its home (``shard`` 0, to be worked in
    ``shards`` shards) or its helper shard ``shard``."""

    campaign_id: int
    fence: int
    shard: int = 0
    shards: int = 1


class RunReply(Struct, kw_only=True):
    started: bool
    runner: str


class Wake(Struct, kw_only=True):
    """Tells every scheduler that the queue changed (a start, a resume), or
    (``ended``) that campaign ``campaign_id``'s actor (of ``shard``) ended:
    its slot is free."""

    campaign_id: int | None = None
    ended: bool = False
    shard: int = 0


class RunnerLoad(Struct, kw_only=True):
    """A runner's answer to the leader's roll call: its instance and how many
    campaign actors (homes and shards) it runs now."""

    runner: str
    campaigns: int


class CampaignEvent(Struct, kw_only=True):
    event: str
    campaign_id: int
    owner_id: str
    status: str
    at: datetime
    counts: dict[str, int] | None = None
    defer_reason: str | None = None
    deferred_until: datetime | None = None
    # Values a reason's text needs (e.g. daily sent/limit), as strings.
    details: dict[str, str] | None = None


class Notice(Struct, frozen=True, kw_only=True):
    """An event ready to publish later, as the outbox stores it: an owner
    notification is written in the transaction of the deferral that calls for
    it, so a crash or an outage between the two cannot lose it."""

    kind: str  # campaign | notify | unsubscribe (the events' metric label)
    subject: str
    msg_id: str  # Nats-Msg-Id: a repeated publish is stored once
    payload: bytes
    campaign_id: int | None = None


# --- the public API: campaigns ---------------------------------------------------------


class CampaignUpdate(_Strict):
    """Changes the given fields; an absent field is left as it is (null clears a body)."""

    campaign_id: Id
    name: CampaignName | msgspec.UnsetType = msgspec.UNSET
    subject: Line | msgspec.UnsetType = msgspec.UNSET
    body_text: Body | msgspec.UnsetType | None = msgspec.UNSET
    body_html: Body | msgspec.UnsetType | None = msgspec.UNSET
    priority: Priority | msgspec.UnsetType = msgspec.UNSET
    account: AccountName | msgspec.UnsetType | None = msgspec.UNSET
    backup_account: AccountName | msgspec.UnsetType | None = msgspec.UNSET


class CampaignList(_Strict):
    """Newest first. ``cursor`` is the ``next_cursor`` of the previous page."""

    owner_id: UserId | None = None
    status: Annotated[list[CampaignStatus], Meta(max_length=7)] = msgspec.field(
        default_factory=list
    )
    limit: PageLimit = 50
    cursor: Id | None = None


class CampaignPage(Struct, kw_only=True):
    items: list[CampaignView]
    next_cursor: int | None


class CampaignDeleted(Struct, kw_only=True):
    campaign_id: int
    deleted: bool


class TestEmail(_Strict):
    """Sends the campaign's message once to ``email`` (through the rate governor)."""

    campaign_id: Id
    email: Email
    name: Name | None = None
    variables: dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=2000)]] = (
        msgspec.field(default_factory=dict)
    )


class TestEmailSent(Struct, kw_only=True):
    email: str
    status: str
    smtp_message_id: str | None
    provider_answer: str | None
    took_ms: float
    send_log_id: int


# --- recipients and attachments -----------------------------------------------------------


class RecipientList(_Strict):
    """In id order. ``cursor`` is the ``next_cursor`` of the previous page."""

    campaign_id: Id
    status: RecipientStatus | None = None
    limit: PageLimit = 100
    cursor: Id | None = None


class RecipientView(Struct, kw_only=True):
    id: int
    email: str
    name: str | None
    variables: dict[str, str]
    status: str
    error: str | None
    smtp_message_id: str | None
    sent_at: datetime | None
    updated_at: datetime


class RecipientPage(Struct, kw_only=True):
    items: list[RecipientView]
    next_cursor: int | None


class RecipientsRemove(_Strict):
    campaign_id: Id
    emails: Annotated[list[Email], Meta(min_length=1, max_length=5000)]


class NotRemoved(Struct, kw_only=True):
    email: str
    # not_found | not_pending (already sent, failed, in progress: kept for the record)
    reason: str


class RecipientsRemoved(Struct, kw_only=True):
    removed: int
    not_removed: list[NotRemoved]


class AttachmentAdd(_Strict):
    """``content`` is base64 in JSON (standard alphabet, padded)."""

    campaign_id: Id
    filename: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"\A[^\r\n\x00/\\]+\Z")]
    content_type: Annotated[
        str,
        Meta(
            max_length=255,
            pattern=r"\A[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*\Z",
        ),
    ]
    content: bytes


class AttachmentRef(_Strict):
    campaign_id: Id
    attachment_id: Id


class AttachmentView(Struct, kw_only=True):
    id: int
    campaign_id: int
    filename: str
    content_type: str
    size: int
    created_at: datetime


class AttachmentList(Struct, kw_only=True):
    items: list[AttachmentView]
    total_size: int


# --- unsubscribes, quota, audit -----------------------------------------------------------


class EmailRef(_Strict):
    email: Email


class UnsubscribeAdd(_Strict):
    email: Email
    source: Annotated[str, Meta(min_length=1, max_length=100, pattern=_ONE_LINE)] = "api"


class UnsubscribeView(Struct, kw_only=True):
    email: str
    unsubscribed: bool
    source: str | None = None
    created_at: datetime | None = None


class UnsubscribeRemoved(Struct, kw_only=True):
    email: str
    removed: bool


class UnsubscribeList(_Strict):
    """In address order. ``cursor`` is the ``next_cursor`` of the previous page."""

    limit: PageLimit = 100
    cursor: Email | None = None


class UnsubscribePage(Struct, kw_only=True):
    items: list[UnsubscribeView]
    next_cursor: str | None


SuppressionReason = Literal["unsubscribed", "hard_bounce", "complaint", "soft_bounce", "manual"]


class SuppressionAdd(_Strict):
    """An admin's entry (reason ``manual``); ``detail``: why, for the record."""

    email: Email
    detail: Annotated[str, Meta(max_length=300, pattern=_ONE_LINE)] = ""


class SuppressionView(Struct, kw_only=True):
    email: str
    suppressed: bool
    reason: str | None = None
    source: str | None = None
    campaign_id: int | None = None
    detail: str | None = None
    created_at: datetime | None = None


class SuppressionRemoved(Struct, kw_only=True):
    email: str
    removed: bool
    reason: str | None = None  # what it was listed for


class SuppressionList(_Strict):
    """In address order; ``reason`` filters; ``cursor`` is the previous ``next_cursor``."""

    limit: PageLimit = 100
    cursor: Email | None = None
    reason: SuppressionReason | None = None


class SuppressionPage(Struct, kw_only=True):
    items: list[SuppressionView]
    next_cursor: str | None


class Empty(_Strict):
    """A request without fields: ``{}``."""


class QuotaRef(_Strict):
    """``quota.get`` / ``quota.sync``: an SMTP account's quota (null: the default's)."""

    account: AccountName | None = None


class QuotaView(Struct, kw_only=True):
    emails_available: int
    # What the provider reports (the local one: MAILER_MONTHLY_QUOTA or the
    # last quota.set); null when the provider does not say.
    monthly_limit: int | None
    last_synced_at: datetime | None
    sync_error: str | None
    # The SMTP account whose quota this is (its name; mailer.accounts).
    account: str = ""


class QuotaSet(_Strict):
    """Sets the local provider's monthly allowance (admin); applied at once."""

    monthly_limit: Annotated[int, Meta(ge=0, le=1_000_000_000)]
    # The SMTP account whose quota is set (null: the default's).
    account: AccountName | None = None


class LimitsReloaded(Struct, kw_only=True):
    """``limits.reload``: the deferrals ended now, to be decided again."""

    reevaluated: int


class QuotaSyncRequest(Struct, kw_only=True):
    """What the API asks the quota syncer (``<prefix>.internal.quota.sync``)."""

    requested_by: str


class AuditList(_Strict):
    """In time order. ``cursor`` is the ``next_cursor`` of the previous page."""

    campaign_id: Id
    limit: PageLimit = 100
    cursor: Id | None = None


class AuditEntry(Struct, kw_only=True):
    id: int
    at: datetime
    actor_id: str
    action: str
    campaign_id: int | None
    details: dict[str, object]


class AuditPage(Struct, kw_only=True):
    items: list[AuditEntry]
    next_cursor: int | None


# --- the manager's view ---------------------------------------------------------------------


class StatusRequest(_Strict):
    """The acting user's view; an admin may ask for another ``owner_id``."""

    owner_id: UserId | None = None


class ActiveCampaign(Struct, kw_only=True):
    id: int
    name: str
    status: str
    counts: dict[str, int]
    started_at: datetime | None
    # The forecast, as on CampaignView.
    estimated_start_at: datetime | None = None
    estimated_completion_at: datetime | None = None
    estimate_reason: str | None = None


class QueuedCampaign(Struct, kw_only=True):
    id: int
    name: str
    status: str
    priority: int
    queued_at: datetime
    defer_reason: str | None
    deferred_until: datetime | None
    # The forecast, as on CampaignView.
    estimated_start_at: datetime | None = None
    estimated_completion_at: datetime | None = None
    estimate_reason: str | None = None
    # With several SMTP accounts: the account it goes through (its own, or the
    # default's name) and the one whose limit or breaker its wait is for.
    account: str | None = None
    defer_account: str | None = None


class ManagerStatus(Struct, kw_only=True):
    owner_id: str
    active_campaign: ActiveCampaign | None
    # The owner's other campaigns waiting in the queue (ready or deferred), and paused.
    queued_count: int
    paused_count: int
    # When the next of them may start: its deferral's end; null when it only waits its turn.
    next_campaign_at: datetime | None
    # Why the active campaign waits (null while it sends), its human text, and until when.
    reason_code: str | None
    reason: str | None
    next_run_at: datetime | None
    queue: list[QueuedCampaign]
