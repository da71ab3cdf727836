"""The calendar of sending: working hours, the manager's day, the quota's month.

Pure functions of an instant: no I/O, no clock of their own. The rate governor
asks them with the Clock's "now"; tests ask them with any instant they like.

Every instant in and out is an aware datetime; results are in UTC. Wall times
("09:00 on Monday in Europe/Moscow") become instants through ``zoneinfo``, so
zones with daylight saving time work: a window opens at 09:00 local time
whatever the offset is that day. Comparisons are made in UTC on purpose —
Python compares two datetimes of the *same* tzinfo by wall time, which is
wrong across a DST fold.

DST edge cases, as zoneinfo resolves them (PEP 495, ``fold=0``): a start or
end inside a spring-forward gap moves forward by the gap (a 02:30 that does
not exist acts as 03:30), and one inside a fall-back fold means its first
occurrence. A day whose window is empty that way has no working hours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from mailer.config import Settings

__all__ = [
    "DailyLimits",
    "WorkingHours",
    "month_bounds",
    "parse_daily_limits",
    "working_days_between",
]

_MINUTES_PER_DAY = 24 * 60
# A search for the next working day needs at most a week; two give room for a
# working day whose window DST made empty.
_SEARCH_DAYS = 15


def _minutes(hhmm: str, *, allow_24: bool) -> int:
    """``"09:30"`` -> 570; ``"24:00"`` -> 1440 when allowed (the end of the day)."""
    hours_text, sep, minutes_text = hhmm.partition(":")
    if not sep or not hours_text.isdigit() or not minutes_text.isdigit():
        raise ValueError(f"not a HH:MM time: {hhmm!r}")
    hours, minutes = int(hours_text), int(minutes_text)
    total = hours * 60 + minutes
    if minutes > 59 or total > _MINUTES_PER_DAY or (total == _MINUTES_PER_DAY and not allow_24):
        raise ValueError(f"not a time of day: {hhmm!r}")
    return total


def _aware_utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("an aware datetime is required")
    return now.astimezone(UTC)


class WorkingHours:
    """The window in which campaigns may send: [start, end) local time on working days.

    ``end`` may be ``"24:00"`` (midnight ending the day). A window does not cross
    midnight: ``end`` must be later than ``start``.
    """

    def __init__(
        self,
        *,
        start: str = "09:00",
        end: str = "18:00",
        tz: str | tzinfo = "Europe/Moscow",
        days: Iterable[int] = (1, 2, 3, 4, 5, 6, 7),
    ) -> None:
        self._start = _minutes(start, allow_24=False)
        self._end = _minutes(end, allow_24=True)
        if self._end <= self._start:
            raise ValueError(f"working hours end {end} must be later than start {start}")
        self.tz: tzinfo = ZoneInfo(tz) if isinstance(tz, str) else tz
        self.days = frozenset(days)
        if not self.days or not self.days <= set(range(1, 8)):
            raise ValueError(f"working days must be ISO weekdays 1..7, got {sorted(self.days)}")
        self.start_text, self.end_text = start, end

    @classmethod
    def from_settings(cls, s: Settings) -> WorkingHours:
        return cls(
            start=s.working_hours_start,
            end=s.working_hours_end,
            tz=s.timezone,
            days=(int(d) for d in s.working_days.split(",")),
        )

    def __repr__(self) -> str:
        days = ",".join(str(d) for d in sorted(self.days))
        return f"WorkingHours({self.start_text}-{self.end_text} {self.tz} days={days})"

    # --- the calendar -------------------------------------------------------------------

    def local_date(self, now: datetime) -> date:
        """The calendar date at ``now`` in this timezone (the day of daily limits)."""
        return _aware_utc(now).astimezone(self.tz).date()

    def _at(self, day: date, minutes: int) -> datetime:
        """The instant (UTC) of a wall time on a local date; 1440 is the next midnight."""
        if minutes == _MINUTES_PER_DAY:
            day, minutes = day + timedelta(days=1), 0
        hour, minute = divmod(minutes, 60)
        local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=self.tz)
        return local.astimezone(UTC)

    def window(self, day: date) -> tuple[datetime, datetime] | None:
        """[open, close) of a local date in UTC, or None when nothing may be sent that day."""
        if day.isoweekday() not in self.days:
            return None
        opens, closes = self._at(day, self._start), self._at(day, self._end)
        return (opens, closes) if opens < closes else None

    def is_open(self, now: datetime) -> bool:
        """True when a campaign may send at ``now`` (never at or after the end)."""
        now = _aware_utc(now)
        # A window lies within its own local date, so only today's can contain now.
        w = self.window(self.local_date(now))
        return w is not None and w[0] <= now < w[1]

    def closes_at(self, now: datetime) -> datetime | None:
        """The end of the working window ``now`` is in (UTC); None when closed."""
        now = _aware_utc(now)
        w = self.window(self.local_date(now))
        return w[1] if w is not None and w[0] <= now < w[1] else None

    def day_end(self, now: datetime) -> datetime:
        """The next local midnight (UTC): where ``now``'s daily count ends."""
        return self._at(self.local_date(now), _MINUTES_PER_DAY)

    def next_open(self, now: datetime) -> datetime:
        """``now`` when open, else the start of the next working window (UTC)."""
        now = _aware_utc(now)
        today = self.local_date(now)
        for offset in range(_SEARCH_DAYS):
            w = self.window(today + timedelta(days=offset))
            if w is None:
                continue
            opens, closes = w
            if now < opens:
                return opens
            if now < closes:
                return now
        raise AssertionError(f"{self!r} has no working window within {_SEARCH_DAYS} days")

    def next_day_start(self, now: datetime) -> datetime:
        """The start of the first working day after ``now``'s local date (UTC).

        Where a daily limit sends a campaign: its counter is per local date, so
        nothing more may go today, whatever the hour.
        """
        today = self.local_date(now)
        for offset in range(1, _SEARCH_DAYS + 1):
            w = self.window(today + timedelta(days=offset))
            if w is not None:
                return w[0]
        raise AssertionError(f"{self!r} has no working window within {_SEARCH_DAYS} days")


