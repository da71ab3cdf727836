"""When can mail go next? One answer from every limit at once.

A pure function of an instant and the limits' state: no I/O, no clock of its
own. The governor's refusals, every deferral, the reason texts, the owner's
notices, the manager's view and the forecast all ask it, so they cannot tell
different stories.

The model is "nothing else changes": what is spent stays spent until its
window ends (the account's clock hour, the owner's local day), a new window
starts empty, the quota is not topped up, the breaker opens when it said, the
queue lets the campaign run when it said. Under that model ``next_send``
returns the first moment at which every limit allows a send, or None when no
such moment can be known (the quota is 0: nothing goes until an administrator
or a sync tops it up, at a time nobody can name).

The reason (``NextSend.reason``) is the *binding* one: of the limits that
refuse at ``now``, the one that on its own would keep mail waiting longest
(ties: the one a manager would act on first, in ``REASONS`` order). The time
is when all limits allow together. So a campaign stopped by the hourly limit
at 17:10 with working hours ending at 18:00 is told ``rate_per_hour`` and
"tomorrow at 09:00" — not "18:00", when nothing would go.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from mailer.clock import utc
from mailer.rules import WorkingHours

__all__ = ["REASONS", "Limits", "NextSend", "Reason", "allows", "next_send"]

Reason = Literal[
    "quota_exhausted",
    "daily_limit",
    "rate_per_hour",
    "outside_hours",
    "transient_error",
    "queued",
]

# Tie order of the binding reason: the first is the one a manager must act on
# (or know about) first.
REASONS: tuple[Reason, ...] = (
    "quota_exhausted",
    "daily_limit",
    "outside_hours",
    "rate_per_hour",
    "transient_error",
    "queued",
)

# The fixpoint below moves forward at most once per limit per round; a few
# rounds settle any mix (hours and the two windows can each push once more).
_MAX_ROUNDS = 64


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What every limit says at ``now`` (the instant ``next_send`` is asked for).

    ``hour_used``/``share_left`` are of ``now``'s clock hour (UTC hours: the
    account's window), ``day_used`` of ``now``'s local day in the working
    hours' zone; a later window starts empty.
    """

    hours: WorkingHours
    # The SMTP account's hourly limit (> 0) and what this hour already spent.
    hourly_limit: int
    hour_used: int = 0
    # What is left of this campaign's fair share of this hour (None: it shares with nobody).
    share_left: int | None = None
    # The owner's daily limit (0: none) and what today already spent.
    daily_limit: int = 0
    day_used: int = 0
    # Emails left of the monthly allowance (None: not checked here).
    quota: int | None = None
    # The SMTP account's breaker holds every send until then (None: closed).
    breaker_until: datetime | None = None
    # The campaign's place in the queue lets it run from then (None: now).
    turn_at: datetime | None = None
    # Test emails ignore working hours (and the queue).
    kind: Literal["campaign", "test"] = "campaign"


@dataclass(frozen=True)
class NextSend:
    """``at``: the first moment mail can go (``now`` when it can go now; None:
    unknown). ``reason``: the binding limit (None when it can go now)."""

    at: datetime | None
    reason: Reason | None

    @property
    def waits(self) -> bool:
        return self.reason is not None


def _hour_start(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _window_ends(now: datetime, limits: Limits) -> tuple[datetime, datetime]:
    """When ``now``'s clock hour and ``now``'s local day end (UTC)."""
    return _hour_start(now) + timedelta(hours=1), limits.hours.day_end(now)


def _hour_full(limits: Limits) -> bool:
    return limits.hour_used >= limits.hourly_limit or (
        limits.share_left is not None and limits.share_left <= 0
    )


def _day_full(limits: Limits) -> bool:
    return limits.daily_limit > 0 and limits.day_used >= limits.daily_limit


def allows(t: datetime, now: datetime, limits: Limits) -> dict[Reason, bool]:
    """Whether each limit lets mail go at ``t`` (>= ``now``), nothing else changing."""
    t, now = utc(t), utc(now)
    hour_end, day_end = _window_ends(now, limits)
    return {
        "quota_exhausted": limits.quota is None or limits.quota > 0,
        "daily_limit": t >= day_end or not _day_full(limits),
        "rate_per_hour": t >= hour_end or not _hour_full(limits),
        "outside_hours": limits.kind == "test" or limits.hours.is_open(t),
        "transient_error": limits.breaker_until is None or t >= utc(limits.breaker_until),
        "queued": limits.kind == "test" or limits.turn_at is None or t >= utc(limits.turn_at),
    }


def _earliest(reason: Reason, t: datetime, now: datetime, limits: Limits) -> datetime:
    """The first moment >= ``t`` this one limit allows (the quota is handled apart)."""
    hour_end, day_end = _window_ends(now, limits)
    if reason == "daily_limit":
        return day_end if t < day_end and _day_full(limits) else t
    if reason == "rate_per_hour":
        return hour_end if t < hour_end and _hour_full(limits) else t
    if reason == "outside_hours":
        return t if limits.kind == "test" else limits.hours.next_open(t)
    if reason == "transient_error":
        b = limits.breaker_until
        return max(t, utc(b)) if b is not None else t
    if reason == "queued":
        q = limits.turn_at
        return max(t, utc(q)) if q is not None and limits.kind == "campaign" else t
    raise AssertionError(reason)


def next_send(now: datetime, limits: Limits) -> NextSend:
    """The first moment >= ``now`` every limit allows, and the binding reason."""
    now = utc(now)
    if limits.hourly_limit <= 0:
        raise ValueError("the hourly limit must be positive")
    if limits.quota is not None and limits.quota <= 0:
        # No top-up time can be named: waiting for one is the answer.
        return NextSend(None, "quota_exhausted")
    timed = REASONS[1:]
    t = now
    for _ in range(_MAX_ROUNDS):
        moved = t
        for r in timed:
            moved = _earliest(r, moved, now, limits)
        if moved == t:
            break
        t = moved
    else:  # pragma: no cover - the limits above settle in a few rounds
        raise AssertionError(f"next_send did not settle from {now} with {limits}")
    if t == now:
        return NextSend(now, None)
    # Binding: of the limits refusing now, the one alone keeping mail back longest.
    alone = {r: _earliest(r, now, now, limits) for r in timed}
    refusing = [r for r in timed if alone[r] > now]
    binding = max(refusing, key=lambda r: (alone[r], -REASONS.index(r)))
    return NextSend(t, binding)
