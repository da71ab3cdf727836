"""The manager's view (``manager.status``, the seeds' poll endpoint), the owner's
notifications, and the reason texts worded from settings and the calendar.

Time is placed with a FakeClock; NATS, PostgreSQL, Redis and the SMTP sink are real.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest

from mailer.clock import FakeClock
from mailer.texts import duration_phrase, resume_phrase, text, tz_label, working_time
from tests.helpers import Crm, Events, people

MONDAY_1315_MSK = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
TUESDAY_0900_MSK = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)
FRIDAY_1315_MSK = datetime(2026, 11, 27, 10, 15, tzinfo=UTC)
NEXT_MONDAY_0900_MSK = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
OFFICE = {"working_hours_start": "09:00", "working_hours_end": "18:00"}
FINAL = ("sent", "completed_with_errors")
MOSCOW = ZoneInfo("Europe/Moscow")


async def _view(crm: Crm, lang: str | None = None) -> dict[str, Any]:
    return await crm.call("manager.status", {}, lang=lang)


def _at(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class Stream:
    """Everything published under ``<prefix>.events.>``, in one subscription.

    One subscription keeps the order in which the service published: a
    notification relayed before a campaign's final event is seen before it.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Condition()

    async def subscribe(self, nc, prefix: str) -> None:
        async def on_msg(msg) -> None:
            async with self._changed:
                self.seen.append((msg.subject, msgspec.json.decode(msg.data)))
                self._changed.notify_all()

        await nc.subscribe(f"{prefix}.events.>", cb=on_msg)
        await nc.flush()

    def notifications(self, campaign_id: int) -> list[dict[str, Any]]:
        return [
            body
            for subject, body in self.seen
            if ".events.notify." in subject and body["campaign_id"] == campaign_id
        ]

    def campaign_events(self, campaign_id: int, event: str) -> list[dict[str, Any]]:
        return [
            body
            for subject, body in self.seen
            if ".events.campaign." in subject
            and body["campaign_id"] == campaign_id
            and body["event"] == event
        ]

    async def wait_deferred(self, campaign_id: int, n: int, timeout: float = 15.0) -> None:
        """Waits until the campaign was deferred ``n`` times."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(
                lambda: len(self.campaign_events(campaign_id, "deferred")) >= n
            )

    async def wait_final(self, campaign_id: int, timeout: float = 15.0) -> dict[str, Any]:
        def final() -> list[dict[str, Any]]:
            return [e for ev in FINAL for e in self.campaign_events(campaign_id, ev)]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: bool(final()))
        return final()[0]


@pytest.fixture
async def stream(nc, settings) -> Stream:
    s = Stream()
    await s.subscribe(nc, settings.subject_prefix)
    return s


# --- what the view shows ----------------------------------------------------------------


async def test_the_view_counts_the_queue_behind_the_campaign_that_sends(
    make_service, crm: Crm, events: Events
) -> None:
    held, release = asyncio.Event(), asyncio.Event()
    sending: int | None = None

    async def hold(campaign_id: int, batches: int) -> None:
        if campaign_id == sending:
            held.set()
            await release.wait()

    await make_service(clock=FakeClock(MONDAY_1315_MSK), fault=hold, max_active_campaigns=1)
    sending = await crm.campaign(people(2, "a.example"), name="first")
    await crm.start(sending)
    async with asyncio.timeout(10):
        await held.wait()
    low = await crm.campaign(people(2, "b.example"), name="low")
    high = await crm.campaign(people(2, "c.example"), name="high", priority=3)
    await crm.start(low)
    await crm.start(high)

    view = await _view(crm)
    assert view["active_campaign"]["id"] == sending
    assert view["active_campaign"]["status"] == "sending"
    assert view["queued_count"] == 2 and view["paused_count"] == 0
    # The two only wait for their turn: no time to show, no reason to give.
    assert view["next_campaign_at"] is None
    assert (view["reason_code"], view["reason"], view["next_run_at"]) == (None, None, None)
    assert [q["id"] for q in view["queue"]] == [sending, high, low]

    release.set()
    for cid in (sending, high, low):
        assert (await events.wait(cid, FINAL))["event"] == "sent"
    view = await _view(crm)
    assert view["active_campaign"] is None and view["queued_count"] == 0
    assert (view["reason_code"], view["reason"]) == ("empty", "Нет писем в очереди")


async def test_a_campaign_stopped_at_six_pm_shows_outside_hours_until_nine_next_day(
    make_service, crm: Crm, events: Events, sink
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 14, 59, 50, tzinfo=UTC))  # Monday 17:59:50 MSK
    struck = False

    async def six_pm_strikes(campaign_id: int, batches: int) -> None:
        nonlocal struck
        if not struck:
            struck = True
            clock.set(datetime(2026, 11, 23, 15, 0, tzinfo=UTC))

    await make_service(clock=clock, fault=six_pm_strikes, batch_size=3, **OFFICE)
    cid = await crm.campaign(people(7))
    await crm.start(cid)
    assert (await events.wait(cid, ("deferred",)))["defer_reason"] == "outside_hours"
    assert len(sink.messages) == 3
    # Two more started after six: queued behind it, all waiting for the morning.
    later = [await crm.campaign(people(2, f"later{i}.example")) for i in range(2)]
    for other in later:
        await crm.start(other)
        assert (await events.wait(other, ("deferred",)))["defer_reason"] == "outside_hours"

    view = await _view(crm)
    assert view["active_campaign"]["id"] == cid
    assert view["active_campaign"]["counts"] == {"sent": 3, "pending": 4}
    assert view["reason_code"] == "outside_hours"
    assert view["reason"] == (
        "Сейчас вне рабочего времени (9:00-18:00 МСК). Продолжим завтра в 09:00 МСК."
    )
    assert _at(view["next_run_at"]) == TUESDAY_0900_MSK
    assert view["queued_count"] == 2
    assert _at(view["next_campaign_at"]) == TUESDAY_0900_MSK
    english = await _view(crm, lang="en")
    assert english["reason"] == (
        "Outside working hours (9:00-18:00 MSK). We continue tomorrow at 09:00 MSK."
    )

    clock.set(TUESDAY_0900_MSK)
    for c in (cid, *later):
        assert (await events.wait(c, FINAL))["event"] == "sent"
    assert (await _view(crm))["reason_code"] == "empty"


async def test_after_a_completion_with_a_permanent_failure_no_campaign_is_active(
    make_service, crm: Crm, events: Events, sink
) -> None:
    await make_service()
    recipients = people(3)
    sink.fail(recipients[1]["email"], "550 5.1.1 No such user")
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    assert (await events.wait(cid, FINAL))["event"] == "completed_with_errors"

    view = await _view(crm)
    assert view["active_campaign"] is None
    assert view["queued_count"] == 0 and view["paused_count"] == 0
    assert view["queue"] == [] and view["next_campaign_at"] is None
    assert (view["reason_code"], view["next_run_at"]) == ("empty", None)
    # The failure stays visible on the campaign itself.
    assert (await crm.get(cid))["counts"] == {"sent": 2, "failed": 1}


# --- owner notifications: one per ongoing reason ------------------------------------------


async def test_rate_per_hour_notifies_once_per_ongoing_episode(
    make_service, crm: Crm, stream: Stream
) -> None:
    # 10 per hour, one campaign at a time. `big` sends 10 an hour; `small`,
    # queued behind it, is refused at 10:15. Its place in the queue is part
    # of the answer (issue 8): `big` takes 11:00's hour and half of 12:00's, so
    # `small` is promised 12:00 (15:00 Moscow) at once — not 11:00, when it
    # would only be refused again. One wait, one notification.
    clock = FakeClock(MONDAY_1315_MSK)
    await make_service(clock=clock, rate_per_hour=10, batch_size=5, max_active_campaigns=1)
    big = await crm.campaign(people(25, "big.example"))
    small = await crm.campaign(people(5, "small.example"), user="manager-2")
    await crm.start(big)
    await crm.call("campaign.start", {"campaign_id": small}, user="manager-2")

    await stream.wait_deferred(big, 1)
    await stream.wait_deferred(small, 1)
    noon_utc = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    assert _at(stream.campaign_events(small, "deferred")[0]["deferred_until"]) == noon_utc
    clock.set(datetime(2026, 11, 23, 11, 0, tzinfo=UTC))
    await stream.wait_deferred(big, 2)
    clock.set(noon_utc)
    for cid in (big, small):
        assert (await stream.wait_final(cid))["event"] == "sent"

    for cid in (big, small):
        reasons = {e["defer_reason"] for e in stream.campaign_events(cid, "deferred")}
        assert reasons == {"rate_per_hour"}
    assert len(stream.campaign_events(small, "deferred")) == 1
    small_notes = stream.notifications(small)
    assert len(small_notes) == 1
    assert small_notes[0]["owner_id"] == "manager-2"
    assert small_notes[0]["reason_code"] == "rate_per_hour"
    assert small_notes[0]["message"] == "Достигнут лимит 10 писем/час. Продолжим в 15:00."
    # `big` sent between its two deferrals: each was an episode of its own.
    big_notes = stream.notifications(big)
    assert [n["reason_code"] for n in big_notes] == ["rate_per_hour", "rate_per_hour"]
    assert [_at(n["deferred_until"]) for n in big_notes] == [
        datetime(2026, 11, 23, 11, 0, tzinfo=UTC),
        datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
    ]


async def test_daily_limit_notifies_once_per_ongoing_episode(
    make_service, crm: Crm, stream: Stream
) -> None:
    # The manager may send 3 a day. `first` (7) uses Monday's 3, Tuesday's 3
    # and one of Wednesday's; `second` (2), queued behind it, is refused on
    # Monday and promised Wednesday at once, its place in the queue counted
    # (issue 8) — not Tuesday, when it would only be refused again.
    clock = FakeClock(MONDAY_1315_MSK)
    await make_service(
        clock=clock, daily_limits="manager-1=3", batch_size=2, max_active_campaigns=1, **OFFICE
    )
    first = await crm.campaign(people(7, "first.example"))
    second = await crm.campaign(people(2, "second.example"))
    await crm.start(first)
    await crm.start(second)

    await stream.wait_deferred(first, 1)
    await stream.wait_deferred(second, 1)
    wednesday = TUESDAY_0900_MSK + timedelta(days=1)
    assert _at(stream.campaign_events(second, "deferred")[0]["deferred_until"]) == wednesday
    clock.set(TUESDAY_0900_MSK)
    await stream.wait_deferred(first, 2)
    clock.set(wednesday)
    for cid in (first, second):
        assert (await stream.wait_final(cid))["event"] == "sent"

    assert len(stream.campaign_events(second, "deferred")) == 1
    second_notes = stream.notifications(second)
    assert len(second_notes) == 1
    assert second_notes[0]["reason_code"] == "daily_limit"
    assert "3/3" in second_notes[0]["message"] and "{" not in second_notes[0]["message"]
    assert [n["reason_code"] for n in stream.notifications(first)] == [
        "daily_limit",
        "daily_limit",
    ]


# --- texts worded from settings and the calendar ------------------------------------------


async def test_reason_texts_follow_non_default_settings(
    make_service, crm: Crm, events: Events, sink
) -> None:
    # Yekaterinburg (UTC+5), 10:00-19:00 on weekdays, retry after 2 minutes.
    friday_evening = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)  # Friday 20:00 there
    monday_ten = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)
    clock = FakeClock(friday_evening)
    await make_service(
        clock=clock,
        timezone="Asia/Yekaterinburg",
        working_hours_start="10:00",
        working_hours_end="19:00",
        working_days="1,2,3,4,5",
        transient_retry_delay_minutes=2.0,
    )
    recipients = people(2)
    sink.fail(recipients[0]["email"], "451 4.3.0 Try again later", times=1)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "outside_hours"

    view = await _view(crm)
    assert _at(view["next_run_at"]) == monday_ten
    # Not "tomorrow": Saturday and Sunday are not working days.
    assert view["reason"] == (
        "Сейчас вне рабочего времени (10:00-19:00 Asia/Yekaterinburg). "
        "Продолжим в понедельник, 30.11, в 10:00 Asia/Yekaterinburg."
    )
    assert (await _view(crm, lang="en"))["reason"] == (
        "Outside working hours (10:00-19:00 Asia/Yekaterinburg). "
        "We continue on Monday, 30.11, at 10:00 Asia/Yekaterinburg."
    )

    clock.set(monday_ten)
    await events.wait_count(cid, "deferred", 2)
    assert events.of(cid, "deferred")[1]["defer_reason"] == "transient_error"
    view = await _view(crm)
    assert _at(view["next_run_at"]) == monday_ten + timedelta(minutes=2)
    assert view["reason"] == "Временная ошибка отправки. Повторим попытку через 2 минуты."
    assert (await _view(crm, lang="en"))["reason"] == (
        "Temporary sending error. We retry in 2 minutes."
    )
    clock.advance(timedelta(minutes=2))
    assert (await events.wait(cid, FINAL))["event"] == "sent"


async def test_a_daily_limit_hit_on_friday_continues_on_monday_not_tomorrow(
    make_service, crm: Crm, events: Events
) -> None:
    await make_service(
        clock=FakeClock(FRIDAY_1315_MSK),
        daily_limits="manager-1=3",
        working_days="1,2,3,4,5",
        **OFFICE,
    )
    cid = await crm.campaign(people(5))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "daily_limit"
    view = await _view(crm)
    assert _at(view["next_run_at"]) == NEXT_MONDAY_0900_MSK
    assert view["reason"] == (
        "Вы достигли дневного лимита 3/3. Продолжим в понедельник, 30.11, в 09:00 МСК."
    )
    assert (await _view(crm, lang="en"))["reason"] == (
        "You reached your daily limit of 3/3. We continue on Monday, 30.11, at 09:00 MSK."
    )


def test_resume_phrase_names_today_tomorrow_or_the_day() -> None:
    nine = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)  # Tuesday 09:00 MSK
    early_tuesday = datetime(2026, 11, 24, 4, 0, tzinfo=UTC)  # 07:00 MSK
    monday_night = datetime(2026, 11, 23, 20, 59, tzinfo=UTC)  # 23:59 MSK
    # 00:30 UTC is already Tuesday in Moscow: the day is the zone's, not UTC's.
    tuesday_0030_utc = datetime(2026, 11, 24, 0, 30, tzinfo=UTC)
    assert resume_phrase(nine, now=early_tuesday, tz=MOSCOW) == "сегодня в 09:00 МСК"
    assert resume_phrase(nine, now=tuesday_0030_utc, tz=MOSCOW) == "сегодня в 09:00 МСК"
    assert resume_phrase(nine, now=monday_night, tz=MOSCOW) == "завтра в 09:00 МСК"
    assert resume_phrase(nine, now=monday_night, tz=MOSCOW, lang="en") == ("tomorrow at 09:00 MSK")
    saturday = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert resume_phrase(NEXT_MONDAY_0900_MSK, now=saturday, tz=MOSCOW) == (
        "в понедельник, 30.11, в 09:00 МСК"
    )
    wednesday = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)
    assert resume_phrase(wednesday, now=monday_night, tz=MOSCOW) == "в среду, 25.11, в 09:00 МСК"
    assert resume_phrase(wednesday, now=monday_night, tz=MOSCOW, lang="en") == (
        "on Wednesday, 25.11, at 09:00 MSK"
    )
    berlin = ZoneInfo("Europe/Berlin")
    assert resume_phrase(nine, now=monday_night, tz=berlin) == "завтра в 07:00 Europe/Berlin"


def test_durations_hours_and_zones_are_worded_from_settings() -> None:
    ru = {m: duration_phrase(m) for m in (1, 2, 5, 11, 21, 22, 25, 112, 0.5, 60, 180)}
    assert ru == {
        1: "1 минуту",
        2: "2 минуты",
        5: "5 минут",
        11: "11 минут",
        21: "21 минуту",
        22: "22 минуты",
        25: "25 минут",
        112: "112 минут",
        0.5: "30 секунд",
        60: "1 час",
        180: "3 часа",
    }
    assert duration_phrase(1, "en") == "1 minute"
    assert duration_phrase(5, "en") == "5 minutes"
    assert duration_phrase(0.02, "en") == "1 second"
    assert working_time("09:00") == "9:00" and working_time("24:00") == "24:00"
    assert tz_label(MOSCOW) == "МСК" and tz_label(MOSCOW, "en") == "MSK"
    assert tz_label(ZoneInfo("Asia/Yekaterinburg"), "en") == "Asia/Yekaterinburg"
    # With the defaults the seeds' texts come out word for word.
    values = {"start": "9:00", "end": "18:00", "tz": "МСК", "until": "завтра в 09:00 МСК"}
    assert text("outside_hours", **values) == (
        "Сейчас вне рабочего времени (9:00-18:00 МСК). Продолжим завтра в 09:00 МСК."
    )
    assert text("transient_error", retry_in=duration_phrase(5.0)) == (
        "Временная ошибка отправки. Повторим попытку через 5 минут."
    )
    assert text("daily_limit", sent=7, limit=7, until="завтра в 09:00 МСК") == (
        "Вы достигли дневного лимита 7/7. Продолжим завтра в 09:00 МСК."
    )


def test_counts_take_the_word_form_that_goes_with_them() -> None:
    def too_many(n: int, lang: str = "ru") -> str:
        return text("too_many_recipients", lang, count=n, limit=10000)

    assert too_many(1).startswith("В кампании 1 получатель,")
    assert too_many(3).startswith("В кампании 3 получателя,")
    assert too_many(11).startswith("В кампании 11 получателей,")
    assert too_many(10021).startswith("В кампании 10021 получатель,")
    assert too_many(10012).startswith("В кампании 10012 получателей,")
    assert too_many(1, "en").startswith("The campaign has 1 recipient,")
    assert too_many(10001, "en").startswith("The campaign has 10001 recipients,")