def working_days_between(hours: WorkingHours, first: datetime, last: datetime) -> int:
    """How many working days (local dates with a window) from ``first``'s date to
    ``last``'s, both counted: "about 12 working days" of a forecast."""
    day, end = hours.local_date(first), hours.local_date(last)
    n = 0
    while day <= end:
        n += hours.window(day) is not None
        day += timedelta(days=1)
    return n


def month_bounds(now: datetime, tz: tzinfo) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) of ``now``'s local month, in UTC."""
    local = _aware_utc(now).astimezone(tz)
    start = datetime(local.year, local.month, 1, tzinfo=tz)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    end = datetime(year, month, 1, tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def parse_daily_limits(text: str) -> dict[str, int]:
    """``"anna=500,boris=100"`` -> ``{"anna": 500, "boris": 100}`` (blank: none)."""
    limits: dict[str, int] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        user, sep, value = item.partition("=")
        user = user.strip()
        if not sep or not user or not value.strip().isdigit():
            raise ValueError(f"a daily limit must read user=number, got {item!r}")
        limits[user] = int(value)
    return limits


class DailyLimits:
    """How many emails a manager may send per local day; 0 means no limit."""

    def __init__(self, default: int = 0, overrides: Mapping[str, int] | None = None) -> None:
        if default < 0 or any(v < 0 for v in (overrides or {}).values()):
            raise ValueError("daily limits cannot be negative")
        self.default = default
        self.overrides = dict(overrides or {})

    @classmethod
    def from_settings(cls, s: Settings) -> DailyLimits:
        return cls(s.daily_limit_default, parse_daily_limits(s.daily_limits))

    def limit_for(self, owner_id: str) -> int:
        return self.overrides.get(owner_id, self.default)
