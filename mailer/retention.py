"""Retention: old send-log and audit rows, and finished campaigns' recipients, removed.

The leader's scheduler runs it at every reconcile (``MAILER_RECONCILE_INTERVAL_SECONDS``).
Each statement removes at most ``batch`` rows, so no statement holds locks for long nor
bloats one transaction; a run does at most ``max_batches`` per table and the next reconcile
goes on where it stopped, so a first run on years of history cannot stall the scheduler.

A finished campaign whose recipients are removed keeps its counts (``campaign.
purged_counts``, written under the campaign row's lock before the first row goes), so its
view still says how it went; its recipient list is empty from then on. Removal is
idempotent, so a deposed leader that runs it late does no harm: it needs no fence.
An age of 0 keeps that table forever.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import asyncpg
import msgspec

from mailer import metrics
from mailer.db import Q

__all__ = ["Retention", "RetentionPolicy"]

log = logging.getLogger("mailer.retention")


class RetentionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    send_log_days: int
    audit_log_days: int
    recipients_days: int
    # Soft bounces older than their counting window count for nothing (mailer.suppression).
    soft_bounce_days: float = 0
    batch: int = 1000
    # Per table and run: bounded work per reconcile.
    max_batches: int = 20


class Retention:
    def __init__(self, pool: asyncpg.Pool, policy: RetentionPolicy) -> None:
        self._pool = pool
        self._p = policy

    async def run(self, now: datetime) -> dict[str, int]:
        """One bounded pass; returns the rows removed per table (only non-zero ones)."""
        removed: dict[str, int] = {}
        p = self._p
        if p.send_log_days:
            cutoff = now - timedelta(days=p.send_log_days)
            removed["send_log"] = await self._batches(Q["retention-send-log"], cutoff)
        if p.audit_log_days:
            cutoff = now - timedelta(days=p.audit_log_days)
            removed["audit_log"] = await self._batches(Q["retention-audit-log"], cutoff)
        if p.recipients_days:
            cutoff = now - timedelta(days=p.recipients_days)
            removed["recipient"] = await self._recipients(cutoff)
        if p.soft_bounce_days:
            cutoff = now - timedelta(days=p.soft_bounce_days)
            removed["soft_bounce"] = await self._batches(Q["retention-soft-bounce"], cutoff)
        removed = {table: n for table, n in removed.items() if n}
        for table, n in removed.items():
            metrics.RETENTION_DELETED.labels(table=table).inc(n)
        if removed:
            log.info("retention removed old rows", extra={"removed": removed})
        return removed

    async def _batches(self, sql: str, *args: object) -> int:
        total = 0
        for _ in range(self._p.max_batches):
            status = await self._pool.execute(sql, *args, self._p.batch)
            n = _deleted(status)
            total += n
            if n < self._p.batch:
                break
        return total

    async def _recipients(self, cutoff: datetime) -> int:
        total = 0
        budget = self._p.max_batches
        for row in await self._pool.fetch(Q["retention-finished-campaigns"], cutoff, budget):
            cid = int(row["id"])
            async with self._pool.acquire() as conn, conn.transaction():
                kept = await conn.fetchrow(Q["retention-keep-counts"], cid)
            if kept is None:  # no longer final (cannot happen today) or gone: leave it
                continue
            while budget > 0:
                budget -= 1
                n = _deleted(
                    await self._pool.execute(Q["retention-recipients"], cid, self._p.batch)
                )
                total += n
                if n < self._p.batch:
                    break
            if budget <= 0:
                break
        return total


def _deleted(status: str) -> int:
    # asyncpg returns the command tag: "DELETE 1000".
    verb, _, count = status.partition(" ")
    return int(count) if verb == "DELETE" and count.isdigit() else 0
