"""Counts kept incrementally (migration 0009's triggers) agree with a GROUP BY.

A seeded mix of everything that changes a recipient's status -- the API's add
and remove, claims (with unsubscribed addresses), hands, records of every
outcome, releases, takeovers, the leader's reconcile, retention and deletion --
runs over two campaigns; after each step the kept counts must equal a count
over the recipients. The reads (campaign view, the list's counts, the add's
size check) must give the same answer.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from mailer.apistore import ApiStore, Locked
from mailer.db import Q, connect_pool
from mailer.store import Lease, Outcome, PgStore

T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


@pytest.fixture
async def pool(settings) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_pool(settings.database_url, size=4)
    yield p
    await p.close()


async def _grouped(db: asyncpg.Connection) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for r in await db.fetch(
        "SELECT campaign_id, status, count(*) AS n FROM recipient GROUP BY 1, 2"
    ):
        out.setdefault(r["campaign_id"], {})[r["status"]] = r["n"]
    return out


async def _kept(db: asyncpg.Connection) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for r in await db.fetch("SELECT * FROM campaign_counts"):
        counts = {k: v for k, v in dict(r).items() if k != "campaign_id" and v != 0}
        if counts:
            out[r["campaign_id"]] = counts
    return out


async def _campaign(db: asyncpg.Connection, name: str) -> int:
    cid: int = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
        " updated_at) VALUES ('o', $1, 's', 'b', 'sending', $2, $2) RETURNING id",
        name,
        T0,
    )
    await db.execute("INSERT INTO queue_entry (campaign_id, queued_at) VALUES ($1, $2)", cid, T0)
    return cid


def _outcome(r: Any, status: str) -> Outcome:
    return Outcome(
        recipient_id=r.id,
        email=r.email,
        status=status,
        message_id=f"<m{r.id}>",
        answer="451 later" if status == "transient" else "250 ok",
        error="550 no" if status == "failed" else ("451 later" if status == "transient" else None),
        took_ms=1.0,
    )


async def test_kept_counts_equal_a_group_by_after_a_mix_of_every_status_change(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    rnd = random.Random(11)
    store = PgStore(pool, max_transient_attempts=2)
    api = ApiStore(pool)
    cids = [await _campaign(db, "a"), await _campaign(db, "b")]
    leases: dict[int, Lease] = {}
    claimed: dict[int, list[Any]] = {c: [] for c in cids}
    now = T0
    next_email = 0
    epoch_owner = 0

    async def take(cid: int) -> None:
        nonlocal epoch_owner
        epoch_owner += 1
        lease = await store.acquire(
            cid, f"p{epoch_owner}", until=now + timedelta(milliseconds=500), now=now, fence=0
        )
        assert lease is not None
        await store.begin_sending(lease, now)  # a takeover: orphans to doubt or pending
        leases[cid] = lease
        claimed[cid] = []

    for cid in cids:
        await take(cid)
    await db.execute(
        "INSERT INTO unsubscribe (email, source, created_at) VALUES ($1, 'api', $2)",
        "u3@example.org",
        T0,
    )

    for _step in range(150):
        now += timedelta(seconds=1)
        cid = rnd.choice(cids)
        lease = leases[cid]
        op = rnd.choice(
            [
                "add",
                "add",
                "claim",
                "claim",
                "hand",
                "record",
                "record",
                "release",
                "takeover",
                "reconcile",
                "remove",
            ]
        )
        if op == "add":
            rows = []
            for _ in range(rnd.randint(1, 12)):
                next_email += 1
                rows.append((f"u{next_email}@example.org", None, {}))
            rows.append(rows[0])  # a duplicate collapses

            async def add(tx: Locked, rows: list[Any] = rows, at: datetime = now) -> int:
                return await tx.add_recipients(rows, at)

            await api.locked(cid, add)
        elif op == "claim":
            mine, _ = await store.claim(lease, rnd.randint(1, 6), now)
            claimed[cid] += mine
        elif op == "hand" and claimed[cid]:
            await store.hand(lease, [r.id for r in claimed[cid]], now)
        elif op == "record" and claimed[cid]:
            batch, claimed[cid] = claimed[cid][:4], claimed[cid][4:]
            await store.hand(lease, [r.id for r in batch], now)
            await store.record(
                lease,
                [_outcome(r, rnd.choice(["sent", "sent", "failed", "transient"])) for r in batch],
                now,
            )
        elif op == "release" and claimed[cid]:
            await store.release_claims(lease, [r.id for r in claimed[cid]], now)
            claimed[cid] = []
        elif op == "takeover":
            await take(cid)
        elif op == "reconcile":
            # Rows left under an old claim token: what a claim racing a takeover leaves.
            await db.execute(
                "UPDATE recipient SET status = 'sending', claimed_by = 'gone#0',"
                " claimed_at = $2::timestamptz,"
                " handed_at = CASE WHEN id % 2 = 0 THEN $2 END"
                " WHERE id IN (SELECT id FROM recipient WHERE campaign_id = $1"
                " AND status = 'pending' ORDER BY id LIMIT 2)",
                cid,
                now,
            )
            assert await store.renew(lease, now + timedelta(milliseconds=500))
            await store.settle_stale_claims(now, fence=0)
        elif op == "remove":
            emails = [f"u{rnd.randint(1, max(next_email, 1))}@example.org" for _ in range(3)]

            async def remove(tx: Locked, emails: list[str] = emails) -> object:
                return await tx.remove_pending(emails)

            await api.locked(cid, remove)
        assert await _kept(db) == await _grouped(db), f"after {op}"

    # The reads agree with the table.
    grouped = await _grouped(db)
    for cid in cids:
        assert await store.counts(cid) == grouped.get(cid, {})
        view = await store.view(cid)
        assert view is not None and view.counts == grouped.get(cid, {})

        async def size(tx: Locked) -> int:
            return await tx.recipients_count()

        assert await api.locked(cid, size) == sum(grouped.get(cid, {}).values())
    listed = await api.list_campaigns(owner_id="o", statuses=[], cursor=None, limit=10)
    assert {v.id: v.counts for v in listed} == {c: grouped.get(c, {}) for c in cids}

    # Retention removes a campaign's recipients in batches; deletion removes the rest.
    await db.execute("UPDATE campaign SET status = 'sent' WHERE id = $1", cids[0])
    await db.execute(Q["retention-recipients"], cids[0], 7)
    assert await _kept(db) == await _grouped(db)
    await db.execute("DELETE FROM campaign WHERE id = $1", cids[1])
    assert await _kept(db) == await _grouped(db)
    assert (
        await db.fetchval("SELECT count(*) FROM campaign_counts WHERE campaign_id = $1", cids[1])
        == 0
    )
