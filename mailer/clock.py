"""The one source of "now".

Every decision that depends on time (rate windows, deferrals, leases, working
hours) asks a ``Clock``. Production uses ``SystemClock``; tests inject a
``FakeClock`` and move time with ``advance``/``set``, which wakes every timer
whose moment has come — so a test crosses an hour boundary without waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Protocol

import msgspec

__all__ = ["Clock", "FakeClock", "SystemClock", "api_time", "utc"]

# Wall-clock time may jump (NTP); a long sleep is cut into slices so a timer
# re-reads the clock at least this often instead of trusting one big sleep.
_MAX_SLICE_SECONDS = 30.0


def utc(dt: datetime) -> datetime:
    """Returns dt as an aware UTC datetime (naive values are taken as UTC)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def api_time(dt: datetime) -> str:
    """An instant as every API field writes it: UTC, ``…Z`` (msgspec's own form),
    for the few fields that carry a time as text (error details)."""
    return msgspec.json.encode(utc(dt)).decode().strip('"')


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Returns once ``now() >= when`` (at once if it already is)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleeps ``seconds`` of this clock's time."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        when = utc(when)
        while True:
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _MAX_SLICE_SECONDS))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when a test moves it.

    Sleepers wait on futures kept in a heap by deadline; ``advance``/``set``
    resolve those that are due. Relative ``sleep`` is measured on this clock
    too, so code under test never reads real time by accident.
    """

    def __init__(self, start: datetime) -> None:
        self._now = utc(start)
        self._heap: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        when = utc(when)
        if when <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (when, next(self._seq), fut))
        await fut

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._now + timedelta(seconds=seconds))

    def set(self, when: datetime) -> None:
        when = utc(when)
        if when < self._now:
            raise ValueError("FakeClock does not go backwards")
        self._now = when
        while self._heap and self._heap[0][0] <= when:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)

    def advance(self, delta: timedelta | float) -> None:
        seconds = delta.total_seconds() if isinstance(delta, timedelta) else delta
        self.set(self._now + timedelta(seconds=seconds))

    @property
    def sleepers(self) -> int:
        """How many timers are waiting (cancelled ones excluded)."""
        return sum(1 for _, _, fut in self._heap if not fut.done())

    def next_deadline(self) -> datetime | None:
        live = [when for when, _, fut in self._heap if not fut.done()]
        return min(live) if live else None
