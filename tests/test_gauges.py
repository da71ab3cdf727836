"""Scrape-time gauges (mailer/gauges.py): backlog, why campaigns wait, quota, the hour used."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from mailer.clock import FakeClock, SystemClock
from mailer.gauges import ScrapeGauges
from mailer.metrics import WAITING_REASONS
from mailer.ratelimit import SendLimiter


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert p is not None
    yield p
    await p.close()


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def _seed(db: asyncpg.Connection) -> None:
    """One campaign in every state the gauges tell apart (pending recipients in brackets)."""
    await db.execute(
        """
        INSERT INTO campaign (id, owner_id, name, subject, body_text, status, created_at,
                              updated_at)
        VALUES (1, 'm', 'queued', 's', 'b', 'ready', now(), now()),
               (2, 'm', 'next hour', 's', 'b', 'sending', now(), now()),
               (3, 'm', 'paused', 's', 'b', 'paused', now(), now()),
               (4, 'm', 'breaker', 's', 'b', 'sending', now(), now()),
               (5, 'm', 'running', 's', 'b', 'sending', now(), now()),
               (6, 'm', 'finished', 's', 'b', 'sent', now(), now()),
               (7, 'm', 'draft', 's', 'b', 'draft', now(), now()),
               (8, 'm', 'night over', 's', 'b', 'sending', now(), now()),
               (9, 'm', 'unrenderable', 's', 'b', 'paused', now(), now());
        INSERT INTO recipient (campaign_id, email, status, created_at, updated_at)
        SELECT c, 'r' || c || '-' || i || '@example.org', 'pending', now(), now()
        FROM (VALUES (1, 3), (2, 2), (3, 4), (4, 1), (5, 5), (6, 0), (7, 6), (8, 1),
                     (9, 2)) v(c, n),
             generate_series(1, v.n) i;
        INSERT INTO recipient (campaign_id, email, status, sent_at, created_at, updated_at)
        VALUES (5, 'done@example.org', 'sent', now(), now(), now());
        INSERT INTO queue_entry (campaign_id, queued_at, completed_at, defer_reason,
                                 deferred_until, lease_owner, lease_until)
        VALUES (1, now(), NULL, NULL, NULL, NULL, NULL),
               (2, now(), NULL, 'rate_per_hour', now() + interval '30 minutes', NULL, NULL),
               (3, now(), NULL, 'paused', NULL, NULL, NULL),
               (4, now(), NULL, 'circuit_breaker', NULL, NULL, NULL),
               (5, now(), NULL, NULL, NULL, 'pod-a', now() + interval '30 seconds'),
               (6, now(), now(), NULL, NULL, NULL, NULL),
               (8, now(), NULL, 'outside_hours', now() - interval '1 minute', NULL, NULL),
               (9, now(), NULL, 'render_error', NULL, NULL, NULL);
        UPDATE quota SET emails_available = 1234;
        """
    )


async def test_gauges_read_the_database_and_redis(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis_client: redis.Redis, settings
) -> None:
    await _seed(db)
    clock = SystemClock()
    limiter = SendLimiter(
        redis_client, key_prefix=settings.redis_key_prefix, account="smtp.test", hourly_limit=100
    )
    await redis_client.set(limiter.hour_key(clock.now()), 7)
    gauges = ScrapeGauges(
        pool=pool,
        redis_client=redis_client,
        nats_connected=lambda: True,
        hour_key=limiter.hour_key,
        account="smtp.test",
        hourly_limit=100,
        clock=clock,
    )
    await gauges.refresh()

    # Started and unfinished: 1, 2, 3, 4, 5, 8, 9 (not the finished one, not the draft).
    assert _value("mailer_recipients_pending") == 3 + 2 + 4 + 1 + 5 + 1 + 2
    # May send now: queued, running, and the one whose night is over.
    assert _value("mailer_recipients_sendable") == 3 + 5 + 1
    waiting = {r: _value("mailer_campaigns_waiting", reason=r) for r in WAITING_REASONS}
    assert waiting == {
        "queued": 2,  # 1 and 8; 5 holds a live lease: it is being sent, not waiting
        "rate_per_hour": 1,
        "quota_exhausted": 0,
        "outside_hours": 0,
        "daily_limit": 0,
        "transient_error": 0,
        "circuit_breaker": 1,
        "render_error": 1,
        "paused": 1,
        "scheduled": 0,
    }
    assert _value("mailer_quota_emails_available", account="smtp.test") == 1234
    assert _value("mailer_rate_hour_used", account="smtp.test") == 7
    assert _value("mailer_rate_hour_limit", account="smtp.test") == 100
    for dependency in ("postgres", "redis", "nats"):
        assert _value("mailer_dependency_up", dependency=dependency) == 1


async def test_gauges_keep_their_values_and_mark_the_dependency_down_when_a_read_fails(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis_client: redis.Redis
) -> None:
    await _seed(db)
    clock = FakeClock(SystemClock().now())
    gauges = ScrapeGauges(
        pool=pool,
        redis_client=redis_client,
        nats_connected=lambda: False,
        hour_key=lambda now: "gauges-test-hour",
        account="smtp.test",
        hourly_limit=100,
        clock=clock,
        min_interval=0.0,
    )
    await gauges.refresh()
    assert _value("mailer_recipients_sendable") == 9
    assert _value("mailer_dependency_up", dependency="nats") == 0
    # An hour later the rate_per_hour deferral is over: its recipients may be sent.
    clock.advance(timedelta(hours=1))
    await gauges.refresh()
    assert _value("mailer_recipients_sendable") == 11

    await pool.close()
    await gauges.refresh()
    assert _value("mailer_dependency_up", dependency="postgres") == 0
    assert _value("mailer_recipients_sendable") == 11  # the last reading, not a made-up 0


async def test_scrapes_close_together_share_one_reading(
    db: asyncpg.Connection, pool: asyncpg.Pool, redis_client: redis.Redis
) -> None:
    gauges = ScrapeGauges(
        pool=pool,
        redis_client=redis_client,
        nats_connected=lambda: True,
        hour_key=lambda now: "gauges-test-hour",
        account="smtp.test",
        hourly_limit=100,
        clock=SystemClock(),
        min_interval=60.0,
    )
    await gauges.refresh()
    assert _value("mailer_recipients_pending") == 0
    await _seed(db)
    await gauges.refresh()
    assert _value("mailer_recipients_pending") == 0  # within min_interval: not read again
