"""Sending rules end to end: deferrals with reasons, resumption by timers,
transient errors and the circuit breaker, honest final statuses.

Time is moved through the injected FakeClock; NATS, PostgreSQL, Redis and
the SMTP sink are real.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

from mailer.clock import FakeClock
from tests.helpers import Crm, Events, people

# A Monday, 13:15 Moscow time: inside working hours.
MONDAY_1015_UTC = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


async def _view(crm: Crm, lang: str | None = None) -> dict:
    """The manager's view, as the CRM polls it."""
    return await crm.call("manager.status", {}, lang=lang)


async def test_101_at_100_per_hour_resumes_at_the_next_hour(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(clock=clock, rate_per_hour=100, batch_size=30)
    cid = await crm.campaign(people(101))
    await crm.start(cid)

    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "rate_per_hour"
    assert deferred["deferred_until"].startswith("2026-11-23T11:00:00")
    assert len(sink.messages) == 100
    q = await db.fetchrow("SELECT * FROM queue_entry WHERE campaign_id = $1", cid)
    assert q["defer_reason"] == "rate_per_hour"
    assert q["deferred_until"] == datetime(2026, 11, 23, 11, 0, tzinfo=UTC)
    view = await crm.get(cid)
    assert view["status"] == "sending" and view["counts"] == {"sent": 100, "pending": 1}
    manager = await _view(crm)
    assert manager["active_campaign"]["id"] == cid
    assert manager["reason_code"] == "rate_per_hour"
    assert manager["reason"] == "Достигнут лимит 100 писем/час. Продолжим в 14:00."
    assert manager["next_run_at"].startswith("2026-11-23T11:00:00")
    english = await _view(crm, lang="en")
    assert english["reason"] == "The limit of 100 emails/hour is reached. We continue at 14:00."

    # Nobody acts: the clock reaches the next hour and the campaign goes on.
    clock.set(datetime(2026, 11, 23, 11, 0, tzinfo=UTC))
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent"
    assert len(sink.messages) == 101
    assert Counter(r for m in sink.messages for r in m.rcpt_tos).most_common(1)[0][1] == 1
    assert len(events.of(cid, "deferred")) == 1
    assert (await _view(crm))["reason_code"] == "empty"


async def test_a_permanent_rejection_fails_one_recipient_and_the_campaign_goes_on(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    await make_service()
    recipients = people(5)
    sink.fail(recipients[2]["email"], "550 5.1.1 No such user")
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    done = await events.wait(cid, ("sent", "completed_with_errors"))

    assert done["event"] == "completed_with_errors"
    view = await crm.get(cid)
    assert view["status"] == "completed_with_errors"  # never `sent` with a failure
    assert view["counts"] == {"sent": 4, "failed": 1}
    assert len(sink.messages) == 4
    row = await db.fetchrow(
        "SELECT status, error FROM recipient WHERE campaign_id = $1 AND email = $2",
        cid,
        recipients[2]["email"],
    )
    assert row["status"] == "failed" and "550" in row["error"]
    log = await db.fetchrow(
        "SELECT status, provider_answer FROM send_log WHERE campaign_id = $1 AND email = $2",
        cid,
        recipients[2]["email"],
    )
    assert log["status"] == "failed" and log["provider_answer"].startswith("550")


async def _transient_rounds(
    clock: FakeClock, events: Events, cid: int, rounds: int, start: int = 0
) -> None:
    """Waits for each transient deferral and moves the clock past its retry."""
    for n in range(start, start + rounds):
        await events.wait_count(cid, "deferred", n + 1, stop_on="paused")
        if events.of(cid, "paused"):
            return
        last = events.of(cid, "deferred")[n]
        assert last["defer_reason"] == "transient_error"
        clock.advance(timedelta(minutes=5))


class Notes(list[bytes]):
    """Owner notifications as they arrive; ``wait`` for a count without polling."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Condition()

    async def on_msg(self, msg) -> None:
        async with self.changed:
            self.append(msg.data)
            self.changed.notify_all()

    async def wait(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self) >= n)


async def _notifications(nc, prefix: str) -> Notes:
    notes = Notes()
    await nc.subscribe(f"{prefix}.events.notify.>", cb=notes.on_msg)
    await nc.flush()
    return notes


async def test_nine_transient_errors_do_not_pause_and_a_success_resets(
    make_service, crm: Crm, events: Events, sink, db, nc, settings
) -> None:
    notes = await _notifications(nc, settings.subject_prefix)
    clock = FakeClock(MONDAY_1015_UTC)
    # Attempts per recipient uncapped here: this is about the campaign's count.
    await make_service(clock=clock, batch_size=1, max_transient_attempts=100)
    recipients = people(2)
    sink.fail(recipients[0]["email"], "451 4.3.0 Try again later", times=9)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    await _transient_rounds(clock, events, cid, 9)
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent"
    assert not events.of(cid, "paused")
    assert (
        await db.fetchval(
            "SELECT consecutive_transient_errors FROM queue_entry WHERE campaign_id = $1", cid
        )
        == 0
    )
    attempts = await db.fetch(
        "SELECT status FROM send_log WHERE campaign_id = $1 AND email = $2 ORDER BY id",
        cid,
        recipients[0]["email"],
    )
    assert [a["status"] for a in attempts] == ["transient"] * 9 + ["sent"]
    assert len(events.of(cid, "deferred")) == 9
    await notes.wait(1)
    await nc.flush()
    # The owner was told once of the ongoing transient trouble, not nine times.
    assert len(notes) == 1


async def test_the_tenth_consecutive_transient_error_pauses_the_campaign(
    make_service, crm: Crm, events: Events, sink, db, nc, settings
) -> None:
    notes = await _notifications(nc, settings.subject_prefix)
    clock = FakeClock(MONDAY_1015_UTC)
    # Attempts per recipient uncapped here: this is about the campaign's count.
    await make_service(clock=clock, batch_size=1, max_transient_attempts=100)
    recipients = people(1)
    sink.fail(recipients[0]["email"], "451 4.3.0 Try again later")
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    await events.wait(cid, ("deferred",))
    manager = await _view(crm)
    assert manager["reason_code"] == "transient_error"
    assert manager["reason"] == "Временная ошибка отправки. Повторим попытку через 5 минут."
    assert manager["next_run_at"].startswith("2026-11-23T10:20:00")
    await _transient_rounds(clock, events, cid, 10)
    paused = await events.wait(cid, ("paused",))
    assert paused["defer_reason"] == "circuit_breaker"
    view = await crm.get(cid)
    assert view["status"] == "paused"
    assert view["queue"]["defer_reason"] == "circuit_breaker"
    assert view["queue"]["consecutive_transient_errors"] == 10
    manager = await _view(crm)
    assert manager["reason_code"] == "circuit_breaker" and manager["next_run_at"] is None
    assert len(events.of(cid, "deferred")) == 9
    # One notification for the transient episode, one for the pause.
    await notes.wait(2)
    assert len(notes) == 2


async def test_a_recipient_that_always_answers_4xx_fails_and_the_campaign_finishes(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(clock=clock, batch_size=5, max_transient_attempts=5)
    recipients = people(3)
    sink.fail(recipients[1]["email"], "452 4.2.2 Mailbox full")
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    await _transient_rounds(clock, events, cid, 4)
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "completed_with_errors"
    assert done["counts"] == {"sent": 2, "failed": 1}
    assert not events.of(cid, "paused")
    row = await db.fetchrow(
        "SELECT status, error, transient_attempts FROM recipient WHERE email = $1",
        recipients[1]["email"],
    )
    assert row["status"] == "failed" and row["transient_attempts"] == 5
    assert row["error"].endswith("452 4.2.2 Mailbox full")
    attempts = await db.fetch(
        "SELECT status FROM send_log WHERE email = $1 ORDER BY id", recipients[1]["email"]
    )
    assert [a["status"] for a in attempts] == ["transient"] * 4 + ["failed"]


async def test_a_deferral_ends_on_the_real_clock(
    make_service, crm: Crm, events: Events, sink
) -> None:
    # The one boundary crossed in real time: a 1.2-second transient retry.
    await make_service(transient_retry_delay_minutes=0.02)
    recipients = people(3)
    sink.fail(recipients[1]["email"], "421 4.7.0 Slow down", times=1)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "transient_error"
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=10)
    assert done["event"] == "sent"
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(
        r["email"] for r in recipients
    )


OFFICE = {"working_hours_start": "09:00", "working_hours_end": "18:00"}
TUESDAY_0900_MSK = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


async def test_started_at_eight_pm_waits_until_nine_and_goes_by_itself(
    make_service, crm: Crm, events: Events, sink
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 17, 0, tzinfo=UTC))  # Monday 20:00 MSK
    await make_service(clock=clock, **OFFICE)
    cid = await crm.campaign(people(4))
    started = await crm.start(cid)
    assert [w["code"] for w in started["warnings"]] == ["outside_hours"]
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "outside_hours"
    assert datetime.fromisoformat(deferred["deferred_until"]) == TUESDAY_0900_MSK
    assert len(sink.messages) == 0
    manager = await _view(crm)
    assert manager["reason_code"] == "outside_hours"
    assert manager["reason"] == (
        "Сейчас вне рабочего времени (9:00-18:00 МСК). Продолжим завтра в 09:00 МСК."
    )
    assert datetime.fromisoformat(manager["next_run_at"]) == TUESDAY_0900_MSK

    clock.set(TUESDAY_0900_MSK)
    done = await events.wait(cid, ("sent",))
    assert done["counts"] == {"sent": 4}


async def test_running_at_six_pm_stops_there_and_resumes_at_nine(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 14, 59, 50, tzinfo=UTC))  # 17:59:50 MSK

    async def six_pm_strikes(campaign_id: int, batches: int) -> None:
        if batches == 1:
            clock.set(datetime(2026, 11, 23, 15, 0, tzinfo=UTC))

    await make_service(clock=clock, fault=six_pm_strikes, batch_size=3, **OFFICE)
    cid = await crm.campaign(people(7))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "outside_hours"
    assert len(sink.messages) == 3
    q = await db.fetchrow("SELECT defer_reason, deferred_until FROM queue_entry")
    assert (q["defer_reason"], q["deferred_until"]) == ("outside_hours", TUESDAY_0900_MSK)

    clock.set(TUESDAY_0900_MSK)
    done = await events.wait(cid, ("sent",))
    assert done["counts"] == {"sent": 7}
    assert len(sink.messages) == 7


async def test_a_managers_daily_limit_waits_for_the_next_morning(
    make_service, crm: Crm, events: Events, sink, nc, settings
) -> None:
    notes = await _notifications(nc, settings.subject_prefix)
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(clock=clock, daily_limits="manager-1=3", batch_size=2, **OFFICE)
    cid = await crm.campaign(people(5))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "daily_limit"
    assert datetime.fromisoformat(deferred["deferred_until"]) == TUESDAY_0900_MSK
    assert deferred["details"] == {"sent": "3", "limit": "3"}
    assert len(sink.messages) == 3
    await notes.wait(1)
    assert "3/3" in str(msgspec_json(notes[0])["message"])
    manager = await _view(crm)
    assert manager["reason_code"] == "daily_limit"
    assert manager["reason"] == ("Вы достигли дневного лимита 3/3. Продолжим завтра в 09:00 МСК.")

    clock.set(TUESDAY_0900_MSK)
    done = await events.wait(cid, ("sent",))
    assert done["counts"] == {"sent": 5}


def msgspec_json(data: bytes) -> dict[str, object]:
    import msgspec

    result: dict[str, object] = msgspec.json.decode(data)
    return result


def _hour_key(settings, at: datetime) -> str:
    return f"{settings.redis_key_prefix}rate:{settings.smtp_account}:{at.strftime('%Y%m%d%H')}"


async def test_a_batch_of_greylisted_addresses_is_one_failed_attempt_and_its_tokens_stay_spent(
    make_service, crm: Crm, events: Events, sink, db, redis_client, settings
) -> None:
    # Ten addresses greylisted in one batch: one failed attempt, not ten, so
    # the campaign waits for its retry instead of being paused at once.
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(clock=clock, batch_size=10)
    recipients = people(10)
    for r in recipients:
        sink.fail(r["email"], "451 4.7.1 Greylisted, try again later", times=1)
    cid = await crm.campaign(recipients)
    await crm.start(cid)

    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "transient_error"
    q = await db.fetchrow("SELECT * FROM queue_entry WHERE campaign_id = $1", cid)
    assert q["consecutive_transient_errors"] == 1
    assert (await crm.get(cid))["status"] == "sending"  # waiting, not paused
    # The ten tokens were spent on sends that failed: they are not given back.
    hour = _hour_key(settings, MONDAY_1015_UTC)
    assert int(await redis_client.get(hour)) == 10

    clock.advance(timedelta(minutes=5))
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent" and done["counts"] == {"sent": 10}
    assert int(await redis_client.get(hour)) == 20
    assert (
        await db.fetchval(
            "SELECT consecutive_transient_errors FROM queue_entry WHERE campaign_id = $1", cid
        )
        == 0
    )


async def test_an_open_smtp_breaker_holds_campaigns_back_without_spending_tokens(
    make_service, crm: Crm, events: Events, sink, db, redis_client, settings
) -> None:
    # The server answers 421 to every message of the first batch: the account's
    # breaker opens (3 server failures), the first campaign waits its retry.
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(clock=clock, batch_size=3, circuit_breaker_threshold=3)
    first = people(3)
    for r in first:
        sink.fail(r["email"], "421 4.3.2 Service shutting down", times=1)
    a = await crm.campaign(first)
    await crm.start(a)
    deferred = await events.wait(a, ("deferred",))
    assert deferred["defer_reason"] == "transient_error"
    hour = _hour_key(settings, MONDAY_1015_UTC)
    assert int(await redis_client.get(hour)) == 3
    quota_before = await db.fetchval("SELECT emails_available FROM quota")

    # A second campaign starts a minute later, while the breaker is open: it
    # waits for the breaker's probe and reserves nothing, claims nothing.
    clock.advance(timedelta(minutes=1))
    b = await crm.campaign(people(4, start=100))
    await crm.start(b)
    waits = await events.wait(b, ("deferred",))
    assert waits["defer_reason"] == "transient_error"
    assert datetime.fromisoformat(waits["deferred_until"]) == MONDAY_1015_UTC + timedelta(minutes=5)
    assert int(await redis_client.get(hour)) == 3
    assert await db.fetchval("SELECT emails_available FROM quota") == quota_before
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE campaign_id = $1", b) == 0
    assert (await crm.get(b))["counts"] == {"pending": 4}

    # The cooldown ends: both go out.
    clock.advance(timedelta(minutes=4))
    for cid in (a, b):
        done = await events.wait(cid, ("sent", "completed_with_errors"))
        assert done["event"] == "sent"
    assert len(sink.messages) == 7
