"""The scheduler: decides which queued campaigns run now, in queue order.

One runs in every process; only the elected leader's acts (``Leadership``
tells it when it gains or loses the lease, or when its epoch changes). Its
epoch is not its own state: a restarted scheduler (a crash in a wake, a tick
or a reconcile, e.g. PostgreSQL restarting then) asks its owner for the
current one in ``on_start``, so a restart on the leader goes on leading. It
reacts to events, never polls on a beat:
- ``WakeUp`` arrives over NATS the moment the API queues or resumes a
  campaign, a campaign actor ends anywhere, or a quota sync lifts a deferral
  (subject ``<prefix>.internal.scheduler.wake``, delivered to every process);
- ``Tick`` comes from the one timer it holds: the earliest moment a waiting
  entry becomes runnable (a deferral ends, a dead owner's lease runs out);
- ``Reconcile`` comes from a second timer, every reconcile interval, and on
  every takeover.

The leader also relays the event outbox (owner notifications a campaign
actor stored but could not publish: it crashed, or NATS was away) whenever it
looks at the queue, so a notification left behind goes out at the next wake,
timer or reconcile.

It starts a campaign by dispatching ``RunCampaign``, carrying its epoch as
fencing token, to the least-loaded process: before dispatching it calls the
roll (``<prefix>.internal.runner.load``; a stopping process has left it) and
sends to the process running the fewest campaign actors, on its own subject;
when none answered, to the runners' queue group (any process; see
``runner``). A dispatch that started nothing (no runner answered, a runner
that crashed, a campaign actor still waiting out its restart) is tried again a
second later.

Scale-out: with ``shard_min_recipients`` set, a campaign with at least that
many pending recipients is run in one shard per live process (at most its
pending count divided by the threshold): its home (shard 0) is dispatched as
above, then each helper shard whose lease is free and whose recipients are
not all done, preferably to a process holding no other shard of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final, Protocol

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailer import metrics
from mailer.actors.runner import direct_run_subject, load_subject, run_subject
from mailer.actors.runtime import Actor
from mailer.bus import Bus, decode
from mailer.clock import Clock
from mailer.messages import CampaignEvent, Notice, RunCampaign, RunnerLoad, RunReply, Wake
from mailer.store import FinalNotices

__all__ = [
    "Leadership",
    "Reconcile",
    "SchedulerActor",
    "SchedulerStore",
    "Tick",
    "WakeUp",
    "run_subject",
    "wake_subject",
]

log = logging.getLogger("mailer.scheduler")


class WakeUp(msgspec.Struct):
    """The queue changed somewhere: look again. ``ended``: a campaign actor
    (of shard ``shard``) that ended (its slot is free even if its lease period
    has not passed)."""

    ended: int | None = None
    shard: int = 0


class Tick(msgspec.Struct):
    """The timer fired: a waiting entry may be runnable now."""


class Reconcile(msgspec.Struct):
    """Repair anomalies and report stuck campaigns."""


class Leadership(msgspec.Struct):
    """This process now leads with ``epoch``, or (None) no longer does."""

    epoch: int | None


SchedulerMsg = WakeUp | Tick | Reconcile | Leadership


class FinalEvents(Protocol):
    def event_notice(self, event: CampaignEvent) -> Notice:
        """A final campaign event as an outbox row."""
        ...


class Outbox(Protocol):
    async def flush(self) -> int: ...
    async def due_in(self) -> float | None: ...


# A failed relay is tried again after this, doubling while it keeps failing.
RELAY_RETRY_FIRST_SECONDS: Final = 1.0
RELAY_RETRY_MAX_SECONDS: Final = 30.0


class Retention(Protocol):
    async def run(self, now: datetime) -> dict[str, int]:
        """One bounded pass removing rows past their age (mailer.retention)."""
        ...


class SchedulerStore(Protocol):
    async def runnable(self, now: datetime, limit: int) -> list[int]: ...
    async def next_wakeup(self, now: datetime) -> datetime | None: ...
    async def active(self, now: datetime) -> dict[int, str]: ...
    async def queue_depth(self, now: datetime) -> int: ...
    async def processing_since(self, now: datetime) -> list[tuple[int, datetime, str | None]]: ...
    async def finish_orphans(
        self, now: datetime, fence: int, *, notices: FinalNotices | None = None
    ) -> list[tuple[int, str, str, dict[str, int]]]: ...
    async def settle_stale_claims(self, now: datetime, fence: int) -> dict[int, dict[str, int]]: ...
    async def runnable_shards(self, now: datetime, limit: int) -> list[tuple[int, int]]: ...
    async def lease_holders(self, now: datetime) -> dict[tuple[int, int], str]: ...
    async def pending(self, campaign_id: int) -> int: ...


def wake_subject(bus: Bus) -> str:
    return bus.subject("internal", "scheduler", "wake")


# How long a roll call waits for the runners it knows (a dead one is waited
# for this long, a few calls in a row, before it is forgotten).
_ROLL_CALL_SECONDS = 0.1
# A runner that answered none of this many last roll calls is not counted on.
_ROLL_CALL_MEMORY = 3
# A call that knows no runner yet waits this long after the first answer.
_FIRST_CALL_GRACE_SECONDS = 0.02


class SchedulerActor(Actor[SchedulerMsg]):
    def __init__(
        self,
        *,
        bus: Bus,
        store: SchedulerStore,
        clock: Clock,
        max_active: int,
        lease_seconds: float,
        reconcile_every: float,
        stuck_after: timedelta,
        events: FinalEvents | None = None,
        outbox: Outbox | None = None,
        leadership: Callable[[], int | None] | None = None,
        retention: Retention | None = None,
        shard_min_recipients: int = 0,
    ) -> None:
        # The owner's current epoch (the leader actor's, as the service saw it last).
        self._leadership = leadership
        self._retention = retention
        self._events = events
        self._outbox = outbox
        self._bus = bus
        self._store = store
        self._clock = clock
        self._max_active = max_active
        self._lease_seconds = lease_seconds
        self._reconcile_every = reconcile_every
        self._stuck_after = stuck_after
        self._epoch: int | None = None
        self._shard_min = shard_min_recipients
        # Dispatched but not yet seen holding a lease: counted as running for
        # a lease period so a slow start is not dispatched twice. Keyed by
        # (campaign, shard): 0 the home.
        self._dispatched: dict[tuple[int, int], datetime] = {}
        # The roll calls' answers: which runners answered which of the last calls.
        self._roll: dict[str, int] = {}
        self._roll_round = 0
        self._loads: dict[str, int] = {}
        self._timer: asyncio.Task[None] | None = None
        self._timer_at: datetime | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        # The outbox's own retry (rows a relay left behind): real time, like the
        # outbox's (database) clock, not the injected one.
        self._relay_timer: asyncio.TimerHandle | None = None
        self._relay_backoff = RELAY_RETRY_FIRST_SECONDS

    async def on_start(self) -> None:
        self._sub = await self._bus.nc.subscribe(wake_subject(self._bus), cb=self._on_wake)
        await self._bus.nc.flush()
        # A fresh incarnation knows nothing: the owner says whether this process
        # leads (a later change arrives as a Leadership message after this one).
        epoch = self._leadership() if self._leadership is not None else None
        if epoch is not None:
            self.ref.tell(Leadership(epoch))

    async def _on_wake(self, msg: Msg) -> None:
        # Runs in the NATS client's task: it only turns the wake into a message
        # (a follower's handle ignores it) and reads none of the actor's state.
        if not self.ref.alive:
            return
        try:
            wake = decode(msg.data, Wake) if msg.data else Wake()
        except (msgspec.DecodeError, msgspec.ValidationError):
            wake = Wake()
        ended = wake.campaign_id if wake.ended else None
        # A burst of plain wakes collapses: one queued is enough.
        if ended is not None or self.ref.mailbox_depth == 0:
            with contextlib.suppress(Exception):
                self.ref.tell(WakeUp(ended=ended, shard=wake.shard))

    async def handle(self, msg: SchedulerMsg) -> object:
        if isinstance(msg, Leadership):
            await self._lead(msg.epoch)
        elif self._epoch is None:
            return None  # a follower keeps no timers and decides nothing
        elif isinstance(msg, Reconcile):
            await self._reconcile()
            await self._fill()
        else:
            if isinstance(msg, WakeUp) and msg.ended is not None:
                self._dispatched.pop((msg.ended, msg.shard), None)
            await self._fill()
        if self._epoch is not None and self._outbox is not None:
            await self._relay(self._outbox)
        return None

    async def _relay(self, outbox: Outbox) -> None:
        """Relays the outbox and, if rows are left, looks again on a timer: a publish
        that failed (NATS away) after a backoff, a row a dead relay took when its
        take runs out. So a notice waits for NATS, not for the next wake."""
        await outbox.flush()
        due = await outbox.due_in()
        if due is None:
            self._relay_backoff = RELAY_RETRY_FIRST_SECONDS
            return
        if due == 0.0:
            due, self._relay_backoff = (
                self._relay_backoff,
                min(self._relay_backoff * 2, RELAY_RETRY_MAX_SECONDS),
            )
        else:
            due += 0.1  # the take has run out by then on the database's clock
        if self._relay_timer is not None:
            self._relay_timer.cancel()
        self._relay_timer = asyncio.get_running_loop().call_later(due, self._relay_due)

    def _relay_due(self) -> None:
        self._relay_timer = None
        if self.ref.alive and self.ref.mailbox_depth == 0:
            with contextlib.suppress(Exception):
                self.ref.tell(Tick())

    async def _lead(self, epoch: int | None) -> None:
        if epoch == self._epoch:
            return  # announced twice (by the owner and by our on_start): nothing new
        previous, self._epoch = self._epoch, epoch
        if epoch is None:
            for task in (self._timer, self._reconciler):
                if task is not None:
                    task.cancel()
            self._timer = self._reconciler = None
            self._timer_at = None
            if self._relay_timer is not None:
                self._relay_timer.cancel()
                self._relay_timer = None
            self._dispatched.clear()
            # These gauges are the leader's view of the cluster: a follower shows
            # zeros, so alerts summing or filtering by leader stay right.
            metrics.CAMPAIGNS_ACTIVE.set(0)
            metrics.QUEUE_DEPTH.set(0)
            metrics.PROCESSING_OLDEST_SECONDS.set(0)
            return
        log.info("scheduler leads", extra={"epoch": epoch, "previous_epoch": previous})
        if self._reconciler is None:
            self._reconciler = self.spawn_task(self._reconcile_timer(), name="reconcile-timer")
        # A takeover reconciles at once: the old leader may have died mid-way.
        await self._reconcile()
        await self._fill()

    async def _fill(self) -> None:
        assert self._epoch is not None
        now = self._clock.now()
        active = await self._store.active(now)
        horizon = now - timedelta(seconds=self._lease_seconds)
        self._dispatched = {
            key: at
            for key, at in self._dispatched.items()
            if at > horizon and not (key[1] == 0 and key[0] in active)
        }
        running = set(active) | {cid for cid, k in self._dispatched if k == 0}
        free = self._max_active - len(running)
        self._loads = {}
        if free > 0:
            for campaign_id in await self._store.runnable(now, free + len(running)):
                if free <= 0:
                    break
                if campaign_id in running:
                    continue
                if await self._dispatch(campaign_id, self._epoch):
                    self._dispatched[(campaign_id, 0)] = now
                    running.add(campaign_id)
                    free -= 1
        if self._shard_min > 0:
            await self._fill_shards(now)
        metrics.CAMPAIGNS_ACTIVE.set(len(running))
        metrics.QUEUE_DEPTH.set(await self._store.queue_depth(now))
        self._arm(await self._store.next_wakeup(now))

    async def _fill_shards(self, now: datetime) -> None:
        """Dispatches the helper shards that may run now (see the module's text)."""
        assert self._epoch is not None
        shards = await self._store.runnable_shards(now, 64)
        shards = [key for key in shards if key not in self._dispatched]
        if not shards:
            return
        holders = await self._store.lease_holders(now)
        for campaign_id, shard in shards:
            busy = {owner for (cid, _), owner in holders.items() if cid == campaign_id}
            if await self._dispatch(campaign_id, self._epoch, shard=shard, avoid=busy):
                self._dispatched[(campaign_id, shard)] = now

    async def _call_roll(self) -> dict[str, int]:
        """{runner: campaign actors it runs} of the processes answering now.

        Waits until every runner that answered one of the last few calls did,
        at most ``_ROLL_CALL_SECONDS``; late answers still count for the next call.
        """
        self._roll_round += 1
        this = self._roll_round
        known = {r for r, at in self._roll.items() if at > this - _ROLL_CALL_MEMORY}
        loads: dict[str, int] = {}
        enough = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            try:
                answer = decode(msg.data, RunnerLoad)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            loads[answer.runner] = answer.campaigns
            self._roll[answer.runner] = this
            if known and known <= set(loads):
                enough.set()
            elif not known and len(loads) == 1:
                # The first call knows nobody yet: the others answer within
                # moments of the first, so a short grace, not the whole wait.
                asyncio.get_running_loop().call_later(_FIRST_CALL_GRACE_SECONDS, enough.set)

        nc = self._bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_answer)
        try:
            await nc.publish(load_subject(self._bus), b"", reply=inbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), _ROLL_CALL_SECONDS)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return dict(loads)

    async def _target(self, avoid: set[str]) -> str | None:
        """The least-loaded live runner (one not in ``avoid`` if any), counting
        what this look already dispatched; None when none answered."""
        if not self._loads:
            self._loads = await self._call_roll()
        if not self._loads:
            return None
        choices = [r for r in self._loads if r not in avoid] or list(self._loads)
        return min(choices, key=lambda r: (self._loads[r], r))

    async def _shard_count(self, campaign_id: int) -> int:
        """How many shards the campaign's home asks for: one per live process
        (the roll call), at most one per ``shard_min_recipients`` pending."""
        if self._shard_min <= 0:
            return 1
        if not self._loads:
            self._loads = await self._call_roll()
        live = len(self._loads)
        if live < 2:
            return 1
        pending = await self._store.pending(campaign_id)
        return max(1, min(live, pending // self._shard_min))

    async def _dispatch(
        self, campaign_id: int, epoch: int, *, shard: int = 0, avoid: set[str] | None = None
    ) -> bool:
        shards = await self._shard_count(campaign_id) if shard == 0 else 1
        target = await self._target(avoid or set())
        request = RunCampaign(campaign_id=campaign_id, fence=epoch, shard=shard, shards=shards)
        subject = run_subject(self._bus)
        if target is not None:
            subject = direct_run_subject(self._bus, target)
            # Counted at once: the next dispatch of this look goes elsewhere.
            self._loads[target] += 1
        try:
            try:
                reply = await self._bus.request(subject, request, RunReply, timeout=10.0)
            except Exception:
                if subject == run_subject(self._bus):
                    raise
                # The chosen process went away since it answered: any runner.
                self._loads.pop(target or "", None)
                reply = await self._bus.request(
                    run_subject(self._bus), request, RunReply, timeout=10.0
                )
        except Exception as exc:
            # No runner answered (all busy or NATS trouble): try again soon.
            log.warning("campaign dispatch failed: %r", exc, extra={"campaign_id": campaign_id})
            self._arm(self._clock.now() + timedelta(seconds=1))
            return False
        log.info(
            "campaign dispatched",
            extra={
                "campaign_id": campaign_id,
                "shard": shard,
                "shards": shards,
                "runner": reply.runner,
                "started": reply.started,
            },
        )
        if not reply.started:
            # Taken elsewhere (the next look sees its lease), or not started here:
            # a runner that crashed, an actor waiting out its restart. Look again.
            self._arm(self._clock.now() + timedelta(seconds=1))
        return reply.started

    def _arm(self, at: datetime | None) -> None:
        """Keeps one timer, at the earliest moment anything is due."""
        if at is None:
            return  # nothing waits for a time; a pending earlier timer is harmless
        pending = self._timer is not None and not self._timer.done()
        if pending and self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.spawn_task(self._sleep(at), name="timer")

    async def _sleep(self, at: datetime) -> None:
        await self._clock.sleep_until(at)
        self._timer_at = None
        if self.ref.alive:
            self.ref.tell(Tick())

    async def _reconcile_timer(self) -> None:
        while True:
            await self._clock.sleep(self._reconcile_every)
            if self.ref.alive:
                self.ref.tell(Reconcile())

    async def _reconcile(self) -> None:
        """Repairs what no event would: finals never written, stuck campaigns."""
        assert self._epoch is not None
        now = self._clock.now()
        oldest = 0.0
        for campaign_id, leased_at, reason in await self._store.processing_since(now):
            age = (now - leased_at).total_seconds()
            oldest = max(oldest, age)
            if age > self._stuck_after.total_seconds():
                log.error(
                    "campaign processing for too long",
                    extra={
                        "campaign_id": campaign_id,
                        "processing_minutes": round(age / 60, 1),
                        "defer_reason": reason,
                    },
                )
        metrics.PROCESSING_OLDEST_SECONDS.set(oldest)
        stale = await self._store.settle_stale_claims(now, self._epoch)
        for campaign_id, verdicts in stale.items():
            # A claim that outlived its lease: its rows would keep the live
            # owner from ever finishing. Handed ones may have reached SMTP (in
            # doubt); the others never left their owner (pending again).
            log.warning(
                "reconcile: recipients claimed under a lost lease settled",
                extra={
                    "campaign_id": campaign_id,
                    "in_doubt": verdicts.get("in_doubt", 0),
                    "pending": verdicts.get("pending", 0),
                },
            )
        events = self._events

        def final(cid: int, owner: str, status: str, counts: dict[str, int]) -> list[Notice]:
            if events is None:
                return []
            event = CampaignEvent(
                event=status, campaign_id=cid, owner_id=owner, status=status, at=now, counts=counts
            )
            return [events.event_notice(event)]

        for campaign_id, _, status, counts in await self._store.finish_orphans(
            now, self._epoch, notices=final
        ):
            # The same fields as the campaign actor's "campaign finished": a search
            # for finished_with_errors=true finds campaigns reconcile finished too.
            # Its final event is in the outbox, relayed after this reconcile.
            log.warning(
                "reconcile: campaign had nothing left but was not final",
                extra={
                    "campaign_id": campaign_id,
                    "status": status,
                    "finished_with_errors": status != "sent",
                    "counts": counts,
                },
            )
        if self._retention is not None:
            try:
                await self._retention.run(now)
            except Exception as exc:
                # Old rows can wait: a failed pass is tried again at the next
                # reconcile; it must not restart the scheduler (and its timers).
                log.error("retention pass failed: %r", exc)

    async def on_stop(self, error: BaseException | None) -> None:
        if self._relay_timer is not None:
            self._relay_timer.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
