"""Which claimed recipients were handed to SMTP (issue 7): the takeover after a
kill -9 puts in doubt only those, and gives the others back to the queue.

Real PostgreSQL; times are explicit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer.db import connect_pool
from mailer.store import Outcome, PgStore

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


async def _statuses(db, cid: int) -> list[str]:
    rows = await db.fetch("SELECT status FROM recipient WHERE campaign_id = $1 ORDER BY id", cid)
    return [r["status"] for r in rows]


async def test_takeover_doubts_only_the_handed_and_returns_the_rest(store: PgStore, db) -> None:
    cid = await _campaign(db, 5)
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert a is not None
    claimed, _ = await store.claim(a, 5, T0)
    # A handed its first wave of two to SMTP, then died (kill -9).
    assert await store.hand(a, [claimed[0].id, claimed[1].id], T0) == [
        claimed[0].id,
        claimed[1].id,
    ]
    t1 = T0 + timedelta(seconds=5)
    b = await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert b is not None
    assert await store.begin_sending(b, t1) == 2
    assert await _statuses(db, cid) == ["in_doubt", "in_doubt", "pending", "pending", "pending"]
    logged = await db.fetch("SELECT recipient_id, status FROM send_log WHERE campaign_id = $1", cid)
    assert sorted((r["recipient_id"], r["status"]) for r in logged) == [
        (claimed[0].id, "in_doubt"),
        (claimed[1].id, "in_doubt"),
    ]
    # The deposed owner, late, can hand nothing more: those rows are not its own.
    assert await store.hand(a, [r.id for r in claimed[2:]], t1) == []
    # B claims the three that never left A's process, and sends them once.
    again, _ = await store.claim(b, 10, t1)
    assert [r.id for r in again] == [r.id for r in claimed[2:]]


async def test_a_mark_belongs_to_one_claim(store: PgStore, db) -> None:
    cid = await _campaign(db, 1)
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=60), now=T0, fence=0)
    assert a is not None
    (r,), _ = await store.claim(a, 1, T0)
    assert await store.hand(a, [r.id], T0) == [r.id]
    # A 4xx: the recipient goes back to pending, to be claimed again later...
    retry = Outcome(
        recipient_id=r.id,
        email=r.email,
        status="transient",
        message_id="<m1>",
        answer="451 later",
        error="451 later",
        took_ms=1.0,
    )
    await store.record(a, [retry], T0)
    assert await db.fetchval("SELECT handed_at FROM recipient WHERE id = $1", r.id) is None
    # ...claimed again by the same lease and not handed yet: a takeover now must
    # give it back, not doubt it on the strength of the old mark.
    (again,), _ = await store.claim(a, 1, T0)
    assert again.id == r.id
    t1 = T0 + timedelta(seconds=61)
    b = await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert b is not None
    assert await store.begin_sending(b, t1) == 0
    assert await _statuses(db, cid) == ["pending"]


async def test_a_deposed_owner_hands_nothing(store: PgStore, db) -> None:
    # A claimed, stalled; B took the lease over but has not settled A's rows yet.
    cid = await _campaign(db, 2)
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert a is not None
    claimed, _ = await store.claim(a, 10, T0)
    t1 = T0 + timedelta(seconds=5)
    assert await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert await store.hand(a, [r.id for r in claimed], t1) == []


async def test_a_handed_wave_given_back_unsent_is_not_doubted_later(store: PgStore, db) -> None:
    # A pipelined wave handed while the previous one was with SMTP, then given back
    # unsent (a stop; or a send cut before its data): pending, and no longer handed
    # (migration 0005's trigger drops the mark when a row leaves sending).
    # Claimed again by an owner that dies before its own hand, it goes back to
    # pending at the takeover -- not in doubt, since it never reached SMTP.
    cid = await _campaign(db, 2)
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert a is not None
    claimed, _ = await store.claim(a, 2, T0)
    ids = [r.id for r in claimed]
    assert await store.hand(a, ids, T0) == ids
    await store.release_claims(a, ids, T0)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM recipient WHERE campaign_id = $1 AND handed_at IS NOT NULL", cid
        )
        == 0
    )
    again, _ = await store.claim(a, 2, T0)  # A claims them again, then dies
    assert [r.id for r in again] == ids
    t1 = T0 + timedelta(seconds=5)
    b = await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert b is not None
    assert await store.begin_sending(b, t1) == 0
    assert await _statuses(db, cid) == ["pending", "pending"]
