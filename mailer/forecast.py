"""When will each campaign of the queue start and finish? A forecast under every limit.

Pure: the queue and the limits' state in, a forecast per campaign out. It
replays the sending the service will do, nothing else changing, moving from
one moment mail can go to the next with ``nextsend.next_send`` — the same
answer the governor refuses with — so a forecast and a deferral never tell
two stories:

- the account's hourly limit, shared by the campaigns that run together
  (``max_active``) by the governor's max-min rule (``max_min_shares``), one at
  a time in queue order otherwise;
- working hours and days in the service's zone;
- each manager's daily limit (shared by their campaigns);
- the monthly quota: where it runs out, the rest cannot be known (``None``,
  ``quota_exhausted``) — nobody can say when it is topped up;
- a campaign's own wait for SMTP (``transient_error`` until a time).

Sending itself is taken as instant: a campaign's hour goes at the moment the
hour opens (the service sends a batch within seconds of a window opening).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from mailer.clock import utc
from mailer.nextsend import Limits, Reason, next_send
from mailer.ratelimit import hour_start, max_min_shares
from mailer.rules import WorkingHours

__all__ = ["Entry", "Outlook", "forecast"]

# A forecast replays at most this many windows (an hour each at most): about
# two years of working hours at one window a day. Beyond it: not known.
_MAX_STEPS = 20_000


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A campaign of the queue (not paused, not finished), in queue order."""

    campaign_id: int
    owner_id: str
    # Recipients still to send (pending, or claimed by a batch in flight).
    remaining: int
    # The campaign's own wait for SMTP (a transient error's retry), if any.
    smtp_wait_until: datetime | None = None
    # Whether it already sent (its start is behind it).
    started: bool = False


@dataclass(frozen=True)
class Outlook:
    """``starts_at``: its first message (None once started, or not known);
    ``completes_at``: its last (None: not known — ``reason`` says why);
    ``next_at``: its next message, started or not (None: not known)."""

    starts_at: datetime | None
    completes_at: datetime | None
    reason: Reason | None = None
    next_at: datetime | None = field(default=None, compare=False)


@dataclass
class _State:
    entry: Entry
    left: int
    first: datetime | None = None
    last: datetime | None = None


@dataclass
class _Windows:
    """What the hour and each owner's day already spent, as the replay moves on."""

    hours: WorkingHours
    hour: datetime
    hour_used: int
    day: object
    day_used: dict[str, int] = field(default_factory=dict)

    def move_to(self, t: datetime) -> None:
        if hour_start(t) != self.hour:
            self.hour, self.hour_used = hour_start(t), 0
        if self.hours.local_date(t) != self.day:
            self.day, self.day_used = self.hours.local_date(t), {}


def forecast(
    now: datetime,
    queue: Sequence[Entry],
    *,
    hours: WorkingHours,
    hourly_limit: int,
    hour_used: int = 0,
    daily_limit: Callable[[str], int] = lambda owner: 0,
    day_used: Mapping[str, int] | None = None,
    quota: int | None = None,
    max_active: int = 1,
) -> dict[int, Outlook]:
    """The start and completion of every campaign of ``queue`` (in queue order)."""
    now = utc(now)
    w = _Windows(hours, hour_start(now), hour_used, hours.local_date(now), dict(day_used or {}))
    states = [_State(e, e.remaining) for e in queue]
    left_quota = quota
    t = now
    unknown: Reason | None = None
    for _ in range(_MAX_STEPS):
        waiting = [s for s in states if s.left > 0]
        if not waiting:
            break
        if left_quota is not None and left_quota <= 0:
            unknown = "quota_exhausted"
            break

        def limits(s: _State, quota_now: int | None = left_quota) -> Limits:
            owner = s.entry.owner_id
            return Limits(
                hours=hours,
                hourly_limit=hourly_limit,
                hour_used=w.hour_used,
                daily_limit=daily_limit(owner),
                day_used=w.day_used.get(owner, 0),
                quota=quota_now,
                breaker_until=s.entry.smtp_wait_until,
            )

        # Counters are those of t's windows: ask from t, for each campaign.
        times = [next_send(t, limits(s)).at for s in waiting]
        known = [x for x in times if x is not None]
        if not known:  # pragma: no cover - only the quota makes it unknown, handled above
            unknown = "quota_exhausted"
            break
        t = min(known)
        w.move_to(t)
        ready = [s for s in waiting if next_send(t, limits(s)).at == t][: max(1, max_active)]
        room = hourly_limit - w.hour_used
        if left_quota is not None:
            room = min(room, left_quota)
        demands = []
        for s in ready:
            owner = s.entry.owner_id
            cap = daily_limit(owner)
            day_left = cap - w.day_used.get(owner, 0) if cap > 0 else s.left
            demands.append(max(0, min(s.left, day_left)))
        if max_active > 1:
            parts = max_min_shares(room, demands)
        else:
            parts = [min(room, d) for d in demands[:1]] + [0] * (len(demands) - 1)
        sent = 0
        for s, part in zip(ready, parts, strict=True):
            owner = s.entry.owner_id
            cap = daily_limit(owner)
            # Two campaigns of one owner share their day.
            n = min(part, cap - w.day_used.get(owner, 0)) if cap > 0 else part
            if n <= 0:
                continue
            s.left -= n
            s.first = s.first or t
            if s.left == 0:
                s.last = t
            w.hour_used += n
            w.day_used[owner] = w.day_used.get(owner, 0) + n
            if left_quota is not None:
                left_quota -= n
            sent += n
        if sent == 0:  # pragma: no cover - a moment every limit allows sends something
            raise AssertionError(f"forecast made no progress at {t}")
    result: dict[int, Outlook] = {}
    for s in states:
        starts = None if s.entry.started else s.first
        if s.left == 0:
            result[s.entry.campaign_id] = Outlook(starts, s.last or now, next_at=s.first)
        else:
            # Only the quota makes the future unknown (or a replay longer than
            # _MAX_STEPS windows: then no reason is claimed).
            result[s.entry.campaign_id] = Outlook(starts, None, unknown, next_at=s.first)
    return result
