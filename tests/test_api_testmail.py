"""Test emails: through the governor and the SMTP sender actor, logged, throttled."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta

from mailer.clock import FakeClock
from mailer.ratelimit import SendLimiter
from tests.helpers import Crm

NOW = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)  # Monday, 13:15 MSK


def _hour_key(settings, redis_client, now: datetime) -> str:
    limiter = SendLimiter(
        redis_client,
        key_prefix=settings.redis_key_prefix,
        account=settings.smtp_account,
        hourly_limit=settings.rate_per_hour,
    )
    return limiter.hour_key(now)


async def test_test_email_is_sent_logged_and_counted(
    make_service, crm: Crm, sink, db, redis_client, settings
) -> None:
    clock = FakeClock(NOW)
    await make_service(clock=clock)
    cid = await crm.campaign([], subject="Новости недели")
    key = _hour_key(settings, redis_client, NOW)
    assert await redis_client.get(key) is None

    sent = await crm.call(
        "campaign.test",
        {"campaign_id": cid, "email": "boss@example.org", "name": "Босс", "variables": {}},
    )
    assert sent["status"] == "sent" and sent["email"] == "boss@example.org"
    assert sent["smtp_message_id"].startswith(f"<c{cid}.r0.")
    # It counts against the hourly limit of the SMTP account, like any send.
    assert int(await redis_client.get(key)) == 1

    [got] = sink.messages
    assert list(got.rcpt_tos) == ["boss@example.org"]
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert msg["Subject"] == "[ТЕСТ] Новости недели"
    assert msg["Message-ID"] == sent["smtp_message_id"]
    assert msg["List-Unsubscribe"].startswith("<http")
    assert "Здравствуйте, Босс!" in msg.get_body(("plain",)).get_content()

    row = await db.fetchrow("SELECT * FROM send_log")
    assert row["is_test"] is True and row["recipient_id"] is None
    assert row["campaign_id"] == cid and row["email"] == "boss@example.org"
    assert row["status"] == "sent" and row["smtp_message_id"] == sent["smtp_message_id"]
    assert row["provider_answer"].startswith("250") and row["error"] is None
    assert row["took_ms"] >= 0 and row["id"] == sent["send_log_id"]
    assert await db.fetchval("SELECT count(*) FROM recipient") == 0

    await crm.call("campaign.test", {"campaign_id": cid, "email": "boss@example.org"}, lang="en")
    last = email.message_from_bytes(sink.messages[-1].data, policy=email.policy.default)
    assert last["Subject"] == "[TEST] Новости недели"


async def test_sixth_test_email_in_an_hour_is_refused(
    make_service, crm: Crm, sink, redis_client, settings
) -> None:
    clock = FakeClock(NOW)
    await make_service(clock=clock)
    cid = await crm.campaign([])
    for i in range(5):
        await crm.call("campaign.test", {"campaign_id": cid, "email": f"t{i}@example.org"})
        clock.advance(timedelta(minutes=1))
    err = await crm.fails("campaign.test", {"campaign_id": cid, "email": "t6@example.org"})
    assert err.code == "throttled" and err.status == 429
    # The oldest of the five (10:15) leaves the hour at 11:15: 55 minutes from 10:20.
    assert err.message == (
        "Слишком много тестовых писем: не больше 5 в час. Попробуйте снова через 55 мин."
    )
    assert err.details["retry_at"].startswith("2026-11-23T11:15:00")
    assert len(sink.messages) == 5
    assert int(await redis_client.get(_hour_key(settings, redis_client, NOW))) == 5
    # Another manager has their own hour.
    other = await crm.campaign([], user="manager-2")
    await crm.call(
        "campaign.test", {"campaign_id": other, "email": "x@example.org"}, user="manager-2"
    )
    # A sliding hour: once the first leaves it, one more goes.
    clock.set(datetime(2026, 11, 23, 11, 15, 1, tzinfo=UTC))
    await crm.call("campaign.test", {"campaign_id": cid, "email": "t6@example.org"})


async def test_governor_refusal_is_a_structured_error(make_service, crm: Crm, sink, db) -> None:
    clock = FakeClock(NOW)
    await make_service(clock=clock, rate_per_hour=1)
    cid = await crm.campaign([])
    await crm.call("campaign.test", {"campaign_id": cid, "email": "a@example.org"})
    err = await crm.fails("campaign.test", {"campaign_id": cid, "email": "b@example.org"})
    assert err.code == "rate_per_hour" and err.status == 429
    assert err.message == "Достигнут лимит 1 писем/час. Продолжим в 14:00."
    assert err.details["retry_at"].startswith("2026-11-23T11:00:00")
    err = await crm.fails(
        "campaign.test", {"campaign_id": cid, "email": "b@example.org"}, lang="en"
    )
    assert err.message == "The limit of 1 emails/hour is reached. We continue at 14:00."
    assert len(sink.messages) == 1
    assert await db.fetchval("SELECT count(*) FROM send_log") == 1

    err = await crm.fails("campaign.test", {"campaign_id": cid, "email": "not an address"})
    assert err.code == "validation_error"
    assert err.message.startswith("Неверный адрес «not an address»")


async def test_a_test_email_the_governor_refuses_keeps_its_throttle_slot(
    make_service, crm: Crm, sink, redis_client, settings
) -> None:
    # The hour's budget is used up: the governor refuses every test email. Those
    # refusals sent nothing, so they must not use up the manager's 5 an hour.
    clock = FakeClock(NOW)
    await make_service(clock=clock, rate_per_hour=1)
    cid = await crm.campaign([])
    await crm.call("campaign.test", {"campaign_id": cid, "email": "a@example.org"})
    for i in range(6):
        err = await crm.fails("campaign.test", {"campaign_id": cid, "email": f"r{i}@example.org"})
        assert err.code == "rate_per_hour", err
    key = f"{settings.redis_key_prefix}throttle:test_email:manager-1"
    assert await redis_client.zcard(key) == 1  # only the one that was sent
    # The next hour: the governor grants again, and the slot count goes on from 1.
    clock.set(datetime(2026, 11, 23, 11, 0, 1, tzinfo=UTC))
    await crm.call("campaign.test", {"campaign_id": cid, "email": "n@example.org"})
    assert await redis_client.zcard(key) == 2
