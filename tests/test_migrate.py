"""``migrate()``: idempotent, and serialized across processes by its advisory lock.

Each test runs on a fresh, empty database of the session's PostgreSQL (not the
migrated template), dropped afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from mailer.db import MIGRATION_LOCK_KEY, _migrations, migrate
from mailer.devstack import EmbeddedStack, create_database, drop_database

_ids = itertools.count(1)
ALL_VERSIONS = [version for version, _, _ in _migrations()]


@pytest.fixture
async def empty_db(stack: EmbeddedStack) -> AsyncIterator[str]:
    name = f"m{os.getpid()}_{next(_ids)}"
    admin = stack.endpoints.database_url
    dsn = await create_database(admin, name)
    yield dsn
    await drop_database(admin, name)


async def _recorded(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migration ORDER BY version")
    finally:
        await conn.close()
    return [r["version"] for r in rows]


async def test_migrate_twice_applies_nothing_the_second_time(empty_db: str) -> None:
    assert len(ALL_VERSIONS) >= 2
    assert await migrate(empty_db) == ALL_VERSIONS
    assert await migrate(empty_db) == []
    assert await _recorded(empty_db) == ALL_VERSIONS
    conn = await asyncpg.connect(empty_db)
    try:
        # The schema is really there, not just its record.
        assert await conn.fetchval("SELECT to_regclass('campaign') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('leader_fence') IS NOT NULL")
        # And the lock was given back: another session takes it at once.
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _waiting_on_advisory_lock(conn: asyncpg.Connection, n: int) -> None:
    """Returns once ``n`` other sessions of this database wait on an advisory lock.

    pg_stat_activity has no notification to wait on, so this looks every 20 ms.
    """
    async with asyncio.timeout(10):
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND wait_event = 'advisory' "
                "AND pid <> pg_backend_pid()"
            )
            if waiting >= n:
                return
            await asyncio.sleep(0.02)


async def test_two_migrations_at_once_apply_each_version_exactly_once(empty_db: str) -> None:
    # Hold the migrations' lock, so that both migrate() calls are surely in flight
    # together before either does anything; then let them race.
    holder = await asyncpg.connect(empty_db)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        both = asyncio.gather(migrate(empty_db), migrate(empty_db), return_exceptions=True)
        try:
            await _waiting_on_advisory_lock(holder, 2)
            # Neither got past the lock: nothing created yet.
            created_early = await holder.fetchval("SELECT to_regclass('schema_migration')")
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            results = await asyncio.wait_for(both, timeout=30)
    finally:
        await holder.close()

    assert created_early is None
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors
    # One of them applied everything, the other found it done; both succeeded.
    assert sorted(results) == [[], ALL_VERSIONS]
    assert await _recorded(empty_db) == ALL_VERSIONS
