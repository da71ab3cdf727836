"""Messages on the wire: requests, replies and events of the NATS API.

Every request is decoded strictly: unknown fields and wrong types are errors.
Internal actor messages live beside their actors; these are the public ones
(and the rate governor's, which crosses processes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "CampaignCreate",
    "CampaignEvent",
    "CampaignRef",
    "CampaignView",
    "ErrorBody",
    "ErrorReply",
    "InvalidAddress",
    "QueueView",
    "RecipientIn",
    "RecipientsAdd",
    "RecipientsAdded",
    "StartReply",
    "TokenReply",
    "TokenRequest",
    "Wake",
]

# Header-safe single-line text: CR/LF would allow header injection.
Line = Annotated[str, Meta(min_length=1, max_length=998, pattern=r"^[^\r\n]*$")]
Name = Annotated[str, Meta(max_length=200, pattern=r"^[^\r\n]*$")]
Body = Annotated[str, Meta(max_length=1_000_000)]


class _Strict(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class CampaignCreate(_Strict):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    subject: Line
    body_text: Body | None = None
    body_html: Body | None = None
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0


class CampaignRef(_Strict):
    campaign_id: Annotated[int, Meta(ge=1)]


class RecipientIn(_Strict):
    email: Annotated[str, Meta(min_length=1, max_length=320)]
    name: Name | None = None
    variables: dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=2000)]] = (
        msgspec.field(default_factory=dict)
    )


class RecipientsAdd(_Strict):
    campaign_id: Annotated[int, Meta(ge=1)]
    recipients: list[RecipientIn]


class InvalidAddress(Struct, kw_only=True):
    email: str
    reason: str


class RecipientsAdded(Struct, kw_only=True):
    added: int
    duplicates: int
    invalid: list[InvalidAddress]


class QueueView(Struct, kw_only=True):
    priority: int
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    defer_reason: str | None
    deferred_until: datetime | None
    consecutive_transient_errors: int


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


class StartReply(Struct, kw_only=True):
    campaign: CampaignView
    warnings: list[str]


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


class TokenReply(Struct, kw_only=True):
    granted: int
    reason: str | None = None
    retry_at: datetime | None = None
    used: int = 0
    limit: int = 0


class Wake(Struct, kw_only=True):
    """Tells every scheduler that the queue changed (a start, a resume)."""

    campaign_id: int | None = None


class CampaignEvent(Struct, kw_only=True):
    event: str
    campaign_id: int
    owner_id: str
    status: str
    at: datetime
    counts: dict[str, int] | None = None
    defer_reason: str | None = None
    deferred_until: datetime | None = None
