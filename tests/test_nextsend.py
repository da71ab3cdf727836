"""``next_send``: the one answer to "when does mail go next?" under every limit at once.

Pure: instants are placed by hand (a FakeClock's ``now`` stands for the
service's). The property test checks the answer against a brute-force scan,
minute by minute, of what each limit allows.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.clock import FakeClock
from mailer.nextsend import Limits, NextSend, allows, next_send
from mailer.rules import WorkingHours

MSK = ZoneInfo("Europe/Moscow")
OFFICE = WorkingHours(start="09:00", end="18:00", tz="Europe/Moscow")
WEEKDAYS = WorkingHours(start="09:00", end="18:00", tz="Europe/Moscow", days=(1, 2, 3, 4, 5))


def msk(y: int, mo: int, d: int, h: int, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=MSK).astimezone(UTC)


# 2026-11-23 is a Monday.
MON_1710 = msk(2026, 11, 23, 17, 10)
TUE_0900 = msk(2026, 11, 24, 9)


def limits(**kw: object) -> Limits:
    base: dict[str, object] = {"hours": OFFICE, "hourly_limit": 2}
    base.update(kw)
    return Limits(**base)  # type: ignore[arg-type]


def test_nothing_refuses_mail_goes_now() -> None:
    clock = FakeClock(MON_1710)
    assert next_send(clock.now(), limits(hour_used=1)) == NextSend(clock.now(), None)


def test_hourly_limit_late_in_the_day_names_the_next_morning_not_the_next_hour() -> None:
    # The issue: 2/h reached at 17:10 said 18:00, when working hours are over.
    got = next_send(MON_1710, limits(hour_used=2))
    assert got == NextSend(TUE_0900, "rate_per_hour")


def test_hourly_limit_mid_day_names_the_next_hour() -> None:
    now = msk(2026, 11, 23, 13, 15)
    assert next_send(now, limits(hour_used=2)) == NextSend(msk(2026, 11, 23, 14), "rate_per_hour")


def test_a_used_up_fair_share_waits_for_the_next_hour() -> None:
    now = msk(2026, 11, 23, 13, 15)
    got = next_send(now, limits(hourly_limit=30, hour_used=10, share_left=0))
    assert got == NextSend(msk(2026, 11, 23, 14), "rate_per_hour")


def test_quota_zero_is_unknown_whatever_else_holds() -> None:
    # Outside hours too: the quota decides, and no time can be named.
    night = msk(2026, 11, 23, 22)
    assert next_send(night, limits(quota=0)) == NextSend(None, "quota_exhausted")
    assert next_send(MON_1710, limits(quota=0, hour_used=2)) == NextSend(None, "quota_exhausted")


def test_quota_left_does_not_hold_mail_back() -> None:
    assert next_send(MON_1710, limits(quota=1)) == NextSend(MON_1710, None)


def test_daily_limit_names_the_next_working_day() -> None:
    friday = msk(2026, 11, 27, 12)
    got = next_send(friday, limits(hours=WEEKDAYS, daily_limit=5, day_used=5, hour_used=2))
    # The day's wait contains the hour's: the day is named.
    assert got == NextSend(msk(2026, 11, 30, 9), "daily_limit")


def test_outside_hours_names_the_opening() -> None:
    evening = msk(2026, 11, 23, 19)
    assert next_send(evening, limits()) == NextSend(TUE_0900, "outside_hours")


def test_outside_hours_with_the_hour_used_up_is_outside_hours() -> None:
    # The hour alone would reopen at 20:00; the hours keep it till 09:00.
    evening = msk(2026, 11, 23, 19, 30)
    assert next_send(evening, limits(hour_used=2)) == NextSend(TUE_0900, "outside_hours")


def test_breaker_open_past_closing_waits_for_the_morning() -> None:
    now = msk(2026, 11, 23, 17, 58)
    got = next_send(now, limits(breaker_until=now + timedelta(minutes=5)))
    assert got == NextSend(TUE_0900, "transient_error")


def test_breaker_within_hours() -> None:
    now = msk(2026, 11, 23, 12)
    got = next_send(now, limits(breaker_until=now + timedelta(minutes=5)))
    assert got == NextSend(now + timedelta(minutes=5), "transient_error")


def test_queue_turn_and_limits_combine() -> None:
    now = msk(2026, 11, 23, 12)
    turn = msk(2026, 11, 23, 17, 59)
    assert next_send(now, limits(turn_at=turn)) == NextSend(turn, "queued")
    # The turn comes after closing: the next opening, still "queued".
    late = msk(2026, 11, 23, 18, 30)
    assert next_send(now, limits(turn_at=late)) == NextSend(TUE_0900, "queued")


def test_test_emails_ignore_hours_and_queue() -> None:
    night = msk(2026, 11, 23, 22)
    got = next_send(night, limits(kind="test", turn_at=night + timedelta(hours=5)))
    assert got == NextSend(night, None)
    got = next_send(night, limits(kind="test", hour_used=2))
    assert got == NextSend(msk(2026, 11, 23, 23), "rate_per_hour")


def test_ties_name_the_reason_to_act_on_first() -> None:
    # Day and hour both end at midnight (hours open all day): the day is named.
    allday = WorkingHours(start="00:00", end="24:00", tz="Europe/Moscow")
    now = msk(2026, 11, 23, 23, 30)
    got = next_send(now, limits(hours=allday, hour_used=2, daily_limit=1, day_used=1))
    assert got == NextSend(msk(2026, 11, 24, 0), "daily_limit")


def test_a_non_positive_hourly_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        next_send(MON_1710, limits(hourly_limit=0))


def test_allows_at_the_answer() -> None:
    now = MON_1710
    lim = limits(hour_used=2, daily_limit=3, day_used=1)
    got = next_send(now, lim)
    assert got.at is not None and all(allows(got.at, now, lim).values())
    assert not all(allows(now, now, lim).values())


# --- the property: the answer is the first moment a minute-by-minute scan finds ------

ZONES = ["Europe/Moscow", "UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]
START = datetime(2026, 1, 1, tzinfo=UTC)
HORIZON_MINUTES = 17 * 24 * 60


# One integer per case, read as digits of mixed radix: a strategy drawing a
# dozen values costs Hypothesis more than the test itself, and ten thousand
# cases must stay quick. Each digit is one choice below (shrinking still
# moves toward small values: 00:00, Monday, the first minute of the year).
_RADICES = (
    ("zone", len(ZONES)),
    ("start", 48),  # working hours start, in half hours
    ("length", 48),  # their length in half hours, minus one (cut at midnight)
    ("mask", 127),  # working days, a bit mask of Monday..Sunday, minus one
    ("minute", 365 * 24 * 60),  # now: any minute of a year, DST changes included
    ("hourly", 5),  # hourly limit, minus one
    ("used", 6),  # hour used (cut at the limit)
    ("share", 5),  # fair share left: 0..3, or 4 for none
    ("daily", 6),  # daily limit (0: none)
    ("dused", 6),  # day used (cut at the limit)
    ("quota", 5),  # quota: 0..3, or 4 for not checked
    ("brk", 2 * (3 * 24 * 60 + 61)),  # breaker: minutes from now - 60, or closed
    ("turn", 2 * (3 * 24 * 60 + 61)),  # queue turn: the same
    ("kind", 4),  # a test email one time in four
)
_SPACE = 1
for _, _r in _RADICES:
    _SPACE *= _r


def _digits(n: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, radix in _RADICES:
        n, out[name] = divmod(n, radix)
    return out


def _offset(now: datetime, digit: int) -> datetime | None:
    span = 3 * 24 * 60 + 61
    return None if digit >= span else now + timedelta(minutes=digit - 60)


def _case(n: int) -> tuple[datetime, Limits]:
    d = _digits(n)
    start = d["start"] * 30
    end = min(start + (d["length"] + 1) * 30, 24 * 60)
    hours = WorkingHours(
        start=f"{start // 60:02d}:{start % 60:02d}",
        end=f"{end // 60:02d}:{end % 60:02d}",
        tz=ZONES[d["zone"]],
        days=[k for k in range(1, 8) if (d["mask"] + 1) & (1 << (k - 1))],
    )
    now = START + timedelta(minutes=d["minute"])
    hourly = d["hourly"] + 1
    lim = Limits(
        hours=hours,
        hourly_limit=hourly,
        hour_used=min(d["used"], hourly),
        share_left=None if d["share"] == 4 else d["share"],
        daily_limit=d["daily"],
        day_used=min(d["dused"], d["daily"]),
        quota=None if d["quota"] == 4 else d["quota"],
        breaker_until=_offset(now, d["brk"]),
        turn_at=_offset(now, d["turn"]),
        kind="test" if d["kind"] == 3 else "campaign",
    )
    return now, lim


cases = st.integers(0, _SPACE - 1).map(_case)


def first_allowed_minute(now: datetime, lim: Limits) -> datetime | None:
    """The brute force: every minute from ``now``, each limit checked on its own terms.

    Independent of ``next_send``: the working windows are built here from the
    local dates, and the scan runs on whole minutes as integers (fast enough
    for ten thousand cases).
    """
    if lim.quota is not None and lim.quota <= 0:
        return None
    tz = lim.hours.tz
    base = now

    def minute(t: datetime) -> int:
        return int((t - base).total_seconds() // 60)

    opens: list[tuple[int, int]] = []
    local_today = now.astimezone(tz).date()
    start_h, start_m = map(int, lim.hours.start_text.split(":"))
    end_h, end_m = map(int, lim.hours.end_text.split(":"))
    for k in range(-1, 19):
        d: date = local_today + timedelta(days=k)
        if d.isoweekday() not in lim.hours.days:
            continue
        o = datetime.combine(d, time(start_h, start_m), tz).astimezone(UTC)
        if (end_h, end_m) == (24, 0):
            c = datetime.combine(d + timedelta(days=1), time(), tz).astimezone(UTC)
        else:
            c = datetime.combine(d, time(end_h, end_m), tz).astimezone(UTC)
        if o < c:
            opens.append((minute(o), minute(c)))
    next_hour = minute(now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1))
    day_end = minute(datetime.combine(local_today + timedelta(days=1), time(), tz).astimezone(UTC))
    hour_full = lim.hour_used >= lim.hourly_limit or (
        lim.share_left is not None and lim.share_left <= 0
    )
    day_full = lim.daily_limit > 0 and lim.day_used >= lim.daily_limit
    breaker = minute(lim.breaker_until) if lim.breaker_until else -(10**9)
    turn = minute(lim.turn_at) if lim.turn_at and lim.kind == "campaign" else -(10**9)
    test = lim.kind == "test"
    # One byte per minute of the horizon: 1 where every limit allows it.
    ok = bytearray(HORIZON_MINUTES) if not test else bytearray(b"\x01" * HORIZON_MINUTES)
    if not test:
        for o, c in opens:
            lo, hi = max(o, 0), min(c, HORIZON_MINUTES)
            if lo < hi:
                ok[lo:hi] = b"\x01" * (hi - lo)
    for full, until in ((hour_full, next_hour), (day_full, day_end), (True, breaker), (True, turn)):
        if full and until > 0:
            ok[:until] = bytes(min(until, HORIZON_MINUTES))
    m = ok.find(1)
    if m >= 0:
        return base + timedelta(minutes=m)
    raise AssertionError("no allowed minute within the horizon: widen it")


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_next_send_is_the_first_moment_every_limit_allows(case: tuple[datetime, Limits]) -> None:
    now, lim = case
    got = next_send(now, lim)
    expected = first_allowed_minute(now, lim)
    if expected is None:
        assert got == NextSend(None, "quota_exhausted")
        return
    assert got.at is not None
    # Never earlier than the first moment all limits allow...
    assert got.at >= expected
    # ...and mail does go then, nothing else changing: it is that moment.
    assert all(allows(got.at, now, lim).values())
    assert got.at == expected
    # A reason exactly when mail cannot go now; it refuses now.
    assert (got.reason is None) == (got.at == now)
    if got.reason is not None:
        assert not allows(now, now, lim)[got.reason]


# --- max-min fair shares (the rule the governor's script applies) -----------------------


def test_max_min_shares_give_what_one_cannot_use_to_the_others() -> None:
    from mailer.ratelimit import max_min_shares

    assert max_min_shares(30, [5, 20, 20]) == [5, 13, 12]
    assert max_min_shares(30, [20, 5, 20]) == [13, 5, 12]
    assert max_min_shares(30, [0, 20, 20]) == [0, 15, 15]
    assert max_min_shares(30, [3, 4, 5]) == [3, 4, 5]
    assert max_min_shares(10, [20, 20, 20]) == [4, 3, 3]
    assert max_min_shares(0, [1, 2]) == [0, 0]
    assert max_min_shares(7, []) == []
