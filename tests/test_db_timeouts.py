"""No PostgreSQL call waits for ever (issue 7): a stalled statement raises within
``database_statement_timeout_seconds``, and the actor that made it crashes and is
restarted by its supervisor, as for any database error.

Stalls are real: a table lock held by another connection, ``pg_sleep``, a pool
whose every connection is taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import REGISTRY

from mailer.db import Q, connect_pool
from tests.helpers import Crm, Events, people

TIMEOUT = 0.5


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_pool(database_url, size=2, statement_timeout=TIMEOUT)
    yield p
    p.terminate()


async def test_a_long_statement_is_cancelled_by_the_server(pool: asyncpg.Pool) -> None:
    began = time.monotonic()
    with pytest.raises(asyncpg.QueryCanceledError):
        await pool.fetchval("SELECT pg_sleep(30)")
    assert time.monotonic() - began < TIMEOUT + 1.5


async def test_a_statement_waiting_for_a_lock_raises(pool: asyncpg.Pool, db) -> None:
    async with db.transaction():
        # recipients-counts reads the counts the triggers keep (migration 0009).
        await db.execute("LOCK TABLE campaign_counts IN ACCESS EXCLUSIVE MODE")
        began = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError):
            await pool.fetch(Q["recipients-counts"], 1)
        assert time.monotonic() - began < TIMEOUT + 1.5


async def test_waiting_for_a_pool_connection_raises(pool: asyncpg.Pool) -> None:
    async with pool.acquire(), pool.acquire():  # both connections taken
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.fetchval("SELECT 1")
        assert time.monotonic() - began < TIMEOUT + 1.5


def _campaign_restarts() -> float:
    value = REGISTRY.get_sample_value("mailer_actor_restarts_total", {"actor": "campaign"})
    return value or 0.0


class _Crashes(logging.Handler):
    """Sets ``seen`` when the service logs the crash of an actor named ``actor``..."""

    def __init__(self, actor: str) -> None:
        super().__init__()
        self.actor = actor
        self.seen = asyncio.Event()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "actor crashed" and str(getattr(record, "actor", "")).startswith(
            self.actor
        ):
            self.errors.append(str(getattr(record, "error", "")))
            self.seen.set()


async def test_a_campaign_actor_stalled_on_a_lock_crashes_and_is_restarted(
    make_service, crm: Crm, events: Events, sink, db, database_url: str
) -> None:
    locker = await asyncpg.connect(database_url)
    locked = asyncio.Event()

    async def lock_after_first_batch(campaign_id: int, batch: int) -> None:
        # Batch 1 went out; before it is recorded another session locks the table.
        if batch == 1 and not locked.is_set():
            await locker.execute("BEGIN; LOCK TABLE recipient IN ACCESS EXCLUSIVE MODE")
            locked.set()

    before = _campaign_restarts()
    crashes = _Crashes("campaign-")
    logging.getLogger("mailer.service").addHandler(crashes)
    await make_service(
        batch_size=5, database_statement_timeout_seconds=TIMEOUT, fault=lock_after_first_batch
    )
    recipients = people(12)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    await asyncio.wait_for(locked.wait(), 20)
    try:
        # The record times out instead of hanging: the actor crashes.
        await asyncio.wait_for(crashes.seen.wait(), 20)
    finally:
        await locker.execute("ROLLBACK")
        await locker.close()
        logging.getLogger("mailer.service").removeHandler(crashes)
    assert "QueryCanceledError" in crashes.errors[0]

    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    assert _campaign_restarts() > before  # restarted in place by its supervisor
    counts = (await crm.get(cid))["counts"]
    # Batch 1 was accepted and never recorded: in doubt, never sent twice.
    assert counts.get("in_doubt", 0) <= 5 and counts.get("pending", 0) == 0, counts
    assert counts.get("sent", 0) + counts.get("in_doubt", 0) == 12, counts
    assert done["event"] == ("sent" if counts == {"sent": 12} else "completed_with_errors")
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert received == Counter(r["email"] for r in recipients), "each exactly once"
