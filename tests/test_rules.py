"""The calendar of sending (mailer.rules): pure, so checked exhaustively here."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.config import load_settings
from mailer.rules import DailyLimits, WorkingHours, month_bounds, parse_daily_limits

MSK = ZoneInfo("Europe/Moscow")


def msk(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    """A Moscow wall time as the aware UTC instant the governor sees."""
    return datetime(year, month, day, hour, minute, second, us, tzinfo=MSK).astimezone(UTC)


DEFAULT = WorkingHours()  # 09:00-18:00 Europe/Moscow, every day


# --- the defaults: 09:00-18:00 MSK -----------------------------------------------------


def test_default_window_bounds_are_start_inclusive_end_exclusive() -> None:
    # 2026-11-23 is a Monday.
    assert not DEFAULT.is_open(msk(2026, 11, 23, 8, 59, 59))
    assert DEFAULT.is_open(msk(2026, 11, 23, 9, 0))
    assert DEFAULT.is_open(msk(2026, 11, 23, 17, 59, 59, 999999))
    assert not DEFAULT.is_open(msk(2026, 11, 23, 18, 0))  # nothing at or after the end


def test_evening_opens_at_nine_next_day_as_utc() -> None:
    evening = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)  # 20:00 MSK
    assert not DEFAULT.is_open(evening)
    opens = DEFAULT.next_open(evening)
    assert opens == datetime(2026, 11, 24, 6, 0, tzinfo=UTC)  # 09:00 MSK
    assert opens.tzinfo is UTC


def test_before_opening_waits_for_today_and_open_means_now() -> None:
    assert DEFAULT.next_open(msk(2026, 11, 23, 3, 0)) == msk(2026, 11, 23, 9, 0)
    noon = msk(2026, 11, 23, 12, 0)
    assert DEFAULT.next_open(noon) == noon


def test_next_day_start_is_tomorrow_nine_even_before_todays_opening() -> None:
    assert DEFAULT.next_day_start(msk(2026, 11, 23, 10, 0)) == msk(2026, 11, 24, 9, 0)
    # 00:30 MSK Tuesday is still Monday in UTC: the local date decides.
    half_past_midnight = msk(2026, 11, 24, 0, 30)
    assert half_past_midnight.date() == date(2026, 11, 23)
    assert DEFAULT.next_day_start(half_past_midnight) == msk(2026, 11, 25, 9, 0)


def test_local_date_is_the_timezones_date() -> None:
    assert DEFAULT.local_date(datetime(2026, 11, 23, 22, 0, tzinfo=UTC)) == date(2026, 11, 24)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        DEFAULT.is_open(datetime(2026, 11, 23, 12, 0))


# --- working days -----------------------------------------------------------------------


def test_weekend_is_skipped_with_working_days() -> None:
    weekdays = WorkingHours(days=(1, 2, 3, 4, 5))
    friday_evening = msk(2026, 11, 27, 19, 0)
    saturday_noon = msk(2026, 11, 28, 12, 0)
    monday_nine = msk(2026, 11, 30, 9, 0)
    assert not weekdays.is_open(saturday_noon)
    assert weekdays.next_open(friday_evening) == monday_nine
    assert weekdays.next_open(saturday_noon) == monday_nine
    assert weekdays.next_day_start(msk(2026, 11, 27, 10, 0)) == monday_nine


def test_from_settings_reads_hours_zone_and_days() -> None:
    s = load_settings(
        {},
        dotenv=None,
        working_hours_start="08:30",
        working_hours_end="24:00",
        timezone="Asia/Yekaterinburg",
        working_days="1,3",
    )
    hours = WorkingHours.from_settings(s)
    assert hours.days == frozenset({1, 3})
    ekb = ZoneInfo("Asia/Yekaterinburg")
    # Wednesday 2026-11-25: open from 08:30 to midnight local time.
    assert hours.is_open(datetime(2026, 11, 25, 23, 59, tzinfo=ekb))
    assert not hours.is_open(datetime(2026, 11, 26, 0, 0, tzinfo=ekb))
    assert hours.next_open(datetime(2026, 11, 26, 0, 0, tzinfo=ekb)) == datetime(
        2026, 11, 30, 8, 30, tzinfo=ekb
    )


# --- end 24:00 and bad configurations ---------------------------------------------------


def test_end_of_day_2400_is_midnight() -> None:
    late = WorkingHours(start="20:00", end="24:00")
    assert late.is_open(msk(2026, 11, 23, 23, 59, 59))
    assert not late.is_open(msk(2026, 11, 24, 0, 0))
    assert late.next_open(msk(2026, 11, 24, 0, 0)) == msk(2026, 11, 24, 20, 0)
    always = WorkingHours(start="00:00", end="24:00")
    assert always.is_open(msk(2026, 11, 24, 0, 0))
    assert always.is_open(msk(2026, 11, 23, 23, 59, 59))


@pytest.mark.parametrize(
    ("start", "end", "days"),
    [
        ("18:00", "09:00", (1,)),  # a window does not cross midnight
        ("09:00", "09:00", (1,)),
        ("24:00", "24:00", (1,)),  # 24:00 only ends a day
        ("09:00", "24:30", (1,)),
        ("9am", "18:00", (1,)),
        ("09:00", "18:00", ()),
        ("09:00", "18:00", (0, 1)),
    ],
)
def test_bad_working_hours_are_refused(start: str, end: str, days: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        WorkingHours(start=start, end=end, days=days)


# --- daylight saving time ---------------------------------------------------------------


def test_dst_zone_keeps_local_nine_oclock_across_both_changes() -> None:
    berlin = WorkingHours(tz="Europe/Berlin")
    # Spring forward on 2026-03-29: 09:00 is 08:00 UTC the day before, 07:00 UTC that day.
    saturday_evening = datetime(2026, 3, 28, 19, 0, tzinfo=UTC)
    assert berlin.next_open(saturday_evening) == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)
    assert berlin.next_day_start(datetime(2026, 3, 28, 12, 0, tzinfo=UTC)) == datetime(
        2026, 3, 29, 7, 0, tzinfo=UTC
    )
    # Fall back on 2026-10-25: 09:00 is 07:00 UTC the day before, 08:00 UTC that day.
    assert berlin.next_open(datetime(2026, 10, 24, 19, 0, tzinfo=UTC)) == datetime(
        2026, 10, 25, 8, 0, tzinfo=UTC
    )
    # 18:00 local on the short day is 16:00 UTC, on the long one 17:00 UTC.
    assert not berlin.is_open(datetime(2026, 3, 29, 16, 0, tzinfo=UTC))
    assert berlin.is_open(datetime(2026, 10, 25, 16, 59, tzinfo=UTC))
    assert not berlin.is_open(datetime(2026, 10, 25, 17, 0, tzinfo=UTC))


def test_window_inside_the_dst_gap_and_fold() -> None:
    # New York springs forward at 02:00 on 2026-03-08: 02:00-02:59 does not exist.
    gap = WorkingHours(start="02:30", end="03:00", tz="America/New_York")
    assert gap.window(date(2026, 3, 8)) is None  # empty that day: skipped
    assert gap.next_open(datetime(2026, 3, 8, 0, 0, tzinfo=UTC)) == datetime(
        2026, 3, 9, 6, 30, tzinfo=UTC
    )
    # It falls back at 02:00 on 2026-11-01: 01:30 happens twice; the first one counts.
    fold = WorkingHours(start="01:30", end="05:00", tz="America/New_York")
    assert fold.window(date(2026, 11, 1)) == (
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
        datetime(2026, 11, 1, 10, 0, tzinfo=UTC),
    )


ZONES = [
    "Europe/Moscow",
    "Europe/Berlin",
    "America/New_York",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Pacific/Chatham",  # +12:45 / +13:45
    "UTC",
]


@st.composite
def calendars(draw: st.DrawFn) -> WorkingHours:
    start = draw(st.integers(0, 24 * 4 - 1)) * 15
    end = draw(st.integers(start // 15 + 1, 24 * 4)) * 15
    days = draw(st.sets(st.integers(1, 7), min_size=1))
    return WorkingHours(
        start=f"{start // 60:02d}:{start % 60:02d}",
        end=f"{end // 60:02d}:{end % 60:02d}",
        tz=draw(st.sampled_from(ZONES)),
        days=days,
    )


instants = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(hours=calendars(), now=instants)
def test_next_open_is_the_first_open_instant(hours: WorkingHours, now: datetime) -> None:
    opens = hours.next_open(now)
    assert opens >= now
    assert hours.is_open(opens)
    if hours.is_open(now):
        assert opens == now
        return
    # Closed from now until then: every 15 minutes (all bounds here are on
    # quarter hours, and so are the zones' offsets), and just before it.
    assert not hours.is_open(opens - timedelta(microseconds=1))
    t = now
    while t < opens:
        assert not hours.is_open(t)
        t += timedelta(minutes=15)


@settings(max_examples=300, deadline=None)
@given(hours=calendars(), now=instants)
def test_next_day_start_opens_a_later_local_day(hours: WorkingHours, now: datetime) -> None:
    start = hours.next_day_start(now)
    assert start > now
    assert hours.is_open(start)
    assert hours.local_date(start) > hours.local_date(now)
    assert start == hours.window(hours.local_date(start))[0]  # type: ignore[index]
    # No working day lies between today and that one.
    day = hours.local_date(now) + timedelta(days=1)
    while day < hours.local_date(start):
        assert hours.window(day) is None
        day += timedelta(days=1)


# --- months and daily limits ------------------------------------------------------------


def test_month_bounds_follow_the_local_month() -> None:
    # 21:30 UTC on Nov 30 is already December in Moscow.
    start, end = month_bounds(datetime(2026, 11, 30, 21, 30, tzinfo=UTC), MSK)
    assert start == datetime(2026, 11, 30, 21, 0, tzinfo=UTC)
    assert end == datetime(2026, 12, 31, 21, 0, tzinfo=UTC)
    start, end = month_bounds(datetime(2026, 12, 15, tzinfo=UTC), ZoneInfo("UTC"))
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def test_daily_limits_parse_and_override() -> None:
    assert parse_daily_limits("") == {}
    assert parse_daily_limits("anna=500, boris=100") == {"anna": 500, "boris": 100}
    limits = DailyLimits(50, {"anna": 500})
    assert limits.limit_for("anna") == 500
    assert limits.limit_for("boris") == 50
    assert DailyLimits().limit_for("anyone") == 0  # no daily limit
    s = load_settings({}, dotenv=None, daily_limit_default=7, daily_limits="u1=3,u2=0")
    from_settings = DailyLimits.from_settings(s)
    assert [from_settings.limit_for(u) for u in ("u1", "u2", "u3")] == [3, 0, 7]
    for bad in ("anna", "anna=", "=5", "anna=-1"):
        with pytest.raises(ValueError):
            parse_daily_limits(bad)
