"""Retention: the leader removes old send-log and audit rows, and finished campaigns'
recipients, in bounded batches; a purged campaign keeps its counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer import metrics
from mailer.clock import FakeClock
from mailer.retention import Retention, RetentionPolicy
from mailer.store import PgStore

NOW = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
OLD = NOW - timedelta(days=400)
RECENT = NOW - timedelta(days=10)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert p is not None
    yield p
    await p.close()


async def _campaign(db, *, status: str, finished_at: datetime | None, recipients: dict) -> int:
    cid: int = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at, "
        "updated_at, finished_at) VALUES ('m', 'n', 's', 'b', $1, $2, $2, $3) RETURNING id",
        status,
        OLD - timedelta(days=1),
        finished_at,
    )
    n = 0
    for rstatus, count in recipients.items():
        for _ in range(count):
            n += 1
            await db.execute(
                "INSERT INTO recipient (campaign_id, email, status, error, created_at, "
                "updated_at) VALUES ($1, $2, $3, $4, $5, $5)",
                cid,
                f"r{n}@example.org",
                rstatus,
                "550 no such user" if rstatus == "failed" else None,
                OLD,
            )
    return cid


async def _log_rows(db, at: datetime, n: int) -> None:
    for i in range(n):
        await db.execute(
            "INSERT INTO send_log (email, status, created_at) VALUES ($1, 'sent', $2)",
            f"x{i}@example.org",
            at,
        )
        await db.execute(
            "INSERT INTO audit_log (at, actor_id, action) VALUES ($1, 'm', 'campaign.create')",
            at,
        )


def _removed(table: str) -> float:
    value = metrics.REGISTRY.get_sample_value("mailer_retention_deleted_total", {"table": table})
    return value or 0.0


async def test_old_rows_go_in_bounded_batches_and_a_purged_campaign_keeps_its_counts(
    db, pool: asyncpg.Pool
) -> None:
    old_done = await _campaign(
        db, status="completed_with_errors", finished_at=OLD, recipients={"sent": 4, "failed": 1}
    )
    recent_done = await _campaign(db, status="sent", finished_at=RECENT, recipients={"sent": 2})
    # Old but not finished: its recipients are still work to do.
    running = await _campaign(db, status="sending", finished_at=None, recipients={"pending": 3})
    await _log_rows(db, OLD, 7)
    await _log_rows(db, RECENT, 2)
    store = PgStore(pool)
    counts_before = await store.counts(old_done)
    before = {t: _removed(t) for t in metrics.RETENTION_TABLES}

    policy = RetentionPolicy(
        send_log_days=365, audit_log_days=365, recipients_days=365, batch=2, max_batches=2
    )
    retention = Retention(pool, policy)
    # One pass does at most max_batches × batch rows per table.
    first = await retention.run(NOW)
    assert first == {"send_log": 4, "audit_log": 4, "recipient": 4}
    second = await retention.run(NOW)
    assert second == {"send_log": 3, "audit_log": 3, "recipient": 1}
    assert await retention.run(NOW) == {}

    assert await db.fetchval("SELECT count(*) FROM send_log") == 2
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE at < $1", NOW) == 2
    assert await db.fetchval("SELECT count(*) FROM recipient WHERE campaign_id = $1", old_done) == 0
    for kept in (recent_done, running):
        assert await db.fetchval("SELECT count(*) FROM recipient WHERE campaign_id = $1", kept)
    # The view of the purged campaign still says how it went.
    assert counts_before == {"sent": 4, "failed": 1}
    assert await store.counts(old_done) == counts_before
    view = await store.view(old_done)
    assert view is not None and view.counts == counts_before
    assert {t: _removed(t) - before[t] for t in metrics.RETENTION_TABLES} == {
        "send_log": 7,
        "audit_log": 7,
        "recipient": 5,
        "soft_bounce": 0,  # not in this policy
    }


async def test_an_age_of_zero_keeps_the_table(db, pool: asyncpg.Pool) -> None:
    await _campaign(db, status="sent", finished_at=OLD, recipients={"sent": 1})
    await _log_rows(db, OLD, 2)
    policy = RetentionPolicy(send_log_days=0, audit_log_days=0, recipients_days=0)
    assert await Retention(pool, policy).run(NOW) == {}
    assert await db.fetchval("SELECT count(*) FROM send_log") == 2
    assert await db.fetchval("SELECT count(*) FROM recipient") == 1


async def test_the_leader_runs_retention_when_it_reconciles(make_service, db) -> None:
    old_done = await _campaign(db, status="sent", finished_at=OLD, recipients={"sent": 3})
    await _log_rows(db, OLD, 3)
    await _log_rows(db, RECENT, 1)
    service = await make_service(clock=FakeClock(NOW))
    await asyncio.wait_for(service.leadership.wait(), 15)

    async def purged() -> None:
        # Another connection's effect: nothing to subscribe to but the tables. The pass
        # removes send-log rows first and recipients last, in separate statements: wait
        # for its last effect too (waiting for the first raced the checks below under load).
        while (  # noqa: ASYNC110
            await db.fetchval("SELECT count(*) FROM send_log") != 1
            or await db.fetchval("SELECT count(*) FROM recipient WHERE campaign_id = $1", old_done)
        ):
            await asyncio.sleep(0.05)

    # A takeover reconciles at once, and retention is part of reconcile.
    await asyncio.wait_for(purged(), 15)
    assert await db.fetchval("SELECT count(*) FROM recipient WHERE campaign_id = $1", old_done) == 0
    kept = await db.fetchval("SELECT purged_counts::text FROM campaign WHERE id = $1", old_done)
    assert kept == '{"sent": 3}'
