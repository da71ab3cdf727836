"""The scheduler: decides which queued campaigns run now, in queue order.

It reacts to events, never polls on a beat:
- ``Wake`` arrives over NATS the moment the API queues or resumes a campaign
  (subject ``<prefix>.internal.scheduler.wake``, delivered to every process);
- ``CampaignEnded`` arrives when one of its campaign actors ends;
- ``Tick`` comes from the one timer it holds: set to the earliest moment a
  waiting entry becomes runnable (a deferral ends, a dead owner's lease runs
  out), re-armed after every decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailer import metrics
from mailer.actors.runtime import Actor
from mailer.bus import Bus
from mailer.clock import Clock

__all__ = ["CampaignEnded", "SchedulerActor", "SchedulerStore", "Tick", "WakeUp", "wake_subject"]

log = logging.getLogger("mailer.scheduler")


class WakeUp(msgspec.Struct):
    """The queue changed somewhere: look again."""


class Tick(msgspec.Struct):
    """The timer fired: a waiting entry may be runnable now."""


class CampaignEnded(msgspec.Struct):
    campaign_id: int
    error: str | None = None


SchedulerMsg = WakeUp | Tick | CampaignEnded


class SchedulerStore(Protocol):
    async def runnable(self, now: datetime, limit: int) -> list[int]: ...
    async def next_wakeup(self, now: datetime) -> datetime | None: ...


# Starts a campaign actor; returns False when it could not (already running).
SpawnCampaign = Callable[[int], Awaitable[bool]]


def wake_subject(bus: Bus) -> str:
    return bus.subject("internal", "scheduler", "wake")


class SchedulerActor(Actor[SchedulerMsg]):
    def __init__(
        self,
        *,
        bus: Bus,
        store: SchedulerStore,
        clock: Clock,
        spawn: SpawnCampaign,
        max_active: int,
    ) -> None:
        self._bus = bus
        self._store = store
        self._clock = clock
        self._spawn = spawn
        self._max_active = max_active
        self._running: set[int] = set()
        self._timer: asyncio.Task[None] | None = None
        self._timer_at: datetime | None = None
        self._sub: Subscription | None = None

    async def on_start(self) -> None:
        self._sub = await self._bus.nc.subscribe(wake_subject(self._bus), cb=self._on_wake)
        # Ready means the server knows the subscription: a request right after start works.
        await self._bus.nc.flush()
        self.ref.tell(Tick())

    async def _on_wake(self, msg: Msg) -> None:
        # A burst of wakes collapses: one queued is enough.
        if self.ref.alive and self.ref.mailbox_depth == 0:
            self.ref.tell(WakeUp())

    async def handle(self, msg: SchedulerMsg) -> object:
        if isinstance(msg, CampaignEnded):
            self._running.discard(msg.campaign_id)
            metrics.CAMPAIGNS_ACTIVE.set(len(self._running))
        await self._fill()
        return None

    async def _fill(self) -> None:
        now = self._clock.now()
        free = self._max_active - len(self._running)
        if free > 0:
            # Ask for a few more than free slots: some may be running here already.
            candidates = await self._store.runnable(now, free + len(self._running))
            for campaign_id in candidates:
                if free <= 0:
                    break
                if campaign_id in self._running:
                    continue
                if await self._spawn(campaign_id):
                    self._running.add(campaign_id)
                    free -= 1
                    log.info("campaign actor spawned", extra={"campaign_id": campaign_id})
            metrics.CAMPAIGNS_ACTIVE.set(len(self._running))
        self._arm(await self._store.next_wakeup(now))

    def _arm(self, at: datetime | None) -> None:
        if at == self._timer_at and self._timer is not None and not self._timer.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self.spawn_task(self._sleep(at), name="sched-timer")

    async def _sleep(self, at: datetime) -> None:
        await self._clock.sleep_until(at)
        if self.ref.alive:
            self.ref.tell(Tick())

    async def on_stop(self, error: BaseException | None) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
