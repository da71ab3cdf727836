"""The relay of the event outbox: stored notices go to JetStream, then away.

A notice (an owner notification, a final campaign event, an unsubscribe) is
written by the transaction that calls for it -- the deferral's, the final
status's -- so it exists exactly when that change does. A relay takes the
oldest stored notices (each row marked taken for ``take_seconds``) and
commits, then publishes them with no transaction open and no row locked, and
deletes each one JetStream confirmed. Two relays may run at once (a campaign
actor right after its deferral, the leader's scheduler on every wake and
reconcile): a taken row is not taken again until its time runs out, so across
relays the order is not guaranteed (each notice carries its own time). The
stream's duplicate window (15 minutes) drops the repeat of a publish whose
acknowledgement was lost, or whose relay died before deleting it; a repeat
later than that is stored twice. Delivery is at least once; a failure gives
the rest of the rows back for the next relay and is counted by the events'
publish-failure metric; the leader's scheduler then relays again on a timer of
its own (``due_in``), backing off while NATS stays away.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from mailer.db import Q
from mailer.messages import Notice

__all__ = ["NoticePublisher", "OutboxRelay", "store_notice"]

log = logging.getLogger("mailer.outbox")


async def store_notice(conn: Any, notice: Notice, now: datetime) -> None:
    """Writes ``notice`` to the outbox on ``conn``: in the transaction of the change that
    calls for it, so it exists exactly when that change does."""
    await conn.execute(
        Q["outbox-insert"],
        notice.kind,
        notice.subject,
        notice.msg_id,
        notice.payload,
        notice.campaign_id,
        now,
    )


class NoticePublisher(Protocol):
    async def publish_notice(self, notice: Notice) -> bool: ...


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: NoticePublisher,
        *,
        batch: int = 100,
        # Long enough for a batch of publishes; short, because a relay that died
        # after taking holds its rows that long (a repeat is dropped by the stream's
        # duplicate window).
        take_seconds: float = 15.0,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._batch = batch
        self._take_seconds = take_seconds

    async def due_in(self) -> float | None:
        """Seconds until the relay should run again, None when the outbox is empty.

        0.0: rows no relay holds are left (a publish failed just now: the caller
        backs off); otherwise when the earliest taken row is free again (a relay
        that died after taking it). Without this, rows left behind waited for the
        next unrelated wake or the reconcile interval (minutes).
        """
        row = await self._pool.fetchrow(Q["outbox-due"])
        if row is None:
            return None
        if int(row["ready"]):
            return 0.0
        next_in = row["next_in"]
        return None if next_in is None else max(0.0, float(next_in))

    async def flush(self) -> int:
        """Publishes what the outbox holds, oldest first; returns how many went out.

        Stops at the first publish that fails (NATS is away: the rest would
        fail too) and gives that row and the later ones back for the next relay.
        """
        sent = 0
        while True:
            rows = await self._pool.fetch(Q["outbox-take"], self._batch, self._take_seconds)
            published: list[int] = []
            for r in sorted(rows, key=lambda r: int(r["id"])):
                notice = Notice(
                    kind=r["kind"],
                    subject=r["subject"],
                    msg_id=r["msg_id"],
                    payload=bytes(r["payload"]),
                    campaign_id=r["campaign_id"],
                )
                if not await self._publisher.publish_notice(notice):
                    break
                published.append(int(r["id"]))
            if published:
                await self._pool.execute(Q["outbox-delete"], published)
            sent += len(published)
            if len(published) < len(rows):
                kept = [int(r["id"]) for r in rows if int(r["id"]) not in set(published)]
                await self._pool.execute(Q["outbox-untake"], kept)
                log.warning("outbox kept notices for the next relay", extra={"count": len(kept)})
                return sent
            if len(rows) < self._batch:
                return sent
