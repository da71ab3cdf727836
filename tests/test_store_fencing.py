"""The campaign lease fences every write of a campaign's owner (mailer.store).

A takeover -- another process acquires the lease at a higher epoch -- leaves
the old owner able to record what it already sent, and nothing else: it claims
no recipients and pauses nothing. Real PostgreSQL; times are explicit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer.db import connect_pool
from mailer.store import Lease, Outcome, PgStore

T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


@pytest.fixture
async def store(settings) -> AsyncIterator[PgStore]:
    pool = await connect_pool(settings.database_url, size=3)
    yield PgStore(pool)
    await pool.close()


async def _campaign(db: asyncpg.Connection, n: int) -> int:
    cid: int = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
        " updated_at) VALUES ('o', 'n', 's', 'b', 'sending', $1, $1) RETURNING id",
        T0,
    )
    await db.execute("INSERT INTO queue_entry (campaign_id, queued_at) VALUES ($1, $2)", cid, T0)
    await db.executemany(
        "INSERT INTO recipient (campaign_id, email, created_at, updated_at)"
        " VALUES ($1, $2, $3, $3)",
        [(cid, f"r{i}@example.org", T0) for i in range(n)],
    )
    return cid


async def _takeover(store: PgStore, cid: int) -> tuple[Lease, Lease]:
    """A holds the lease for a second and stalls; B takes the campaign over."""
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert a is not None
    t1 = T0 + timedelta(seconds=5)
    b = await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert b is not None and b.epoch > a.epoch
    return a, b


async def test_a_deposed_owner_claims_nothing(store: PgStore, db) -> None:
    cid = await _campaign(db, 3)
    a, b = await _takeover(store, cid)
    assert await store.claim(a, 10, T0 + timedelta(seconds=6)) == ([], 0)
    claimed, _ = await store.claim(b, 10, T0 + timedelta(seconds=6))
    assert len(claimed) == 3


async def test_a_late_record_replaces_the_takeovers_doubt_in_the_send_log(
    store: PgStore, db
) -> None:
    cid = await _campaign(db, 2)
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert a is not None
    claimed, _ = await store.claim(a, 10, T0)
    assert len(await store.hand(a, [r.id for r in claimed], T0)) == 2  # both went to SMTP
    t1 = T0 + timedelta(seconds=5)
    b = await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert b is not None
    assert await store.begin_sending(b, t1) == 2  # both in doubt, each with a send-log row

    # A's first SMTP transaction had gone through: its late record settles the doubt.
    first = claimed[0]
    sent = Outcome(
        recipient_id=first.id,
        email=first.email,
        status="sent",
        message_id="<m1>",
        answer="250 ok",
        error=None,
        took_ms=3.0,
    )
    await store.record(a, [sent], t1, transient_errors=0, success=True)
    rows = await db.fetch(
        "SELECT recipient_id, status FROM send_log WHERE campaign_id = $1 ORDER BY recipient_id",
        cid,
    )
    assert [(r["recipient_id"], r["status"]) for r in rows] == [
        (first.id, "sent"),  # one attempt, one row: the placeholder gave way
        (claimed[1].id, "in_doubt"),
    ]
    statuses = await db.fetch(
        "SELECT id, status FROM recipient WHERE campaign_id = $1 ORDER BY id", cid
    )
    assert [r["status"] for r in statuses] == ["sent", "in_doubt"]


async def test_a_deposed_owners_breaker_pauses_nothing(store: PgStore, db) -> None:
    cid = await _campaign(db, 1)
    a, b = await _takeover(store, cid)
    assert await store.pause_by_breaker(a, T0 + timedelta(seconds=6)) == (False, False)
    assert await db.fetchval("SELECT status FROM campaign WHERE id = $1", cid) == "sending"
    q = await db.fetchrow("SELECT defer_reason, lease_owner FROM queue_entry")
    assert (q["defer_reason"], q["lease_owner"]) == (None, "B")
    assert not await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE action IN ('campaign.status', 'campaign.defer')"
    )
    # The owner itself still can.
    assert (await store.pause_by_breaker(b, T0 + timedelta(seconds=7)))[0]
    assert await db.fetchval("SELECT status FROM campaign WHERE id = $1", cid) == "paused"
