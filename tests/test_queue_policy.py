"""Queue policy: the order campaigns run in, and how running ones share the hour.

- ``MAILER_MAX_ACTIVE_CAMPAIGNS=1``: one campaign at a time, in queue order —
  higher priority first, then earlier ``queued_at`` — never overlapping.
- ``MAILER_MAX_ACTIVE_CAMPAIGNS=2``: campaigns that asked for tokens within the
  fair-share window split the hourly limit equally (``mailer/ratelimit.py``):
  each gets at most ``ceil(limit / askers)`` of the hour, and the hour is never
  exceeded.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from datetime import UTC, datetime

from mailer.clock import FakeClock
from tests.helpers import Crm, Events, people

FINAL = ("sent", "completed_with_errors")


async def test_queued_campaigns_run_one_after_another_by_priority_then_queued_at(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    # A campaign already sending holds the only slot (its first batch is held
    # here) while three more are started, in an order unlike their priorities.
    blocker_held, release = asyncio.Event(), asyncio.Event()
    blocker: int | None = None

    async def hold_the_blocker(campaign_id: int, batches: int) -> None:
        if campaign_id == blocker:
            blocker_held.set()
            await release.wait()

    await make_service(fault=hold_the_blocker, max_active_campaigns=1)
    blocker = await crm.campaign(people(1, "blocker.example"))
    await crm.start(blocker)
    async with asyncio.timeout(10):
        await blocker_held.wait()

    first = await crm.campaign(people(3, "first.example"), priority=1)
    second = await crm.campaign(people(3, "second.example"), priority=5)
    third = await crm.campaign(people(3, "third.example"), priority=1)
    for cid in (first, second, third):
        await crm.start(cid)
    # Nothing else may start while the slot is taken.
    assert (
        await db.fetchval("SELECT count(*) FROM queue_entry WHERE started_at IS NOT NULL") == 1
        and len(sink.messages) == 1
    )

    release.set()
    for cid in (blocker, first, second, third):
        assert (await events.wait(cid, FINAL))["event"] == "sent"

    # Priority 5 first; the two of priority 1 in the order they were queued.
    expected = [blocker, second, first, third]
    started = [e["campaign_id"] for e in events.seen if e["event"] == "started"]
    assert started == expected
    rows = await db.fetch(
        "SELECT campaign_id, started_at, completed_at FROM queue_entry ORDER BY started_at"
    )
    assert [r["campaign_id"] for r in rows] == expected
    # One after another: each starts only once the one before it has completed.
    for before, after in itertools.pairwise(rows):
        assert before["completed_at"] <= after["started_at"], (before, after)
    # And the sink saw them in that order too, never interleaved.
    domains = [m.rcpt_tos[0].rpartition("@")[2] for m in sink.messages]
    runs = [d for i, d in enumerate(domains) if i == 0 or domains[i - 1] != d]
    assert runs == ["blocker.example", "second.example", "first.example", "third.example"]


async def test_two_running_campaigns_share_the_hour_equally(
    make_service, crm: Crm, events: Events, sink
) -> None:
    # 10 per hour, 2 campaigns at once, 2 recipients per token request. Each
    # campaign holds after its first batch until the other has asked too: from
    # then on both are askers within the window (the clock does not move), so
    # each may have ceil(10 / 2) = 5 of the hour, whoever asks faster.
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    both_asked = asyncio.Event()
    first_batch: set[int] = set()

    async def meet_after_first_batch(campaign_id: int, batches: int) -> None:
        if batches == 1:
            first_batch.add(campaign_id)
            if len(first_batch) == 2:
                both_asked.set()
            await both_asked.wait()

    await make_service(
        clock=clock,
        fault=meet_after_first_batch,
        max_active_campaigns=2,
        rate_per_hour=10,
        batch_size=2,
    )
    x = await crm.campaign(people(20, "x.example"))
    y = await crm.campaign(people(20, "y.example"))
    await crm.start(x)
    await crm.start(y)
    for cid in (x, y):
        deferred = await events.wait(cid, ("deferred",))
        assert deferred["defer_reason"] == "rate_per_hour"

    per_campaign = Counter(m.rcpt_tos[0].rpartition("@")[2] for m in sink.messages)
    assert per_campaign == {"x.example": 5, "y.example": 5}
    for cid in (x, y):
        assert (await crm.get(cid))["counts"] == {"sent": 5, "pending": 15}
