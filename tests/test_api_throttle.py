"""API throttles: 10 starts and 5 test emails per manager per hour, failing closed."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as redis

from mailer.clock import FakeClock
from mailer.errors import Throttled, Unavailable
from mailer.throttle import Throttle
from tests.helpers import Crm, people

NOW = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
UNAVAILABLE = "Сервис временно недоступен. Попробуйте позже."


def _dead_redis_url() -> str:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_eleventh_start_in_an_hour_is_refused(
    make_service, crm: Crm, redis_client, settings
) -> None:
    clock = FakeClock(NOW)
    await make_service(clock=clock)
    campaigns = [await crm.campaign(people(1, f"d{i}.example")) for i in range(12)]
    # A refused start (here: an empty campaign) does not use up the hour.
    empty = await crm.campaign([])
    assert (await crm.fails("campaign.start", {"campaign_id": empty})).code == "empty_campaign"
    for cid in campaigns[:10]:
        await crm.start(cid)
    err = await crm.fails("campaign.start", {"campaign_id": campaigns[10]})
    assert err.code == "throttled" and err.status == 429
    assert err.message == (
        "Слишком много запусков рассылок: не больше 10 в час. Попробуйте снова через 60 мин."
    )
    assert (await crm.get(campaigns[10]))["status"] == "draft"
    err = await crm.fails("campaign.start", {"campaign_id": campaigns[10]}, lang="en")
    assert err.message == "Too many campaign starts: at most 10 per hour. Try again in 60 min."
    key = f"{settings.redis_key_prefix}throttle:start:manager-1"
    assert await redis_client.zcard(key) == 10
    # An hour later the manager may start again.
    clock.advance(timedelta(hours=1, seconds=1))
    await crm.start(campaigns[10])


async def test_throttle_window_is_atomic_and_per_user(redis_client, settings) -> None:
    throttle = Throttle(
        redis_client, key_prefix=settings.redis_key_prefix, action="start", limit=10
    )
    decisions = await asyncio.gather(*(throttle.hit("anna", NOW) for _ in range(30)))
    assert sum(d.allowed for d in decisions) == 10
    assert (await throttle.hit("boris", NOW)).allowed
    with pytest.raises(Throttled) as caught:
        await throttle.check("anna", NOW + timedelta(minutes=30))
    assert caught.value.values["minutes"] == 30


async def test_throttles_fail_closed_when_redis_is_down(make_service, crm: Crm) -> None:
    dead = redis.Redis.from_url(_dead_redis_url(), socket_connect_timeout=1.0)
    try:
        throttle = Throttle(dead, key_prefix="t:", action="test_email", limit=5)
        with pytest.raises(Unavailable) as caught:
            await throttle.check("anna", NOW)
        assert caught.value.code == "throttle_backend_unavailable"
    finally:
        await dead.aclose()

    # The whole service on a Redis nobody answers: both throttled requests refuse.
    clock = FakeClock(NOW)
    await make_service(clock=clock, redis_url=_dead_redis_url())
    cid = await crm.campaign(people(1))
    err = await crm.fails("campaign.start", {"campaign_id": cid})
    assert err.code == "throttle_backend_unavailable" and err.status == 503
    assert err.message == UNAVAILABLE
    err = await crm.fails("campaign.test", {"campaign_id": cid, "email": "me@example.org"})
    assert err.code == "throttle_backend_unavailable" and err.message == UNAVAILABLE
    assert (await crm.get(cid))["status"] == "draft"
