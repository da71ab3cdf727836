"""The event outbox: an owner notification is stored with its deferral and
reaches the events stream even when JetStream could not take it at first.

Real NATS (the stream is deleted to make publishes fail, then recreated),
real PostgreSQL; only the clock is faked.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client
from nats.js import api

from mailer.actors.scheduler import RELAY_RETRY_MAX_SECONDS, Tick
from mailer.clock import FakeClock
from mailer.events import MSG_ID_HEADER, Notification, stream_name
from mailer.messages import Wake
from tests.helpers import Crm, Events, people

MONDAY_1015_UTC = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


class Ended:
    """The wakes campaign actors publish when they end, as they arrive."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.changed = asyncio.Condition()

    async def on_msg(self, msg) -> None:
        wake = msgspec.json.decode(msg.data, type=Wake)
        if wake.ended and wake.campaign_id is not None:
            async with self.changed:
                self.ids.add(wake.campaign_id)
                self.changed.notify_all()

    async def wait(self, campaign_id: int) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(lambda: campaign_id in self.ids)


async def _ended(nc: Client, prefix: str) -> Ended:
    ended = Ended()
    await nc.subscribe(f"{prefix}.internal.scheduler.wake", cb=ended.on_msg)
    await nc.flush()
    return ended


async def test_a_notification_jetstream_refused_is_relayed_by_the_leader_later(
    make_service, crm: Crm, events: Events, nc, db, settings
) -> None:
    prefix = settings.subject_prefix
    clock = FakeClock(MONDAY_1015_UTC)
    service = await make_service(clock=clock, rate_per_hour=2, batch_size=5)
    await asyncio.wait_for(service.leadership.wait(), 10)
    scheduler = service.supervisor.get("scheduler")
    assert scheduler is not None
    ended = await _ended(nc, prefix)
    js = nc.jetstream()
    stream = stream_name(prefix)
    info = await js.stream_info(stream)
    await js.delete_stream(stream)  # every publish to the events stream fails now

    cid = await crm.campaign(people(3))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "rate_per_hour"
    # Stored with the deferral. The campaign actor's publish fails and it
    # ends; the leader's relay on that wake fails too (the Tick is a barrier:
    # the scheduler handles its mailbox in order).
    await ended.wait(cid)
    await scheduler.ask(Tick(), timeout=10)
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 1

    # JetStream is back: the next time the leader looks at the queue, it relays.
    await js.add_stream(info.config)
    await scheduler.ask(Tick(), timeout=10)
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0
    sub = await js.pull_subscribe(
        f"{prefix}.events.notify.>",
        durable="owner",
        stream=stream,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    [msg] = await sub.fetch(1, timeout=5)
    note = msgspec.json.decode(msg.data, type=Notification)
    assert (note.campaign_id, note.kind, note.reason_code) == (cid, "deferred", "rate_per_hour")
    assert msg.headers is not None and msg.headers[MSG_ID_HEADER].startswith(f"notify:{cid}:")
    # Relayed once: the next look finds nothing left to send.
    await scheduler.ask(Tick(), timeout=10)
    info_after = await js.consumer_info(stream, "owner")
    assert info_after.num_pending == 0


async def _outbox_empty_within(db, seconds: float) -> float:
    began = asyncio.get_running_loop().time()
    for _ in range(int(seconds * 20)):
        if await db.fetchval("SELECT count(*) FROM event_outbox") == 0:
            return asyncio.get_running_loop().time() - began
        await asyncio.sleep(0.05)
    raise AssertionError(f"outbox not relayed within {seconds} s")


async def test_notices_left_behind_are_relayed_again_without_any_wake(
    make_service, crm: Crm, events: Events, nc, db, settings
) -> None:
    """A relay that could not publish (JetStream away) looks again by itself, backing
    off, and one that died after taking rows is replaced when its take runs out: no
    notice waits for an unrelated wake or the reconcile interval (chaos seed 5070)."""
    clock = FakeClock(MONDAY_1015_UTC)  # frozen: no deferral ends, no reconcile is due
    service = await make_service(clock=clock, rate_per_hour=2, batch_size=5)
    await asyncio.wait_for(service.leadership.wait(), 10)
    ended = await _ended(nc, settings.subject_prefix)
    js = nc.jetstream()
    stream = stream_name(settings.subject_prefix)
    info = await js.stream_info(stream)
    await js.delete_stream(stream)

    cid = await crm.campaign(people(3))
    await crm.start(cid)
    await events.wait(cid, ("deferred",))
    await ended.wait(cid)
    scheduler = service.supervisor.get("scheduler")
    assert scheduler is not None
    await scheduler.ask(Tick(), timeout=10)  # a barrier: the wakes' relays have failed
    await asyncio.sleep(2)
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 1
    await js.add_stream(info.config)
    # Nobody wakes the scheduler: its own retry relays the notice.
    await _outbox_empty_within(db, RELAY_RETRY_MAX_SECONDS + 5)

    # A relay that took a row and died: the row is free again when its take ends.
    await db.execute(
        "INSERT INTO event_outbox (kind, subject, msg_id, payload, campaign_id, created_at,"
        " taken_until) VALUES ('notify', $1, 'left-by-a-dead-relay', '{}'::bytea, $2, now(),"
        " clock_timestamp() + interval '2 seconds')",
        f"{settings.subject_prefix}.events.notify.manager-1",
        cid,
    )
    await scheduler.ask(Tick(), timeout=10)  # sees it taken
    took = await _outbox_empty_within(db, 10)
    assert took >= 1.0  # not before its take ran out


async def test_a_notification_goes_out_at_once_and_leaves_nothing_behind(
    make_service, crm: Crm, events: Events, nc, db, settings
) -> None:
    prefix = settings.subject_prefix
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(clock=clock, rate_per_hour=2, batch_size=5)
    ended = await _ended(nc, prefix)
    notes: list[bytes] = []

    async def on_note(msg) -> None:
        notes.append(msg.data)

    await nc.subscribe(f"{prefix}.events.notify.>", cb=on_note)
    await nc.flush()
    cid = await crm.campaign(people(3))
    await crm.start(cid)
    await events.wait(cid, ("deferred",))
    await ended.wait(cid)  # the actor relayed its notification before it ended
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0
    await nc.flush()
    assert len(notes) == 1
    note = msgspec.json.decode(notes[0], type=Notification)
    assert (note.campaign_id, note.reason_code) == (cid, "rate_per_hour")


class _Publisher:
    """Stands in for JetStream behind the relay, to look at the outbox mid-publish."""

    def __init__(self, pool, during) -> None:
        self.pool = pool
        self.during = during
        self.published: list[str] = []

    async def publish_notice(self, notice) -> bool:
        await self.during(notice)
        self.published.append(notice.msg_id)
        return True


async def test_the_relay_publishes_with_no_transaction_open_and_nothing_twice(
    database_url: str, db
) -> None:
    from mailer.db import connect_pool
    from mailer.outbox import OutboxRelay

    for i in range(3):
        await db.execute(
            "INSERT INTO event_outbox (kind, subject, msg_id, payload, created_at)"
            " VALUES ('notify', 's', $1, '\\x00', $2)",
            f"n{i}",
            MONDAY_1015_UTC,
        )
    pool = await connect_pool(database_url, size=3)
    try:
        seen_by_other: list[int] = []
        other = OutboxRelay(pool, _Publisher(pool, lambda n: asyncio.sleep(0)))

        async def during(notice) -> None:
            # While this relay publishes, its rows are locked by nobody (a writer
            # or a vacuum waits on nothing) and another relay takes none of them.
            rows = await db.fetch("SELECT id FROM event_outbox FOR UPDATE NOWAIT")
            assert len(rows) == 3  # deleted once the batch is out
            seen_by_other.append(await other.flush())

        first = OutboxRelay(pool, _Publisher(pool, during))
        assert await first.flush() == 3
        assert first._publisher.published == ["n0", "n1", "n2"]  # type: ignore[attr-defined]
        assert seen_by_other == [0, 0, 0]
        assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0
    finally:
        await pool.close()


async def test_a_failed_publish_gives_the_rest_back_at_once(database_url: str, db) -> None:
    from mailer.db import connect_pool
    from mailer.outbox import OutboxRelay

    for i in range(3):
        await db.execute(
            "INSERT INTO event_outbox (kind, subject, msg_id, payload, created_at)"
            " VALUES ('notify', 's', $1, '\\x00', $2)",
            f"n{i}",
            MONDAY_1015_UTC,
        )

    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        async def publish_notice(self, notice) -> bool:
            self.calls += 1
            return self.calls != 2

    pool = await connect_pool(database_url, size=2)
    try:
        assert await OutboxRelay(pool, Flaky()).flush() == 1
        left = await db.fetch("SELECT msg_id, taken_until FROM event_outbox ORDER BY id")
        assert [(r["msg_id"], r["taken_until"]) for r in left] == [("n1", None), ("n2", None)]
        ok = _Publisher(pool, lambda n: asyncio.sleep(0))
        assert await OutboxRelay(pool, ok).flush() == 2
    finally:
        await pool.close()


async def test_a_final_event_jetstream_refused_is_relayed_by_the_leader_later(
    make_service, crm: Crm, nc, db, settings
) -> None:
    prefix = settings.subject_prefix
    service = await make_service()
    await asyncio.wait_for(service.leadership.wait(), 10)
    scheduler = service.supervisor.get("scheduler")
    assert scheduler is not None
    ended = await _ended(nc, prefix)
    js = nc.jetstream()
    stream = stream_name(prefix)
    info = await js.stream_info(stream)
    await js.delete_stream(stream)

    cid = await crm.campaign(people(2))
    await crm.start(cid)
    await ended.wait(cid)
    await scheduler.ask(Tick(), timeout=10)
    assert (await crm.get(cid))["status"] == "sent"
    # Stored with the status: not lost with the publish that failed.
    row = await db.fetchrow("SELECT kind, msg_id FROM event_outbox")
    assert row["kind"] == "campaign" and row["msg_id"].startswith(f"{cid}:sent:")

    await js.add_stream(info.config)
    await scheduler.ask(Tick(), timeout=10)
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0
    sub = await js.pull_subscribe(
        f"{prefix}.events.campaign.sent",
        durable="crm",
        stream=stream,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    [msg] = await sub.fetch(1, timeout=5)
    assert msgspec.json.decode(msg.data)["campaign_id"] == cid
