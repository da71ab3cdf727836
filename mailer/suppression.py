"""The suppression list: addresses no campaign may mail, and why.

It is the unsubscribe table generalized (migration 0011): each row has the
address, a ``reason`` (``unsubscribed``, ``hard_bounce``, ``complaint``,
``soft_bounce``, ``manual``), a ``source`` (the link, the API, ``dsn``,
``arf``, ``other`` for a non-standard bounce, ``webhook``), the campaign that
caused it and when. The claim query settles a listed address in every later
campaign: ``unsubscribed`` for an unsubscribe, ``suppressed`` (its reason in
the recipient's ``error``) for the rest.

``PgSuppressions.report`` applies one verified report, in one transaction:

- a hard bounce or complaint turns its recipient ``bounced``/``complained``
  (only a message that left: ``sent`` or ``in_doubt``; a complaint also after
  a bounce), lists the address, audits and stores a suppression event in the
  event outbox;
- a soft bounce is counted; the ``soft_bounce_limit``-th within the window
  lists the address (reason ``soft_bounce``); the recipient stays ``sent``.

A second report about an address already listed changes the recipient but not
the list (the first reason stays) and emits nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import msgspec
from prometheus_client import Counter

from mailer.bounces.parse import Kind
from mailer.db import Q
from mailer.events import SuppressionEvent
from mailer.logs import email_fields
from mailer.messages import Notice
from mailer.outbox import store_notice

__all__ = [
    "BOUNCE_REPORTS",
    "SUPPRESSIONS",
    "Applied",
    "PgSuppressions",
    "SuppressionRow",
]

log = logging.getLogger("mailer.bounces")

Reason = Literal["unsubscribed", "hard_bounce", "complaint", "soft_bounce", "manual"]

BOUNCE_REPORTS: Final = Counter(
    "mailer_bounce_reports_total",
    "Inbound bounce and complaint reports by kind (hard, soft, complaint, ignored,"
    " unverified: no valid bounce address, unknown: recipient gone) and source.",
    ["kind", "source"],
)
SUPPRESSIONS: Final = Counter(
    "mailer_suppressions_total",
    "Addresses newly added to the suppression list, by reason.",
    ["reason"],
)
for _kind in ("hard", "soft", "complaint", "ignored", "unverified", "unknown"):
    for _source in ("smtp", "imap", "webhook"):
        BOUNCE_REPORTS.labels(kind=_kind, source=_source)
for _reason in ("hard_bounce", "complaint", "soft_bounce", "manual"):
    SUPPRESSIONS.labels(reason=_reason)

_REASON: Final[dict[Kind, Reason]] = {
    "hard": "hard_bounce",
    "complaint": "complaint",
    "soft": "soft_bounce",
}
_STATUS: Final[dict[Kind, str]] = {"hard": "bounced", "complaint": "complained"}


class SuppressionRow(msgspec.Struct, kw_only=True):
    email: str
    reason: str
    source: str
    campaign_id: int | None
    detail: str | None
    created_at: datetime


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    """What one report changed."""

    found: bool  # the recipient exists
    recipient_status: str | None = None  # its new status, if it changed
    suppressed: bool = False  # the address was newly listed
    soft_count: int = 0  # soft bounces in the window (soft reports only)


NoticeMaker = Callable[[SuppressionEvent], Notice]


class PgSuppressions:
    """The suppression list and the soft-bounce counts on an asyncpg pool."""

    def __init__(
        self,
        pool: Any,
        *,
        notice: NoticeMaker | None = None,
        soft_limit: int = 3,
        soft_window: timedelta = timedelta(days=7),
    ) -> None:
        self._pool = pool
        self._notice = notice
        self._soft_limit = soft_limit
        self._soft_window = soft_window

    async def report(
        self, recipient_id: int, kind: Kind, *, source: str, detail: str, now: datetime
    ) -> Applied:
        async with self._pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(Q["suppression-recipient"], recipient_id)
            if r is None:
                return Applied(found=False)
            campaign_id, email = r["campaign_id"], r["email"]
            status: str | None = None
            soft_count = 0
            if kind == "soft":
                await conn.execute(Q["suppression-soft-lock"], email)
                soft_count = int(
                    await conn.fetchval(
                        Q["suppression-soft-insert"],
                        email,
                        campaign_id,
                        recipient_id,
                        detail,
                        now,
                        now - self._soft_window,
                    )
                )
                if soft_count < self._soft_limit:
                    return Applied(found=True, soft_count=soft_count)
            else:
                new_status = _STATUS[kind]
                error = f"{new_status} ({source}): {detail}"[:1000]
                if await conn.fetchval(
                    Q["suppression-settle-recipient"], recipient_id, new_status, error, now
                ):
                    status = new_status
            suppressed = await self._add(
                conn,
                email,
                _REASON[kind],
                source=source,
                campaign_id=campaign_id,
                recipient_id=recipient_id,
                detail=detail,
                actor_id="bounce",
                now=now,
            )
        return Applied(
            found=True, recipient_status=status, suppressed=suppressed, soft_count=soft_count
        )

    async def add(
        self, email: str, *, reason: Reason, detail: str, actor_id: str, now: datetime
    ) -> bool:
        """An admin's entry; False when the address was already listed."""
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._add(
                conn,
                email,
                reason,
                source="api",
                campaign_id=None,
                recipient_id=None,
                detail=detail,
                actor_id=actor_id,
                now=now,
            )

    async def _add(
        self,
        conn: Any,
        email: str,
        reason: Reason,
        *,
        source: str,
        campaign_id: int | None,
        recipient_id: int | None,
        detail: str,
        actor_id: str,
        now: datetime,
    ) -> bool:
        created = await conn.fetchval(
            Q["suppression-insert"], email, source, now, reason, campaign_id, detail or None
        )
        if created is None:
            return False
        fields = email_fields(email)
        await conn.execute(
            Q["suppression-audit"],
            now,
            actor_id,
            "suppression.add",
            campaign_id,
            {
                "email_hash": fields["email_hash"],
                "reason": reason,
                "source": source,
                "recipient_id": recipient_id,
            },
        )
        if self._notice is not None:
            n = self._notice(
                SuppressionEvent(
                    email=email.lower(),
                    email_hash=fields["email_hash"],
                    email_domain=fields["email_domain"],
                    reason=reason,
                    source=source,
                    campaign_id=campaign_id,
                    recipient_id=recipient_id,
                    detail=detail,
                    at=now,
                )
            )
            await store_notice(conn, n, now)
        SUPPRESSIONS.labels(reason=reason).inc()
        log.info(
            "address suppressed",
            extra={"campaign_id": campaign_id, "reason": reason, "source": source, **fields},
        )
        return True

    async def remove(self, email: str, *, actor_id: str, now: datetime) -> str | None:
        """Removes the address (and its soft bounces); its former reason, or None."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q["suppression-delete"], email)
            if row is None:
                return None
            await conn.execute(
                Q["suppression-audit"],
                now,
                actor_id,
                "suppression.remove",
                None,
                {"email_hash": email_fields(email)["email_hash"], "reason": row["reason"]},
            )
            return str(row["reason"])

    async def get(self, email: str) -> SuppressionRow | None:
        row = await self._pool.fetchrow(Q["suppression-get"], email)
        return None if row is None else SuppressionRow(**dict(row))

    async def list(
        self, *, cursor: str | None, reason: str | None, limit: int
    ) -> list[SuppressionRow]:
        rows = await self._pool.fetch(Q["suppression-list"], cursor, reason, limit)
        return [SuppressionRow(**dict(r)) for r in rows]
