"""recipient.campaign_id without a per-row foreign key (migration 0017): the same rules,
checked once a statement."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


async def _campaign(db: asyncpg.Connection) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
            " updated_at) VALUES ('o', 'n', 's', 'b', 'draft', $1, $1) RETURNING id",
            T0,
        )
    )


async def _add(db: asyncpg.Connection, cid: int, *emails: str) -> None:
    await db.executemany(
        "INSERT INTO recipient (campaign_id, email, created_at, updated_at)"
        " VALUES ($1, $2, $3, $3)",
        [(cid, e, T0) for e in emails],
    )


async def test_a_recipient_of_no_campaign_is_refused_with_the_keys_error(db) -> None:
    cid = await _campaign(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="recipient_campaign_id_fkey"):
        await db.execute(
            "INSERT INTO recipient (campaign_id, email, created_at, updated_at)"
            " VALUES ($1, 'a@example.org', $3, $3), ($2, 'b@example.org', $3, $3)",
            cid,
            cid + 1000,
            T0,
        )
    assert await db.fetchval("SELECT count(*) FROM recipient") == 0


async def test_a_recipient_stays_in_its_campaign(db) -> None:
    a, b = await _campaign(db), await _campaign(db)
    await _add(db, a, "a@example.org")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute("UPDATE recipient SET campaign_id = $1", b)
    # Other updates go on as before.
    await db.execute("UPDATE recipient SET name = 'A'")


async def test_deleting_a_campaign_deletes_its_recipients_only(db) -> None:
    a, b = await _campaign(db), await _campaign(db)
    await _add(db, a, "a@example.org", "b@example.org")
    await _add(db, b, "c@example.org")
    await db.execute("DELETE FROM campaign WHERE id = $1", a)
    assert await db.fetch("SELECT campaign_id, email FROM recipient") == [(b, "c@example.org")]


async def test_an_insert_holds_its_campaign_until_it_commits(db, database_url) -> None:
    cid = await _campaign(db)
    other = await asyncpg.connect(database_url)
    try:
        tx = db.transaction()
        await tx.start()
        await _add(db, cid, "a@example.org")
        # A delete of the campaign waits for the insert's transaction, as with the key...
        delete = asyncio.ensure_future(other.execute("DELETE FROM campaign WHERE id = $1", cid))
        done, _ = await asyncio.wait({delete}, timeout=0.5)
        assert not done
        await tx.commit()
        await delete
        # ...and then takes the recipients with it.
        assert await db.fetchval("SELECT count(*) FROM recipient") == 0
    finally:
        await other.close()
