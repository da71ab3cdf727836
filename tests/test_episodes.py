"""One notice per episode (issue 8), in the queue entry: the rule, and that a
restart (a new process, a new pool) does not repeat a notice.

Real PostgreSQL; the deferrals are written as a campaign actor writes them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer.db import connect_pool
from mailer.messages import Notice
from mailer.store import Lease, PgStore, notice_due

T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
H = timedelta(hours=1)


def test_notice_due_once_per_episode() -> None:
    # A new wait: told.
    assert notice_due("rate_per_hour", T0 + H, None, None)
    # The same reason going on, even to a later time: the same news.
    assert not notice_due("rate_per_hour", T0 + 2 * H, "rate_per_hour", T0 + H)
    # Another reason with a later time than promised: told.
    assert notice_due("outside_hours", T0 + 20 * H, "rate_per_hour", T0 + H)
    # Another reason ending no later than promised: nothing new.
    assert not notice_due("transient_error", T0 + H, "rate_per_hour", T0 + H)
    # The quota: the manager must know, whatever came before — once.
    assert notice_due("quota_exhausted", None, "outside_hours", T0 + 20 * H)
    assert not notice_due("quota_exhausted", None, "quota_exhausted", None)
    # From the quota to a known time: not later than "when it is topped up".
    assert not notice_due("outside_hours", T0 + 20 * H, "quota_exhausted", None)


@pytest.fixture
async def pool(settings) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_pool(settings.database_url, size=2)
    yield p
    await p.close()


def _notice(cid: int, n: int) -> Notice:
    return Notice(kind="notify", subject="t.events.notify.o", msg_id=f"n{n}", payload=b"{}",
                  campaign_id=cid)  # fmt: skip


async def _lease(store: PgStore, cid: int, now: datetime) -> Lease:
    lease = await store.acquire(cid, "A", until=now + timedelta(seconds=30), now=now, fence=0)
    assert lease is not None
    return lease


async def test_an_episode_survives_a_restart(settings, pool, db) -> None:
    cid = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
        " updated_at) VALUES ('o', 'n', 's', 'b', 'ready', $1, $1) RETURNING id",
        T0,
    )
    await db.execute("INSERT INTO queue_entry (campaign_id, queued_at) VALUES ($1, $2)", cid, T0)
    store = PgStore(pool)
    lease = await _lease(store, cid, T0)
    assert await store.defer(lease, "rate_per_hour", T0 + H, T0, notice=_notice(cid, 1)) == (
        True,
        True,
    )

    # A restart: another process, its own pool, nothing in memory.
    other = await connect_pool(settings.database_url, size=2)
    try:
        again = PgStore(other)
        later = T0 + H
        lease = await _lease(again, cid, later)
        # The same reason, a later time: no second notice.
        got = await again.defer(lease, "rate_per_hour", later + H, later, notice=_notice(cid, 2))
        assert got == (True, False)
        # The quota (at 0: the deferral has no time): told, once.
        await db.execute("UPDATE quota SET emails_available = 0")
        lease = await _lease(again, cid, later + H)
        got = await again.defer(lease, "quota_exhausted", None, later + H, notice=_notice(cid, 3))
        assert got == (True, True)
    finally:
        await other.close()
    stored = await db.fetch("SELECT msg_id FROM event_outbox WHERE campaign_id = $1", cid)
    assert sorted(r["msg_id"] for r in stored) == ["n1", "n3"]
    row = await db.fetchrow(
        "SELECT notified_reason, notified_until FROM queue_entry WHERE campaign_id = $1", cid
    )
    assert (row["notified_reason"], row["notified_until"]) == ("quota_exhausted", None)
