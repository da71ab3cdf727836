"""A quota sync racing a campaign's own quota_exhausted deferral.

The governor refuses a campaign for the quota; before the campaign writes
its deferral, a sync restores the quota and lifts the quota deferrals — not
yet this one. Without a check the campaign then waits the safety net (two
sync intervals) with the quota back. The deferral reads the quota under a
share lock in its own transaction, so either order ends the wait at once.
Real PostgreSQL; the interleavings are driven step by step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer.db import connect_pool
from mailer.quota import PgQuota, ProviderReading, lift_deferrals
from mailer.store import Lease, PgStore

T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
SAFETY_NET = T0 + timedelta(hours=2)


@pytest.fixture
async def pool(settings) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_pool(settings.database_url, size=4)
    yield p
    await p.close()


async def _running_campaign(db: asyncpg.Connection, store: PgStore) -> Lease:
    cid = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
        " updated_at) VALUES ('o', 'n', 's', 'b', 'sending', $1, $1) RETURNING id",
        T0,
    )
    await db.execute("INSERT INTO queue_entry (campaign_id, queued_at) VALUES ($1, $2)", cid, T0)
    lease = await store.acquire(cid, "A", until=T0 + timedelta(seconds=30), now=T0, fence=0)
    assert lease is not None
    return lease


async def _deferral(db: asyncpg.Connection, lease: Lease) -> tuple[str, datetime]:
    row = await db.fetchrow(
        "SELECT defer_reason, deferred_until FROM queue_entry WHERE campaign_id = $1",
        lease.campaign_id,
    )
    return row["defer_reason"], row["deferred_until"]


async def test_a_sync_just_before_the_deferral_does_not_leave_it_waiting(pool, db) -> None:
    store, quota = PgStore(pool), PgQuota(pool)
    await db.execute("UPDATE quota SET emails_available = 0")
    lease = await _running_campaign(db, store)
    # 1. The governor took nothing: the campaign is about to defer.
    assert await quota.take(5) == 0
    # 2. A sync restores the quota and lifts the quota deferrals (what the
    #    service's on_restored does): this campaign's is not written yet.
    previous, state = await quota.record_sync(ProviderReading(emails_available=100), T0)
    assert (previous, state.emails_available) == (0, 100)
    assert await lift_deferrals(pool, "quota_exhausted", T0) == []
    # 3. The campaign's deferral lands: it ends now, not at the safety net.
    assert (await store.defer(lease, "quota_exhausted", SAFETY_NET, T0))[0]
    assert await _deferral(db, lease) == ("quota_exhausted", T0)
    audit = await db.fetchval(
        "SELECT details FROM audit_log WHERE action = 'campaign.defer' AND campaign_id = $1",
        lease.campaign_id,
    )
    assert json.loads(audit) == {"reason": "quota_exhausted", "until": T0.isoformat()}


async def test_a_deferral_while_a_sync_holds_the_quota_waits_for_it(pool, db) -> None:
    store = PgStore(pool)
    await db.execute("UPDATE quota SET emails_available = 0")
    lease = await _running_campaign(db, store)
    # A sync in progress: the quota row locked and rewritten, not committed.
    sync = await pool.acquire()
    tx = sync.transaction()
    await tx.start()
    await sync.execute("SELECT emails_available FROM quota FOR UPDATE")
    await sync.execute("UPDATE quota SET emails_available = 100")
    deferral = asyncio.ensure_future(store.defer(lease, "quota_exhausted", SAFETY_NET, T0))
    try:
        done, _ = await asyncio.wait({deferral}, timeout=0.5)
        assert not done  # it waits for the sync's verdict instead of reading the old 0
    finally:
        await tx.commit()
        await pool.release(sync)
    assert (await deferral)[0]
    assert await _deferral(db, lease) == ("quota_exhausted", T0)


async def test_with_no_quota_the_deferral_keeps_its_time_and_notice(pool, db) -> None:
    store = PgStore(pool)
    await db.execute("UPDATE quota SET emails_available = 0")
    lease = await _running_campaign(db, store)
    assert (await store.defer(lease, "quota_exhausted", SAFETY_NET, T0))[0]
    assert await _deferral(db, lease) == ("quota_exhausted", SAFETY_NET)
    # ...and the sync that restores it later lifts it.
    await PgQuota(pool).record_sync(ProviderReading(emails_available=10), T0)
    assert await lift_deferrals(pool, "quota_exhausted", T0) == [lease.campaign_id]
