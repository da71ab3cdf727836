"""The asyncpg adapter for what only the public API reads and writes.

Queries are the ``api-*`` statements of ``mailer/queries/api.sql``. The
engine's own store (``mailer.store.PgStore``) keeps creating, viewing and
queueing campaigns; this one adds the manager's operations around them.

A state change of one campaign runs through ``ApiStore.locked``: one
transaction that locks the queue entry and then the campaign row (the order
the engine uses, see api.sql), runs the caller's function on the locked
state, and commits only if that function returns. An exception inside rolls
everything back, so a refused request never leaves a partial write. A
deadlock with the engine (possible where the engine takes the two locks the
other way round) is retried a few times: the loser's work is rolled back
whole, so running it again is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from mailer.db import Q
from mailer.forecast import Entry
from mailer.messages import (
    AttachmentView,
    AuditEntry,
    CampaignView,
    QuotaView,
    RecipientView,
    UnsubscribeView,
)
from mailer.store import CampaignRow, campaign_view, forecast_queue

__all__ = ["ApiStore", "Locked", "OwnerQueueRow"]

T = TypeVar("T")

_DEADLOCK_RETRIES = 3


class OwnerQueueRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    name: str
    status: str
    priority: int
    queued_at: datetime
    started_at: datetime | None
    defer_reason: str | None
    deferred_until: datetime | None
    # Whose limit or breaker the wait is for, and the campaign's own account.
    defer_account: str | None = None
    smtp_account: str | None = None


class Locked:
    """One campaign, locked for the length of a transaction, and what may change it."""

    def __init__(
        self,
        conn: asyncpg.Connection | PoolConnectionProxy,
        campaign: CampaignRow | None,
        lease_until: datetime | None,
    ) -> None:
        self._conn = conn
        self.campaign = campaign
        # Until when a campaign actor holds the campaign (None: nobody does).
        self.lease_until = lease_until

    def _id(self) -> int:
        assert self.campaign is not None, "no campaign locked"
        return self.campaign.id

    async def set_status(self, status: str, now: datetime) -> None:
        await self._conn.execute(Q["api-campaign-set-status"], self._id(), status, now)

    async def update(
        self,
        *,
        name: str,
        subject: str,
        body_text: str | None,
        body_html: str | None,
        priority: int,
        now: datetime,
        account: str | None = None,
        backup_account: str | None = None,
    ) -> None:
        cid = self._id()
        await self._conn.execute(
            Q["api-campaign-update"],
            cid,
            name,
            subject,
            body_text,
            body_html,
            priority,
            now,
            account,
            backup_account,
        )
        await self._conn.execute(Q["api-queue-set-priority"], cid, priority)

    async def pause_queue(self) -> None:
        await self._conn.execute(Q["api-queue-pause"], self._id())

    async def resume_queue(self) -> None:
        await self._conn.execute(Q["api-queue-resume"], self._id())

    async def retry_failed(self, *, permanent: bool, now: datetime) -> list[int]:
        rows = await self._conn.fetch(Q["retry-failed"], self._id(), permanent, now)
        return [int(r["id"]) for r in rows]

    async def resolve_in_doubt(
        self, ids: Sequence[int], to: str, *, error: str, now: datetime
    ) -> list[int]:
        rows = await self._conn.fetch(
            Q["retry-resolve-in-doubt"], self._id(), list(ids), to, error, now
        )
        return [int(r["id"]) for r in rows]

    async def reopen(self, now: datetime) -> bool:
        """A finished campaign back to ready and into the queue; False if not finished."""
        return bool(await self._conn.fetchval(Q["retry-reopen-campaign"], self._id(), now))

    async def refinish(self, now: datetime) -> str | None:
        """A finished campaign's status from its recipients; None if it is not finished."""
        status: str | None = await self._conn.fetchval(
            Q["retry-refinish-campaign"], self._id(), now
        )
        return status

    async def unschedule_queue(self, now: datetime) -> datetime | None:
        """Removes a still-waiting scheduled entry; the time it had, or None."""
        at: datetime | None = await self._conn.fetchval(Q["api-queue-unschedule"], self._id(), now)
        return at

    async def cancel_queue(self, now: datetime) -> None:
        await self._conn.execute(Q["api-queue-cancel"], self._id(), now)

    async def delete(self) -> None:
        await self._conn.execute(Q["api-campaign-delete"], self._id())

    async def audit(
        self, actor_id: str, action: str, details: dict[str, Any], now: datetime
    ) -> None:
        await self._conn.execute(Q["api-audit-insert"], now, actor_id, action, self._id(), details)

    async def add_recipients(
        self, rows: Sequence[tuple[str, str | None, dict[str, str]]], now: datetime
    ) -> int:
        """Inserts (email, name, variables) rows; returns how many were new (others collapse)."""
        if not rows:
            return 0
        inserted = await self._conn.fetch(
            Q["recipients-insert"],
            self._id(),
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            now,
        )
        return len(inserted)

    async def add_imported(self, now: datetime, *, unique: bool, timeout: float) -> int:
        """Inserts the rows of this transaction's ``import_rows`` table (recipients.import),
        the first line of each address; returns how many were new. ``unique``: no two rows
        share an address (the reader dropped the repeats), so line order does not matter."""
        if not unique:
            return int(
                await self._conn.fetchval(
                    Q["recipients-insert-imported"], self._id(), now, timeout=timeout
                )
            )
        status = await self._conn.execute(
            Q["recipients-insert-imported-unique"], self._id(), now, timeout=timeout
        )
        return int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows>"

    async def recipients_count(self) -> int:
        return int(await self._conn.fetchval(Q["api-recipients-count"], self._id()))

    async def remove_pending(self, emails: Sequence[str]) -> tuple[set[str], dict[str, str]]:
        """Deletes pending recipients by (lowercased) address.

        Returns the addresses removed, and the status of those present but kept.
        """
        cid = self._id()
        removed = {
            r["email"] for r in await self._conn.fetch(Q["api-recipients-remove"], cid, emails)
        }
        kept_rows = await self._conn.fetch(
            Q["api-recipients-status-of"], cid, [e for e in emails if e not in removed]
        )
        return removed, {r["email"]: r["status"] for r in kept_rows}

    async def attachments_size(self) -> int:
        return int(await self._conn.fetchval(Q["api-attachments-size"], self._id()))

    async def add_attachment(
        self, filename: str, content_type: str, content: bytes, now: datetime
    ) -> AttachmentView:
        row = await self._conn.fetchrow(
            Q["api-attachment-insert"], self._id(), filename, content_type, content, now
        )
        assert row is not None
        return AttachmentView(**dict(row))

    async def remove_attachment(self, attachment_id: int) -> str | None:
        """The removed file's name, or None when the campaign has no such attachment."""
        row = await self._conn.fetchrow(Q["api-attachment-delete"], attachment_id, self._id())
        return None if row is None else str(row["filename"])


class ApiStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- state changes under the campaign's lock -----------------------------------------

    async def locked(
        self,
        campaign_id: int,
        fn: Callable[[Locked], Awaitable[T]],
        *,
        for_delete: bool = False,
        prepare: Callable[[Any], Awaitable[None]] | None = None,
    ) -> T:
        """Runs ``fn`` in a transaction holding the campaign's locks; commits if it returns.

        ``prepare`` runs first in the same transaction and connection, before the locks are
        taken (a bulk import fills its temporary table there, so a start or pause waits only
        for the final INSERT, not for the file to be read); a deadlock retry runs it again.
        """
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if prepare is not None:
                        await prepare(conn)
                    queue = await conn.fetchrow(Q["api-queue-lock"], campaign_id)
                    lock = "api-campaign-lock-delete" if for_delete else "api-campaign-lock"
                    row = await conn.fetchrow(Q[lock], campaign_id)
                    campaign = None if row is None else CampaignRow(**dict(row))
                    lease_until = None
                    if queue is not None and queue["lease_owner"] is not None:
                        lease_until = queue["lease_until"]
                    return await fn(Locked(conn, campaign, lease_until))
            except asyncpg.DeadlockDetectedError:
                if attempt == _DEADLOCK_RETRIES - 1:
                    raise
                # PostgreSQL already rolled this transaction back; the engine's
                # went through. A short pause lets it commit before we retry.
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    # --- campaigns ---------------------------------------------------------------------------

    async def list_campaigns(
        self, *, owner_id: str | None, statuses: Sequence[str], cursor: int | None, limit: int
    ) -> list[CampaignView]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(Q["api-campaign-list"], owner_id, list(statuses), cursor, limit)
            ids = [int(r["id"]) for r in rows]
            counts: dict[int, dict[str, int]] = {i: {} for i in ids}
            for c in await conn.fetch(Q["api-counts-of-campaigns"], ids):
                counts[int(c["campaign_id"])][c["status"]] = int(c["n"])
            queues = {
                int(q["campaign_id"]): q
                for q in await conn.fetch(Q["api-queues-of-campaigns"], ids)
            }
        return [campaign_view(r, counts[int(r["id"])], queues.get(int(r["id"]))) for r in rows]

    # --- recipients and attachments --------------------------------------------------------

    async def list_recipients(
        self, campaign_id: int, *, status: str | None, cursor: int | None, limit: int
    ) -> list[RecipientView]:
        rows = await self.pool.fetch(Q["api-recipients-list"], campaign_id, status, cursor, limit)
        return [RecipientView(**{**dict(r), "variables": r["variables"] or {}}) for r in rows]

    async def list_attachments(self, campaign_id: int) -> list[AttachmentView]:
        rows = await self.pool.fetch(Q["api-attachments-list"], campaign_id)
        return [AttachmentView(**dict(r)) for r in rows]

    # --- unsubscribes ------------------------------------------------------------------------

    async def unsubscribe(
        self, email: str, source: str, *, actor_id: str, now: datetime
    ) -> tuple[UnsubscribeView, bool]:
        """Adds the (normalized) address; returns its row and whether it was new."""
        async with self.pool.acquire() as conn, conn.transaction():
            new = await conn.fetchrow(Q["api-unsubscribe-add"], email, source, now) is not None
            if new:
                await conn.execute(
                    Q["api-audit-insert"],
                    now,
                    actor_id,
                    "unsubscribe.add",
                    None,
                    {"email": email, "source": source},
                )
            row = await conn.fetchrow(Q["api-unsubscribe-get"], email)
        assert row is not None
        return _unsubscribe_view(row), new

    async def resubscribe(self, email: str, *, actor_id: str, now: datetime) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            gone = await conn.fetchrow(Q["api-unsubscribe-delete"], email) is not None
            if gone:
                await conn.execute(
                    Q["api-audit-insert"],
                    now,
                    actor_id,
                    "unsubscribe.remove",
                    None,
                    {"email": email},
                )
        return gone

    async def unsubscribed(self, email: str) -> UnsubscribeView:
        row = await self.pool.fetchrow(Q["api-unsubscribe-get"], email)
        if row is None:
            return UnsubscribeView(email=email, unsubscribed=False)
        return _unsubscribe_view(row)

    async def list_unsubscribes(self, *, cursor: str | None, limit: int) -> list[UnsubscribeView]:
        rows = await self.pool.fetch(Q["api-unsubscribe-list"], cursor, limit)
        return [_unsubscribe_view(r) for r in rows]

    # --- quota, audit, send log ------------------------------------------------------------

    async def quota(self, account: str = "") -> QuotaView | None:
        """An SMTP account's quota (its key: '' the default's)."""
        row = await self.pool.fetchrow(Q["api-quota-get"], account)
        return None if row is None else QuotaView(**dict(row))

    async def audit(
        self,
        campaign_id: int | None,
        actor_id: str,
        action: str,
        details: dict[str, Any],
        now: datetime,
    ) -> None:
        await self.pool.execute(Q["api-audit-insert"], now, actor_id, action, campaign_id, details)

    async def list_audit(
        self, campaign_id: int, *, cursor: int | None, limit: int
    ) -> list[AuditEntry]:
        rows = await self.pool.fetch(Q["api-audit-list"], campaign_id, cursor, limit)
        return [AuditEntry(**{**dict(r), "details": r["details"] or {}}) for r in rows]

    async def log_test_send(
        self,
        *,
        campaign_id: int,
        email: str,
        status: str,
        message_id: str | None,
        answer: str | None,
        error: str | None,
        took_ms: float,
        actor_id: str,
        now: datetime,
    ) -> int:
        """The send-log row of a test email (is_test) and its audit row, together."""
        async with self.pool.acquire() as conn, conn.transaction():
            log_id = int(
                await conn.fetchval(
                    Q["api-send-log-test"],
                    campaign_id,
                    email,
                    status,
                    message_id,
                    answer,
                    error,
                    took_ms,
                    now,
                )
            )
            await conn.execute(
                Q["api-audit-insert"],
                now,
                actor_id,
                "campaign.test",
                campaign_id,
                {"send_log_id": log_id, "status": status},
            )
        return log_id

    # --- the manager's view -------------------------------------------------------------------

    async def forecast_queue(
        self, limit: int, *, account: str | None = None, default: bool = True
    ) -> list[Entry]:
        """The queue in order, as the forecast replays it (first ``limit`` entries)."""
        return await forecast_queue(self.pool, limit, account=account, default=default)

    async def owner_queue(self, owner_id: str, limit: int) -> tuple[list[OwnerQueueRow], int, int]:
        """The owner's unfinished campaigns (first ``limit``), and how many queued / paused."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(Q["api-owner-queue"], owner_id, limit)
            counts = await conn.fetchrow(Q["api-owner-queue-counts"], owner_id)
        assert counts is not None
        return (
            [OwnerQueueRow(**dict(r)) for r in rows],
            int(counts["queued"]),
            int(counts["paused"]),
        )


def _unsubscribe_view(row: asyncpg.Record) -> UnsubscribeView:
    return UnsubscribeView(
        email=row["email"], unsubscribed=True, source=row["source"], created_at=row["created_at"]
    )
