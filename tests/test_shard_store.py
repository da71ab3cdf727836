"""A campaign's shards in the store (mailer.store): disjoint sets, each fenced.

Shard k of n claims only the recipients with id % n = k under its own lease;
taking over an expired shard settles that shard's rows and no other's; a
deposed shard holder claims and hands nothing; a wait several shards are
refused for is written once, with one notice. Real PostgreSQL; times explicit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer.db import connect_pool
from mailer.messages import Notice
from mailer.store import Lease, PgStore
from tests.test_store_fencing import _campaign

T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
LONG = timedelta(seconds=30)


@pytest.fixture
async def store(settings) -> AsyncIterator[PgStore]:
    pool = await connect_pool(settings.database_url, size=3)
    yield PgStore(pool)
    await pool.close()


async def _sharded(store: PgStore, db: asyncpg.Connection, n: int) -> tuple[int, Lease, Lease]:
    """A campaign of ``n`` recipients in 2 shards: the home held by H, shard 1 by S."""
    cid = await _campaign(db, n)
    home = await store.acquire(cid, "H", until=T0 + LONG, now=T0, fence=0, shards=2)
    assert home is not None and home.shards == 2
    helper = await store.acquire_shard(
        cid, 1, "S", until=T0 + timedelta(seconds=1), now=T0, fence=0
    )
    assert helper is not None and helper.shard == 1 and helper.shards == 2
    return cid, home, helper


async def test_each_shard_claims_only_its_own_set(store: PgStore, db) -> None:
    cid, home, helper = await _sharded(store, db, 10)
    mine, _ = await store.claim(home, 100, T0)
    theirs, _ = await store.claim(helper, 100, T0)
    assert {r.id % 2 for r in mine} == {0} and {r.id % 2 for r in theirs} == {1}
    assert len(mine) + len(theirs) == 10
    # A second holder of a live shard is refused.
    assert await store.acquire_shard(cid, 1, "X", until=T0 + LONG, now=T0, fence=0) is None


async def test_a_shard_takeover_settles_its_own_rows_only_and_fences_the_old_holder(
    store: PgStore, db
) -> None:
    cid, home, helper = await _sharded(store, db, 10)
    mine, _ = await store.claim(home, 100, T0)
    theirs, _ = await store.claim(helper, 100, T0)
    await store.hand(home, [r.id for r in mine[:2]], T0)
    await store.hand(helper, [r.id for r in theirs[:2]], T0)  # two may have reached SMTP

    t1 = T0 + timedelta(seconds=5)  # S stalled past its lease; T takes shard 1 over
    taker = await store.acquire_shard(cid, 1, "T", until=t1 + LONG, now=t1, fence=0)
    assert taker is not None and taker.epoch > helper.epoch
    assert await store.begin_sending(taker, t1) == 2  # S's handed ones: in doubt
    rows = await db.fetch(
        "SELECT id, status, claimed_by FROM recipient WHERE campaign_id = $1 ORDER BY id", cid
    )
    for r in rows:
        if r["id"] % 2 == 0:  # the home's rows: still its claims
            assert (r["status"], r["claimed_by"]) == ("sending", home.claim_token)
    odd = [r["status"] for r in rows if r["id"] % 2 == 1]
    assert sorted(odd) == ["in_doubt"] * 2 + ["pending"] * 3

    # The deposed holder claims and hands nothing; the taker sends the rest once.
    assert await store.claim(helper, 100, t1) == ([], 0)
    assert await store.hand(helper, [r.id for r in theirs[2:]], t1) == []
    again, _ = await store.claim(taker, 100, t1)
    assert len(again) == 3


async def test_a_wait_several_shards_are_refused_for_is_written_once(store: PgStore, db) -> None:
    cid, home, helper = await _sharded(store, db, 10)
    until = T0 + timedelta(minutes=45)

    def notice() -> Notice:
        return Notice(kind="notify", subject="s", msg_id=f"m{cid}", payload=b"{}", campaign_id=cid)

    # The helper is refused first: the campaign's wait, and its one notice.
    assert await store.defer(helper, "rate_per_hour", until, T0, notice=notice()) == (True, True)
    # The home, refused for the same hour, lets go without a second answer.
    assert await store.defer(home, "rate_per_hour", until, T0, notice=notice()) == (False, False)
    q = await db.fetchrow(
        "SELECT defer_reason, deferred_until, lease_owner FROM queue_entry WHERE campaign_id = $1",
        cid,
    )
    assert (q["defer_reason"], q["deferred_until"], q["lease_owner"]) == (
        "rate_per_hour",
        until,
        None,
    )
    assert await db.fetchval("SELECT count(*) FROM event_outbox WHERE campaign_id = $1", cid) == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM campaign_shard "
            "WHERE campaign_id = $1 AND lease_owner IS NOT NULL",
            cid,
        )
        == 0
    )
