"""Which claimed recipients were handed to SMTP (issue 7): the takeover after a
kill -9 puts in doubt only those, and gives the others back to the queue.

Real PostgreSQL; times are explicit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer.db import Q, connect_pool
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


async def _spent(db, account: str, since: datetime) -> int:
    """What the account's hour rebuild and local quota count (mailer/queries)."""
    until = since + timedelta(hours=1)
    return int(await db.fetchval(Q["spent-tokens-hour"], since, until, account))


async def test_a_takeovers_doubts_count_for_the_account_their_wave_went_through(
    store: PgStore, db
) -> None:
    """Several SMTP accounts: an in-doubt row is an attempt of the account that may have
    sent it (the hand records it), not of the default's."""
    cid = await _campaign(db, 4)
    await db.execute("UPDATE campaign SET smtp_account = 'bulk' WHERE id = $1", cid)
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert a is not None
    r, _ = await store.claim(a, 4, T0)
    # A wave of two handed through bulk (a plain hand); the first recorded sent
    # with the next wave's hand (one statement, same batch, same account); then A dies.
    assert await store.hand(a, [r[0].id, r[1].id], T0, account="bulk") == [r[0].id, r[1].id]
    sent = Outcome(
        recipient_id=r[0].id,
        email=r[0].email,
        status="sent",
        message_id="<m0>",
        answer="250 ok",
        error=None,
        took_ms=1.0,
    )
    _, handed = await store.record_and_hand(a, [sent], [r[2].id], T0, account="bulk")
    assert handed == [r[2].id]
    t1 = T0 + timedelta(seconds=5)
    b = await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert b is not None
    assert await store.begin_sending(b, t1) == 2
    assert await _statuses(db, cid) == ["sent", "in_doubt", "in_doubt", "pending"]
    logged = await db.fetch(
        "SELECT recipient_id, status, account FROM send_log WHERE campaign_id = $1", cid
    )
    assert sorted((x["recipient_id"], x["status"], x["account"]) for x in logged) == [
        (r[0].id, "sent", "bulk"),
        (r[1].id, "in_doubt", "bulk"),
        (r[2].id, "in_doubt", "bulk"),
    ]
    hour = T0.replace(minute=0)
    assert await _spent(db, "bulk", hour) == 3
    assert await _spent(db, "", hour) == 0
    # The mark's account goes with the mark (migration 0018's trigger).
    left = await db.fetchval(
        "SELECT count(*) FROM recipient WHERE campaign_id = $1 AND handed_account IS NOT NULL",
        cid,
    )
    assert left == 0


async def test_a_reconciles_doubt_counts_for_the_account_and_the_default_stays_null(
    store: PgStore, db
) -> None:
    """The leader's reconcile (a claim that outlived its lease) logs the same way; a
    wave through the default account keeps NULL, as every default's row."""
    cid = await _campaign(db, 3)
    a = await store.acquire(cid, "A", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert a is not None
    r, _ = await store.claim(a, 3, T0)
    assert await store.hand(a, [r[0].id], T0, account="bulk") == [r[0].id]
    # B takes the lease over but has not settled A's rows: the reconcile does.
    t1 = T0 + timedelta(seconds=5)
    assert await store.acquire(cid, "B", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    fence = await db.fetchval("SELECT epoch FROM leader_fence")
    assert await store.settle_stale_claims(t1, fence) == {cid: {"in_doubt": 1, "pending": 2}}
    row = await db.fetchrow("SELECT status, account FROM send_log WHERE campaign_id = $1", cid)
    assert (row["status"], row["account"]) == ("in_doubt", "bulk")

    other = await _campaign(db, 1)
    c = await store.acquire(other, "C", until=T0 + timedelta(seconds=1), now=T0, fence=0)
    assert c is not None
    (only,), _ = await store.claim(c, 1, T0)
    assert await store.hand(c, [only.id], T0) == [only.id]
    d = await store.acquire(other, "D", until=t1 + timedelta(seconds=30), now=t1, fence=0)
    assert d is not None
    assert await store.begin_sending(d, t1) == 1
    row = await db.fetchrow("SELECT status, account FROM send_log WHERE campaign_id = $1", other)
    assert (row["status"], row["account"]) == ("in_doubt", None)
