"""A Redis that lost its data does not reset the hour and the day.

The hour's and the managers' days' counters live in Redis only. When Redis
comes back empty, a missing counter would restart at 0 and let up to a whole
second hour (and day) through. The governor rebuilds such a counter from the
send log (every attempt spent one token) in the same Lua script that
reserves, logs it at WARNING and counts it in
``mailer_rate_counter_rebuilds_total{window}``. A window that is merely new
(the previous window's counter is still there) starts at 0 without asking.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as redis

from mailer.clock import FakeClock
from tests.helpers import Crm, Events, people
from tests.test_governor import counter, day_key, governor, hour_key, sample

MONDAY_1015_UTC = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)  # 13:15 in Moscow


async def _lose_redis_data(client: redis.Redis, prefix: str) -> int:
    """What an empty restart does to this test's keys: they are all gone."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    return int(await client.delete(*keys)) if keys else 0


async def test_after_redis_lost_its_data_only_the_rest_of_the_hour_is_sent(
    make_service, crm: Crm, events: Events, sink, redis_client, settings, caplog
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(clock=clock, rate_per_hour=10, batch_size=5)
    first = await crm.campaign(people(4))
    await crm.start(first)
    await events.wait(first, ("sent",))
    assert await counter(redis_client, hour_key(settings, clock.now())) == 4

    assert await _lose_redis_data(redis_client, settings.redis_key_prefix) > 0
    rebuilt_hours = sample("mailer_rate_counter_rebuilds_total", window="hour")
    rebuilt_days = sample("mailer_rate_counter_rebuilds_total", window="day")
    caplog.set_level(logging.WARNING, logger="mailer.ratelimit")

    second = await crm.campaign(people(10, start=100))
    await crm.start(second)
    deferred = await events.wait(second, ("deferred",))
    assert deferred["defer_reason"] == "rate_per_hour"
    assert (await crm.get(second))["counts"] == {"sent": 6, "pending": 4}
    assert len(sink.messages) == 10  # the hour's limit, not 4 + 10
    assert await counter(redis_client, hour_key(settings, clock.now())) == 10
    assert await counter(redis_client, day_key(settings, "manager-1", "20261123")) == 10
    assert sample("mailer_rate_counter_rebuilds_total", window="hour") == rebuilt_hours + 1
    assert sample("mailer_rate_counter_rebuilds_total", window="day") == rebuilt_days + 1
    warnings = [r for r in caplog.records if r.name == "mailer.ratelimit"]
    assert {r.__dict__["window"] for r in warnings} == {"hour", "day"}
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert {r.__dict__["rate_limit_count"] for r in warnings} == {4}


async def _sends(db, owner: str, at: datetime, n: int, *, status: str = "sent") -> None:
    """n send-log rows of a campaign of ``owner`` at ``at``."""
    cid = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
        " updated_at) VALUES ($1, 'c', 's', 'b', 'sending', $2, $2) RETURNING id",
        owner,
        at,
    )
    await db.executemany(
        "INSERT INTO send_log (campaign_id, email, status, created_at) VALUES ($1, $2, $3, $4)",
        [(cid, f"u{i}@example.org", status, at) for i in range(n)],
    )


@pytest.mark.parametrize("status", ["sent", "failed", "in_doubt", "transient"])
async def test_every_spent_token_of_the_log_counts_in_a_rebuild(
    settings, redis_client, db, status: str
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    # Earlier today (Moscow) and in this hour: 3 + 2 of anna's attempts, 1 of boris's.
    await _sends(db, "anna", MONDAY_1015_UTC - timedelta(hours=2), 3, status=status)
    await _sends(db, "anna", MONDAY_1015_UTC - timedelta(minutes=5), 2, status=status)
    await _sends(db, "boris", MONDAY_1015_UTC - timedelta(minutes=1), 1, status=status)
    # Yesterday (Moscow) and the previous hour do not count.
    await _sends(db, "anna", datetime(2026, 11, 22, 20, 59, tzinfo=UTC), 7)
    async with governor(settings, clock, rate_per_hour=10, daily_limits="anna=8") as gov:
        got = await gov.ask(10)
        # The day has 8 - 5 left, the hour 10 - 3: the day binds.
        assert (got.granted, got.daily_sent, got.used) == (3, 8, 6)
        assert (await gov.ask(1)).reason == "daily_limit"
    assert await counter(redis_client, hour_key(settings, MONDAY_1015_UTC)) == 6
    assert await counter(redis_client, day_key(settings, "anna", "20261123")) == 8


async def test_a_new_window_starts_at_zero_and_a_live_counter_is_kept(
    settings, redis_client, db
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    rebuilds = sample("mailer_rate_counter_rebuilds_total", window="hour")
    async with governor(settings, clock, rate_per_hour=10) as gov:
        assert (await gov.ask(2)).granted == 2  # nothing in the log: nothing to rebuild
        # Sends recorded after the hour turned, of a batch granted before it:
        # the new hour is not charged with them while the last hour's counter
        # is there (Redis kept its data).
        clock.set(datetime(2026, 11, 23, 11, 0, 1, tzinfo=UTC))
        await _sends(db, "anna", clock.now(), 2)
        assert (await gov.ask(10)).granted == 10
        # A live counter is Redis's own count: the log does not overwrite it.
        await _sends(db, "anna", clock.now(), 5)
        assert (await gov.ask(1)).reason == "rate_per_hour"
    assert sample("mailer_rate_counter_rebuilds_total", window="hour") == rebuilds
