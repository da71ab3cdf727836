"""Scheduled starts (``campaign.start`` with ``send_at``) and ``campaign.unschedule``.

Time is a FakeClock; the scheduler's one timer wakes the campaign at its time.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from mailer.clock import FakeClock
from tests.helpers import FINAL, Crm, Events, people

MONDAY_1015_MSK = datetime(2026, 11, 23, 7, 15, tzinfo=UTC)


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _start_at(crm: Crm, cid: int, when: datetime | str) -> dict[str, Any]:
    send_at = when if isinstance(when, str) else when.isoformat()
    return await crm.call("campaign.start", {"campaign_id": cid, "send_at": send_at})


async def test_a_scheduled_campaign_starts_within_a_second_of_send_at(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    clock = FakeClock(MONDAY_1015_MSK)
    await make_service(clock=clock)
    cid = await crm.campaign(people(3))
    send_at = MONDAY_1015_MSK + timedelta(hours=2)
    reply = await _start_at(crm, cid, send_at)
    assert reply["campaign"]["status"] == "ready"
    queue = reply["campaign"]["queue"]
    assert queue["defer_reason"] == "scheduled" and _at(queue["deferred_until"]) == send_at

    view = await crm.call("manager.status", {})
    assert view["active_campaign"]["id"] == cid
    assert view["reason_code"] == "scheduled"
    assert _at(view["next_run_at"]) == send_at
    assert view["reason"] == "Рассылка запланирована: отправка начнётся сегодня в 12:15 МСК."
    en = await crm.call("manager.status", {}, lang="en")
    assert en["reason"] == "Scheduled: sending starts today at 12:15 MSK."

    clock.advance(timedelta(hours=2) - timedelta(seconds=1))
    await asyncio.sleep(0.3)  # a timer that fired early would have sent by now
    assert len(sink.messages) == 0 and events.of(cid, "started") == []
    clock.advance(timedelta(seconds=1))
    async with asyncio.timeout(15):
        started = await events.wait(cid, ("started",))
        done = await events.wait(cid, FINAL)
    assert send_at <= _at(started["at"]) < send_at + timedelta(seconds=1)
    assert done["event"] == "sent" and len(sink.messages) == 3
    audit = await db.fetchrow(
        "SELECT details FROM audit_log WHERE campaign_id = $1 AND action = 'campaign.start'", cid
    )
    assert audit is not None and '"send_at"' in str(audit["details"])


async def test_unschedule_and_the_checks_made_when_scheduling(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    clock = FakeClock(MONDAY_1015_MSK)
    await make_service(clock=clock, working_hours_start="09:00", working_hours_end="18:00")
    cid = await crm.campaign(people(2))
    later = MONDAY_1015_MSK + timedelta(days=1)

    # Scheduled for 20:00 MSK: the warning is about that time, not about now.
    evening = await crm.campaign(people(1, "e.example"))
    reply = await _start_at(crm, evening, MONDAY_1015_MSK + timedelta(hours=10))
    [warning] = reply["warnings"]
    assert warning["code"] == "outside_hours"
    assert warning["message"] == (
        "Запланированное время вне рабочего времени (9:00-18:00 МСК): "
        "отправка начнётся завтра в 09:00 МСК."
    )
    await crm.call("campaign.unschedule", {"campaign_id": evening})

    # Refused as a start now would be, and for a time without an offset or years ahead.
    empty = await crm.campaign([])
    e = await crm.fails("campaign.start", {"campaign_id": empty, "send_at": later.isoformat()})
    assert e.code == "empty_campaign"
    naive = later.replace(tzinfo=None).isoformat()
    e = await crm.fails("campaign.start", {"campaign_id": cid, "send_at": naive})
    assert e.code == "validation_error" and "send_at" in e.message
    e = await crm.fails(
        "campaign.start",
        {"campaign_id": cid, "send_at": (MONDAY_1015_MSK + timedelta(days=400)).isoformat()},
    )
    assert e.code == "validation_error"
    e = await crm.fails("campaign.unschedule", {"campaign_id": cid})
    assert e.code == "not_scheduled"

    await _start_at(crm, cid, later)
    view = await crm.call("campaign.unschedule", {"campaign_id": cid})
    assert view["status"] == "draft" and view["queue"] is None
    assert events.of(cid, "unscheduled")
    # Time passes: nothing is sent, and it can be scheduled again.
    clock.advance(timedelta(days=1, seconds=5))
    await asyncio.sleep(0.3)
    assert len(sink.messages) == 0
    actions = [
        r["action"]
        for r in await db.fetch(
            "SELECT action FROM audit_log WHERE campaign_id = $1 ORDER BY id", cid
        )
    ]
    assert "campaign.unschedule" in actions

    # A send_at already past starts now.
    await _start_at(crm, cid, clock.now() - timedelta(minutes=1))
    async with asyncio.timeout(15):
        assert (await events.wait(cid, FINAL))["event"] == "sent"
    e = await crm.fails("campaign.unschedule", {"campaign_id": cid})
    assert e.code == "not_scheduled"
