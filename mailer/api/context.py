"""What every operation of the API works with: the caller, its parts, shared checks."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal, Protocol

import msgspec

from mailer import addresses
from mailer.actors.campaign import Mail
from mailer.apistore import ApiStore
from mailer.bus import LANG_HEADER, ROLES_HEADER, USER_HEADER, Bus
from mailer.clock import Clock
from mailer.config import Settings
from mailer.dkim import dkim_signer
from mailer.errors import Forbidden, NotFound, Unauthenticated, ValidationFailed
from mailer.messages import CampaignEvent, CampaignView, TokenReply
from mailer.render import Attachment, MessageTemplate
from mailer.render import check_attachment as _renderable_attachment
from mailer.rules import DailyLimits, WorkingHours
from mailer.store import PgStore
from mailer.texts import Lang
from mailer.throttle import Throttle
from mailer.transport import SendResult

__all__ = [
    "EDITABLE",
    "ApiContext",
    "Caller",
    "DailyCounter",
    "EventSink",
    "TestMailer",
    "TestTokens",
    "caller_from",
    "check_address",
    "check_attachment",
    "check_message",
    "lang_of",
    "require_admin",
    "require_owner",
]

log = logging.getLogger("mailer.api")

# Statuses in which a campaign's content (fields, recipients, attachments) may
# change: not while it sends, and not once it is over.
EDITABLE = ("draft", "ready", "paused")

ADMIN_ROLE = "admin"
# The template language's placeholder (mailer.render): not allowed in a subject.
_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][A-Za-z0-9_.\-]*\s*\}\}")
_MAX_USER_ID = 200


class Caller(msgspec.Struct, frozen=True):
    """Who acts (``Mailer-User``), with which roles, and the language of the replies."""

    user: str
    roles: frozenset[str]
    lang: Lang

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


def lang_of(headers: Mapping[str, str]) -> Lang:
    """``Mailer-Lang: en`` (or en-US, EN...) gives English; anything else Russian."""
    return "en" if headers.get(LANG_HEADER, "").strip().lower().startswith("en") else "ru"


def caller_from(headers: Mapping[str, str]) -> Caller:
    user = headers.get(USER_HEADER, "").strip()
    # The id lands in the database, the audit log and Redis keys: one printable line.
    if not user or len(user) > _MAX_USER_ID or not user.isprintable():
        raise Unauthenticated()
    roles = frozenset(r.strip() for r in headers.get(ROLES_HEADER, "").split(",") if r.strip())
    return Caller(user=user, roles=roles, lang=lang_of(headers))


def require_owner(caller: Caller, owner_id: str) -> None:
    if owner_id != caller.user and not caller.is_admin:
        raise Forbidden()


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise Forbidden(text_key="forbidden_admin")


# Unicode's category Cc is exactly these two ranges (C0 and C1 controls, DEL).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_address(email: str) -> str | None:
    """Why an address cannot be used, or None. Stricter than ``addresses.validate``
    in one respect: control characters, which no real address holds and which
    the renderer would refuse at send time, are refused now."""
    if _CONTROL.search(email):
        return "control characters"
    return addresses.validate(email)


def check_message(
    settings: Settings,
    *,
    subject: str,
    body_text: str | None,
    body_html: str | None,
    attachments: Sequence[Attachment] = (),
) -> None:
    """Refuses now what the renderer would refuse at send time, for every recipient.

    Building the template is the one definition of "renderable" (subject
    placeholders, header injection, bodies, attachments); the campaign actor
    builds the same one before it sends.
    """
    if body_text is None and body_html is None:
        raise ValidationFailed("validation_error", text_key="body_required")
    try:
        _template(settings, subject, body_text, body_html, attachments)
    except ValueError as exc:
        if _PLACEHOLDER.search(subject):
            raise ValidationFailed("validation_error", text_key="subject_placeholders") from None
        raise ValidationFailed(detail=str(exc)) from None


def check_attachment(filename: str, content_type: str) -> None:
    """Refuses an attachment the renderer would refuse (``render.check_attachment``)."""
    try:
        _renderable_attachment(filename, content_type)
    except ValueError as exc:
        raise ValidationFailed(detail=f"attachment {filename!r}: {exc}") from None


def _template(
    settings: Settings,
    subject: str,
    body_text: str | None,
    body_html: str | None,
    attachments: Sequence[Attachment] = (),
) -> MessageTemplate:
    return MessageTemplate(
        from_email=settings.from_email,
        from_name=settings.from_name,
        subject=subject,
        text=body_text,
        html=body_html,
        message_id_domain=settings.effective_message_id_domain,
        attachments=attachments,
        dkim=dkim_signer(settings),
    )


class EventSink(Protocol):
    async def emit(self, event: CampaignEvent) -> None:
        """Publishes a campaign lifecycle event (``<prefix>.events.campaign.<event>``)."""
        ...


class TestTokens(Protocol):
    """The rate governor, asked over NATS (``NatsTokenSource``)."""

    async def request_tokens(
        self,
        campaign_id: int,
        owner_id: str,
        want: int,
        *,
        kind: Literal["campaign", "test"] = "campaign",
    ) -> TokenReply: ...


class TestMailer(Protocol):
    """The SMTP sender actor (``ActorMailer``): results in the order of the mails."""

    async def send_all(
        self, mails: Sequence[Mail], *, not_after: datetime | None = None
    ) -> list[SendResult]: ...


class DailyCounter(Protocol):
    """How many emails an owner sent on a local day, and the account this
    hour (the send limiter's counters)."""

    async def day_used(self, owner_id: str, day: date) -> int: ...

    async def hour_used(self, now: datetime) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiContext:
    bus: Bus
    store: PgStore
    db: ApiStore
    clock: Clock
    settings: Settings
    hours: WorkingHours
    daily_limits: DailyLimits
    daily_counter: DailyCounter | None
    start_throttle: Throttle
    test_throttle: Throttle
    tokens: TestTokens
    mailer: TestMailer
    events: EventSink
    # Each SMTP account's hour counter by name, with several accounts (the forecast).
    hour_counters: Mapping[str, DailyCounter] = field(default_factory=dict)

    async def own(self, caller: Caller, campaign_id: int) -> CampaignView:
        """The campaign, if the caller owns it (or is an admin)."""
        view = await self.store.view(campaign_id)
        if view is None:
            raise NotFound(campaign_id=campaign_id)
        require_owner(caller, view.owner_id)
        return view

    async def emit(
        self, event: str, *, campaign_id: int, owner_id: str, status: str, at: datetime
    ) -> None:
        try:
            await self.events.emit(
                CampaignEvent(
                    event=event, campaign_id=campaign_id, owner_id=owner_id, status=status, at=at
                )
            )
        except Exception:  # an event is a notice; the database already holds the truth
            log.warning("event not published", extra={"campaign_id": campaign_id, "event": event})
