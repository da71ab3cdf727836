"""The concurrent governor: requests served at once, Redis batched, the quota in blocks.

Two governors (each its own NATS connection, Redis client and PostgreSQL pool, as two
processes have) answer hundreds of requests a second from many askers at once, so that
reservations are batched and the quota is taken in blocks larger than a request. Every
limit must still land exactly: never a token over, none lost once the governors stop and
give their blocks back.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from mailer.actors.governor import NatsTokenSource
from mailer.clock import FakeClock
from mailer.db import connect_pool
from mailer.quota import PgQuota, ProviderReading, QuotaBlocks
from tests.test_governor import MONDAY_1315_MSK, counter, day_key, governor, hour_key

ASKERS = 32
REQUESTS = 1500


@pytest.mark.parametrize("binding", ["hour", "day", "quota"])
async def test_two_governors_hammered_keep_every_limit_exact(
    settings, redis_client, db, binding: str
) -> None:
    limits: dict[str, Any] = {"rate_per_hour": 100_000, "daily_limit_default": 0}
    quota = 100_000
    if binding == "hour":
        limits["rate_per_hour"] = 901
    elif binding == "day":
        limits["daily_limits"] = "anna=433"
    else:
        quota = 777
    await db.execute("UPDATE quota SET emails_available = $1", quota)
    rng = random.Random(binding)
    asks = [(rng.choice(["anna", "boris"]), rng.choice([1, 1, 1, 2, 3])) for _ in range(REQUESTS)]
    clock = FakeClock(MONDAY_1315_MSK)
    granted: list[tuple[str, int]] = []
    async with (
        governor(settings, clock, **limits) as g1,
        governor(settings, clock, **limits) as g2,
    ):
        sources = [NatsTokenSource(g.bus, timeout=30) for g in (g1, g2)]
        queue = list(enumerate(asks))

        async def asker(k: int) -> None:
            # Each asker keeps one request in flight, like a requester of the bench.
            while queue:
                i, (owner, want) = queue.pop()
                reply = await sources[(i + k) % 2].request_tokens(i + 1, owner, want)
                granted.append((owner, reply.granted))

        await asyncio.gather(*(asker(k) for k in range(ASKERS)))
        assert g1.actor.handled > 0 and g2.actor.handled > 0
        # Blocks were in use: at this rate the quota is not taken request by request.
        assert await db.fetchval("SELECT max(size) FROM quota_block") > 3
    # Both governors stopped: every block is closed and its unused rest returned.
    assert await db.fetchval("SELECT count(*) FROM quota_block WHERE closed_at IS NULL") == 0

    got = {"anna": 0, "boris": 0}
    for owner, n in granted:
        got[owner] += n
    asked = {o: sum(w for owner, w in asks if owner == o) for o in got}
    total = sum(got.values())
    if binding == "hour":
        assert total == 901
    elif binding == "day":
        assert got["anna"] == 433
        assert got["boris"] == asked["boris"]
    else:
        assert total == 777
    assert await counter(redis_client, hour_key(settings, MONDAY_1315_MSK)) == total
    assert await counter(redis_client, day_key(settings, "anna", "20261123")) == got["anna"]
    assert await counter(redis_client, day_key(settings, "boris", "20261123")) == got["boris"]
    # The ledger agrees: what the blocks say was granted is what the askers got.
    assert await db.fetchval("SELECT COALESCE(sum(granted), 0) FROM quota_block") == total
    assert await db.fetchval("SELECT emails_available FROM quota") == quota - total


# --- blocks, a crash and a sync ------------------------------------------------------------


@pytest.fixture
async def pool(settings) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_pool(settings.database_url, size=4)
    yield p
    await p.close()


async def busy(blocks: QuotaBlocks, requests: int) -> int:
    """As many single-token takes as a busy governor serves: blocks larger than one."""
    got = 0
    for _ in range(requests):
        got += await blocks.take(1)
    return got


async def killed(blocks: QuotaBlocks) -> None:
    """The holder stops here as if killed: what it had in flight lands, nothing more runs."""
    if blocks._timer is not None:
        blocks._timer.cancel()
        blocks._timer = None
    if blocks._refill is not None:
        await asyncio.gather(blocks._refill, return_exceptions=True)
    await asyncio.gather(*blocks._closing)


async def test_a_sync_holds_back_live_blocks_and_a_crashed_holders_rest_comes_back_later(
    pool, db
) -> None:
    await db.execute("UPDATE quota SET emails_available = 1000")
    crashed = QuotaBlocks(pool, holder="crashed")
    assert await busy(crashed, 200) == 200
    await killed(crashed)
    held = await db.fetchval("SELECT sum(size - granted) FROM quota_block WHERE closed_at IS NULL")
    assert held > 0  # taken ahead of the requests, not yet granted
    # Nothing is lost or made up: the allowance less what is held in blocks (granted
    # or not) is what is left.
    in_blocks = await db.fetchval("SELECT sum(size) FROM quota_block")
    assert await db.fetchval("SELECT emails_available FROM quota") == 1000 - in_blocks
    # The holder died there (no release). A sync of the provider's 800 left must not
    # hand its live blocks' rest to another governor: they are subtracted.
    now = datetime.now(UTC)
    quota = PgQuota(pool)
    _, state = await quota.record_sync(ProviderReading(emails_available=800), now)
    assert state.emails_available == 800 - held
    # Once the blocks expire they are dead: the next sync counts their rest back in.
    await db.execute("UPDATE quota_block SET expires_at = now() - interval '1 second'")
    _, state = await quota.record_sync(ProviderReading(emails_available=800), now)
    assert state.emails_available == 800
    # A dead block cannot be returned late (it would be counted twice).
    for block in list(crashed._blocks):
        crashed._blocks.remove(block)
        crashed._retire(block)
    await asyncio.gather(*crashed._closing)
    assert await db.fetchval("SELECT emails_available FROM quota") == 800


async def test_two_holders_never_take_more_than_the_allowance(pool, db) -> None:
    await db.execute("UPDATE quota SET emails_available = 500")
    a, b = QuotaBlocks(pool, holder="a"), QuotaBlocks(pool, holder="b")
    got = await asyncio.gather(busy(a, 400), busy(b, 400))
    # Never more than the allowance. Fewer is possible: one holder may be refused
    # while the other still holds an unused rest (a refusal then waits for the
    # block's return, which lifts quota waits: the test after next).
    assert sum(got) <= 500
    await asyncio.gather(a.release(), b.release())
    # Nothing lost: what was not granted is back in the allowance, and the ledger
    # knows every grant.
    left = await db.fetchval("SELECT emails_available FROM quota")
    assert sum(got) + left == 500
    assert await db.fetchval("SELECT sum(granted) FROM quota_block") == sum(got)
    c = QuotaBlocks(pool, holder="c")
    assert await busy(c, left + 10) == left
    await c.release()
    assert await db.fetchval("SELECT emails_available FROM quota") == 0
    assert await db.fetchval("SELECT sum(granted) FROM quota_block") == 500


async def test_a_quiet_governor_takes_exactly_what_it_grants(pool, db) -> None:
    await db.execute("UPDATE quota SET emails_available = 100")
    blocks = QuotaBlocks(pool, holder="quiet")
    assert await blocks.take(7) == 7
    assert await blocks.take(5) == 5
    # Two requests: no block larger than asked, nothing held.
    assert await db.fetchval("SELECT emails_available FROM quota") == 88
    assert await db.fetchval("SELECT sum(size) FROM quota_block") == 12
    await blocks.release()
    assert await db.fetchval("SELECT emails_available FROM quota") == 88


async def test_a_block_returned_to_an_empty_allowance_lifts_the_quota_waits(pool, db) -> None:
    await db.execute("UPDATE quota SET emails_available = 300")
    lifted = asyncio.Event()

    async def restored() -> None:
        lifted.set()

    holder = QuotaBlocks(pool, holder="h", on_restored=restored)
    await busy(holder, 100)
    assert await db.fetchval("SELECT sum(size - granted) FROM quota_block") > 0
    # Another governor takes what is left: the allowance is 0 while blocks are held.
    other = QuotaBlocks(pool, holder="o")
    assert await other.take(1000) > 0
    assert await db.fetchval("SELECT emails_available FROM quota") == 0
    await holder.release()
    assert await db.fetchval("SELECT emails_available FROM quota") > 0
    await asyncio.wait_for(lifted.wait(), 5)


async def test_each_accounts_blocks_come_from_and_go_back_to_its_own_row(pool, db) -> None:
    # Several SMTP accounts (issue 12) with quota blocks (issue 11): a block is taken
    # from its account's quota row and its rest goes back there, never to another's.
    await db.execute("UPDATE quota SET emails_available = 100 WHERE account = ''")
    await PgQuota(pool, "backup").ensure(50)
    backup = QuotaBlocks(pool, holder="b", account="backup")
    assert await busy(backup, 80) == 50  # its own 50, not the default's 100
    assert await db.fetchval("SELECT emails_available FROM quota WHERE account = ''") == 100
    await backup.release()
    default = QuotaBlocks(pool, holder="d")
    assert await busy(default, 30) == 30
    await default.release()
    rows = dict(await db.fetch("SELECT account, emails_available FROM quota"))
    assert rows == {"": 70, "backup": 0}
    ledger = dict(await db.fetch("SELECT account, sum(granted) FROM quota_block GROUP BY 1"))
    assert ledger == {"": 30, "backup": 50}
