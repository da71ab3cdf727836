"""The forecast: when each campaign of the queue starts and finishes, under every limit.

Pure; instants placed by hand. The end-to-end comparison with a real
completion under the fake clock is in tests/test_honest_waiting.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from mailer.forecast import Entry, Outlook, forecast
from mailer.rules import WorkingHours

MSK = ZoneInfo("Europe/Moscow")
OFFICE = WorkingHours(start="09:00", end="18:00", tz="Europe/Moscow")
WEEKDAYS = WorkingHours(start="09:00", end="18:00", tz="Europe/Moscow", days=(1, 2, 3, 4, 5))


def msk(d: int, h: int, mi: int = 0) -> datetime:
    return datetime(2026, 11, d, h, mi, tzinfo=MSK).astimezone(UTC)


def test_ten_thousand_at_100_per_hour_take_twelve_working_days() -> None:
    # The warning said "about 100 h"; 9 working hours a day, weekdays.
    got = forecast(
        msk(23, 13, 15),
        [Entry(campaign_id=1, owner_id="a", remaining=10_000)],
        hours=WEEKDAYS,
        hourly_limit=100,
    )
    # Monday 13:15, 14..17: 5 windows (500); then 9 a day (900) on weekdays:
    # 9500 more = 10 full days (Tue 24.11 .. Mon 7.12) + 500, the 5th window
    # of the 11th: Tuesday 8.12 at 13:00.
    outlook = got[1]
    assert outlook.starts_at == msk(23, 13, 15)
    assert outlook.completes_at == datetime(2026, 12, 8, 13, 0, tzinfo=MSK).astimezone(UTC)


def test_queue_order_one_at_a_time_and_the_start_of_the_next() -> None:
    now = msk(23, 17, 10)
    got = forecast(
        now,
        [
            Entry(campaign_id=1, owner_id="a", remaining=3, started=True),
            Entry(campaign_id=2, owner_id="b", remaining=2),
        ],
        hours=OFFICE,
        hourly_limit=2,
        hour_used=2,
    )
    # The hour is used up at 17:10 and closes at 18:00: 09:00 tomorrow.
    assert got[1] == Outlook(None, msk(24, 10))
    # The second starts in the hour the first finishes in (it has 1 of 2 left).
    assert got[2] == Outlook(msk(24, 10), msk(24, 11))


def test_daily_limit_of_one_owner_is_shared_by_their_campaigns() -> None:
    got = forecast(
        msk(23, 9),
        [
            Entry(campaign_id=1, owner_id="a", remaining=4),
            Entry(campaign_id=2, owner_id="a", remaining=2),
        ],
        hours=OFFICE,
        hourly_limit=100,
        daily_limit=lambda owner: 3,
    )
    assert got[1] == Outlook(msk(23, 9), msk(24, 9))
    # Tuesday: the first takes 1, the second the 2 left of the day.
    assert got[2] == Outlook(msk(24, 9), msk(24, 9))


def test_quota_running_out_makes_the_rest_unknown() -> None:
    got = forecast(
        msk(23, 10),
        [
            Entry(campaign_id=1, owner_id="a", remaining=3),
            Entry(campaign_id=2, owner_id="b", remaining=3),
        ],
        hours=OFFICE,
        hourly_limit=100,
        quota=4,
    )
    assert got[1] == Outlook(msk(23, 10), msk(23, 10))
    assert got[2] == Outlook(msk(23, 10), None, "quota_exhausted")
    none = forecast(
        msk(23, 10),
        [Entry(campaign_id=1, owner_id="a", remaining=3)],
        hours=OFFICE,
        hourly_limit=100,
        quota=0,
    )
    assert none[1] == Outlook(None, None, "quota_exhausted")


def test_campaigns_running_together_share_the_hour_max_min() -> None:
    got = forecast(
        msk(23, 10),
        [
            Entry(campaign_id=1, owner_id="a", remaining=5),
            Entry(campaign_id=2, owner_id="b", remaining=20),
            Entry(campaign_id=3, owner_id="c", remaining=20),
        ],
        hours=OFFICE,
        hourly_limit=30,
        max_active=3,
    )
    assert got[1].completes_at == msk(23, 10)
    # 13 and 12 this hour, the rest (7 and 8) the next.
    assert got[2].completes_at == got[3].completes_at == msk(23, 11)


def test_a_campaign_waiting_for_smtp_starts_after_its_wait() -> None:
    got = forecast(
        msk(23, 17, 58),
        [Entry(campaign_id=1, owner_id="a", remaining=1, smtp_wait_until=msk(23, 18, 3))],
        hours=OFFICE,
        hourly_limit=10,
    )
    assert got[1] == Outlook(msk(24, 9), msk(24, 9))
