"""A grant is good only in the window it was granted for.

Tokens are counted in the hour (and the manager's day) the governor granted
them in; a batch granted at 10:59:59 whose messages reach SMTP after 11:00
would land in the next hour uncounted, and one granted at 17:59:59 would go
out after closing. The governor says until when a grant holds
(``valid_until``); nothing is handed to SMTP at or after it: such recipients
go back to pending, and their tokens stay spent.

Time moves only on the FakeClock: the SMTP sink's hook moves it while the
first message of a batch is on the wire, and the others wait for the one
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import msgspec

from mailer.clock import FakeClock
from mailer.messages import TokenReply
from mailer.sink import SmtpSink
from tests.helpers import Crm, Events, people
from tests.test_governor import governor

# Monday 2026-11-23; Moscow is UTC+3.
AT_10_59_59 = datetime(2026, 11, 23, 10, 59, 59, tzinfo=UTC)
AT_11 = datetime(2026, 11, 23, 11, 0, tzinfo=UTC)
AT_12 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
AT_17_59_59_MSK = datetime(2026, 11, 23, 14, 59, 59, tzinfo=UTC)
AT_18_MSK = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
TUESDAY_0900_MSK = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)
OFFICE = {"working_hours_start": "09:00", "working_hours_end": "18:00"}


def _hour_key(settings, at: datetime) -> str:
    return f"{settings.redis_key_prefix}rate:{settings.smtp_account}:{at:%Y%m%d%H}"


@contextlib.contextmanager
def clock_moves_during_first_message(
    sink: SmtpSink, clock: FakeClock, to: datetime
) -> Iterator[list[tuple[datetime, str]]]:
    """Records (FakeClock time, address) of every message at DATA; the first one's
    DATA moves the clock to ``to`` (the SMTP transaction took that long)."""
    seen: list[tuple[datetime, str]] = []

    def hook(stage: str, address: str) -> None:
        if stage == "data":
            seen.append((clock.now(), address))
            if len(seen) == 1:
                clock.set(to)

    sink.hook = hook
    try:
        yield seen
    finally:
        sink.hook = None


async def test_a_grant_at_10_59_59_is_not_used_after_11(
    make_service, crm: Crm, events: Events, sink, db, redis_client, settings
) -> None:
    clock = FakeClock(AT_10_59_59)
    with clock_moves_during_first_message(sink, clock, AT_11) as seen:
        await make_service(clock=clock, rate_per_hour=3, batch_size=3, smtp_connections=1)
        cid = await crm.campaign(people(6))
        await crm.start(cid)
        deferred = await events.wait(cid, ("deferred",))

    # 10:59:59: three tokens of hour 10; one message made it before 11:00, the
    # two others were not sent under that grant. At 11:00 they were granted
    # again (hour 11), with one more: three in hour 11, its limit, then a wait.
    assert deferred["defer_reason"] == "rate_per_hour"
    assert datetime.fromisoformat(deferred["deferred_until"]) == AT_12
    in_hour_11 = [address for at, address in seen if at >= AT_11]
    assert len(seen) == 4 and len(in_hour_11) == 3
    assert int(await redis_client.get(_hour_key(settings, AT_10_59_59))) == 3  # stay spent
    assert int(await redis_client.get(_hour_key(settings, AT_11))) == 3
    assert (await crm.get(cid))["counts"] == {"sent": 4, "pending": 2}
    # Nothing expired reached the send log: no attempt was made.
    assert await db.fetchval("SELECT count(*) FROM send_log") == 4

    clock.set(AT_12)
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent"
    rcpts = sorted(r for m in sink.messages for r in m.rcpt_tos)
    assert rcpts == sorted(p["email"] for p in people(6))  # each once


async def test_a_grant_at_17_59_59_sends_nothing_after_18(
    make_service, crm: Crm, events: Events, sink, db, settings
) -> None:
    clock = FakeClock(AT_17_59_59_MSK)
    with clock_moves_during_first_message(sink, clock, AT_18_MSK) as seen:
        await make_service(clock=clock, batch_size=3, smtp_connections=1, **OFFICE)
        cid = await crm.campaign(people(5))
        await crm.start(cid)
        deferred = await events.wait(cid, ("deferred",))

    assert deferred["defer_reason"] == "outside_hours"
    assert datetime.fromisoformat(deferred["deferred_until"]) == TUESDAY_0900_MSK
    assert [at for at, _ in seen] == [AT_17_59_59_MSK]
    assert len(sink.messages) == 1
    assert (await crm.get(cid))["counts"] == {"sent": 1, "pending": 4}

    clock.set(TUESDAY_0900_MSK)
    done = await events.wait(cid, ("sent",))
    assert done["counts"] == {"sent": 5}


async def _governor_answers_a_test_email(nc, settings) -> asyncio.Event:
    """Set once the rate governor has replied to a test email's token request.

    A plain subscription sees every request of the queue group, and the
    requester's inbox its reply; this connection sees the request first.
    """
    answered = asyncio.Event()
    inboxes: set[str] = set()

    async def on_request(msg) -> None:
        if msgspec.json.decode(msg.data).get("kind") == "test":
            inboxes.add(msg.reply)

    async def on_reply(msg) -> None:
        if msg.subject in inboxes:
            answered.set()

    await nc.subscribe(f"{settings.subject_prefix}.internal.governor.tokens", cb=on_request)
    await nc.subscribe("_INBOX.>", cb=on_reply)
    await nc.flush()
    return answered


async def test_a_test_email_granted_before_11_is_granted_again_after(
    make_service, crm: Crm, events: Events, sink, db, redis_client, settings, nc
) -> None:
    # A campaign's message holds the SMTP sender at DATA; a test email is
    # granted at 10:59:59 and waits its turn. The hour ends meanwhile: the test
    # email is not sent under its old grant but asks again, in hour 11.
    clock = FakeClock(AT_10_59_59)
    await make_service(clock=clock, smtp_connections=1)
    at_data = asyncio.Event()
    sink.data_gate = asyncio.Event()
    sink.hook = lambda stage, address: at_data.set() if stage == "data" else None
    cid = await crm.campaign(people(1))
    await crm.start(cid)
    await at_data.wait()
    granted = await _governor_answers_a_test_email(nc, settings)
    test_email = asyncio.ensure_future(
        crm.call("campaign.test", {"campaign_id": cid, "email": "boss@example.org"})
    )
    await asyncio.wait_for(granted.wait(), 10)
    hour_10 = _hour_key(settings, AT_10_59_59)
    assert int(await redis_client.get(hour_10)) == 2
    clock.set(AT_11)
    sink.data_gate.set()
    sent = await test_email

    assert sent["status"] == "sent"
    assert int(await redis_client.get(hour_10)) == 2  # its first token stays spent
    assert int(await redis_client.get(_hour_key(settings, AT_11))) == 1
    assert [list(m.rcpt_tos) for m in sink.messages] == [
        [people(1)[0]["email"]],
        ["boss@example.org"],
    ]
    row = await db.fetchrow("SELECT * FROM send_log WHERE email = 'boss@example.org'")
    assert row["status"] == "sent" and row["created_at"] == AT_11
    await events.wait(cid, ("sent",))


async def test_a_grant_says_its_window_and_until_when_it_holds(settings) -> None:
    # Mid-hour, mid-day, working hours far away: the hour ends first.
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))  # 13:15 MSK
    async with governor(settings, clock, **OFFICE) as gov:
        reply = await gov.ask(2)
        assert reply.granted == 2
        assert reply.hour_start == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
        assert reply.day == date(2026, 11, 23)
        assert reply.decided_at == clock.now()
        assert reply.valid_until == datetime(2026, 11, 23, 11, 0, tzinfo=UTC)
        # A refusal grants nothing to hold.
        clock.set(AT_18_MSK)
        assert (await gov.ask(1)).valid_until is None

    # Working hours that end at 17:45: a campaign's grant ends there, a test email's
    # (working hours do not apply to it) at the hour's end.
    clock = FakeClock(datetime(2026, 11, 23, 14, 30, tzinfo=UTC))  # 17:30 MSK
    async with governor(settings, clock, working_hours_end="17:45") as gov:
        assert (await gov.ask(1)).valid_until == datetime(2026, 11, 23, 14, 45, tzinfo=UTC)
        test = await gov.ask(1, kind="test")
        assert test.valid_until == datetime(2026, 11, 23, 15, 0, tzinfo=UTC)

    # A zone half an hour off UTC: the manager's day ends before the UTC hour.
    clock = FakeClock(datetime(2026, 11, 23, 18, 15, tzinfo=UTC))  # 23:45 in Kolkata
    async with governor(settings, clock, timezone="Asia/Kolkata") as gov:
        reply = await gov.ask(1, kind="test")
        assert reply.day == date(2026, 11, 23)
        assert reply.valid_until == datetime(2026, 11, 23, 18, 30, tzinfo=UTC)


def test_a_grant_measured_on_the_askers_clock_can_only_be_shorter() -> None:
    decided = datetime(2026, 11, 23, 10, 59, 0, tzinfo=UTC)  # the governor's clock
    reply = TokenReply(granted=1, decided_at=decided, valid_until=AT_11)
    # The asker's clock is 5 s behind: 60 s were left when the governor decided.
    behind = decided - timedelta(seconds=5)
    assert reply.usable_until(behind) == behind + timedelta(seconds=60)
    # 5 s ahead: the governor's valid_until comes first on the asker's clock.
    assert reply.usable_until(decided + timedelta(seconds=5)) == AT_11
    assert TokenReply(granted=1).usable_until(decided) is None
