"""The relay of the event outbox: stored notices go to JetStream, then away.

A notice (an owner notification) is written by the transaction that calls for
it — the deferral's — so it exists exactly when the deferral does. A relay
publishes the stored notices oldest first and deletes each one JetStream
confirmed. Two relays may run at once (a campaign actor right after its
deferral, the leader's scheduler on every wake and reconcile): ``FOR UPDATE
SKIP LOCKED`` gives each its own rows, so across relays the order is not
guaranteed (each notice carries its own time). The stream's duplicate window
(15 minutes) drops the repeat of a publish whose acknowledgement was lost;
a repeat later than that is stored twice. Delivery is at least once; a
failure leaves the rows for the next relay and is counted by the events'
publish-failure metric.
"""

from __future__ import annotations

import logging
from typing import Protocol

import asyncpg

from mailer.db import Q
from mailer.messages import Notice

__all__ = ["NoticePublisher", "OutboxRelay"]

log = logging.getLogger("mailer.outbox")


class NoticePublisher(Protocol):
    async def publish_notice(self, notice: Notice) -> bool: ...


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, publisher: NoticePublisher, *, batch: int = 100) -> None:
        self._pool = pool
        self._publisher = publisher
        self._batch = batch

    async def flush(self) -> int:
        """Publishes what the outbox holds, oldest first; returns how many went out.

        Stops at the first publish that fails (NATS is away: the rest would
        fail too) and keeps that row and the later ones for the next relay.
        """
        sent = 0
        while True:
            published: list[int] = []
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(Q["outbox-take"], self._batch)
                for r in rows:
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
                    await conn.execute(Q["outbox-delete"], published)
            sent += len(published)
            if len(published) < self._batch:
                if len(published) < len(rows):
                    log.warning(
                        "outbox kept notices for the next relay",
                        extra={"count": len(rows) - len(published)},
                    )
                return sent
