"""Issue 8, "honest waiting": where limits meet, the manager is told the truth.

Each test reproduces one finding of the issue through the public API (NATS),
with the service's clock faked; NATS, PostgreSQL, Redis and the SMTP sink are
real.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from mailer.clock import FakeClock
from tests.helpers import Crm, Events, people

OFFICE = {"working_hours_start": "09:00", "working_hours_end": "18:00"}
# 2026-11-23 is a Monday. Moscow is UTC+3.
MONDAY_1710_MSK = datetime(2026, 11, 23, 14, 10, tzinfo=UTC)
MONDAY_1315_MSK = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
TUESDAY_0900_MSK = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


class Notes:
    """The owner's notifications (``<prefix>.events.notify.>``), as they arrive."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def subscribe(self, nc: Any, prefix: str) -> None:
        async def on_msg(msg: Any) -> None:
            async with self._changed:
                self.seen.append(msgspec.json.decode(msg.data))
                self._changed.notify_all()

        await nc.subscribe(f"{prefix}.events.notify.>", cb=on_msg)
        await nc.flush()

    def of(self, campaign_id: int) -> list[dict[str, Any]]:
        return [n for n in self.seen if n["campaign_id"] == campaign_id]

    async def wait(self, campaign_id: int, n: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.of(campaign_id)) >= n)


@pytest.fixture
async def notes(nc: Any, settings: Any) -> Notes:
    n = Notes()
    await n.subscribe(nc, settings.subject_prefix)
    return n


async def _view(crm: Crm, lang: str | None = None) -> dict[str, Any]:
    return await crm.call("manager.status", {}, lang=lang)


async def _settle(service: Any) -> None:
    """Lets the service act on a clock move (timers fire, actors run), then returns."""
    for _ in range(20):
        await asyncio.sleep(0.02)


async def test_hourly_limit_late_in_the_day_promises_the_next_opening_once(
    make_service, crm: Crm, events: Events, notes: Notes, sink
) -> None:
    # The issue: rate 2/h, 17:10 Moscow: "Продолжим в 18:00", nothing at 18:00,
    # then outside_hours till 09:00 with a second notice.
    clock = FakeClock(MONDAY_1710_MSK)
    service = await make_service(clock=clock, rate_per_hour=2, **OFFICE)
    cid = await crm.campaign(people(3))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert len(sink.messages) == 2
    assert deferred["defer_reason"] == "rate_per_hour"
    assert deferred["deferred_until"] == "2026-11-24T06:00:00Z"
    view = await _view(crm)
    assert (view["reason_code"], view["next_run_at"]) == ("rate_per_hour", "2026-11-24T06:00:00Z")
    assert view["reason"] == "Достигнут лимит 2 писем/час. Продолжим завтра в 09:00 МСК."
    english = await _view(crm, lang="en")
    assert english["reason"] == (
        "The limit of 2 emails/hour is reached. We continue tomorrow at 09:00 MSK."
    )
    await notes.wait(cid, 1)

    # 18:00: nothing happens — no second deferral, no second notice.
    clock.set(datetime(2026, 11, 23, 15, 0, tzinfo=UTC))
    await _settle(service)
    assert len(events.of(cid, "deferred")) == 1
    assert len(sink.messages) == 2
    clock.set(TUESDAY_0900_MSK)
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent" and len(sink.messages) == 3
    assert len(events.of(cid, "deferred")) == 1
    assert len(notes.of(cid)) == 1
    assert notes.of(cid)[0]["message"] == (
        "Достигнут лимит 2 писем/час. Продолжим завтра в 09:00 МСК."
    )


async def test_quota_exhausted_names_no_time_and_notifies_once_day_and_night(
    make_service, crm: Crm, events: Events, notes: Notes, sink, db
) -> None:
    # The issue: next_run_at was now + 2 h (an internal re-check) with nothing
    # to happen then; late in the day the view switched to outside_hours "till
    # 09:00" with the quota still 0, and the owner got 3 notices a day.
    clock = FakeClock(MONDAY_1315_MSK)
    service = await make_service(clock=clock, monthly_quota=3, **OFFICE)
    first = await crm.campaign(people(5))
    second = await crm.campaign(people(2, "second.example"))
    await crm.start(first)
    await crm.start(second)
    deferred = await events.wait(first, ("deferred",))
    assert len(sink.messages) == 3
    assert (deferred["defer_reason"], deferred["deferred_until"]) == ("quota_exhausted", None)

    async def still_waiting_for_the_quota() -> None:
        view = await _view(crm)
        assert view["active_campaign"]["id"] == first
        assert view["reason_code"] == "quota_exhausted"
        assert view["next_run_at"] is None
        assert view["reason"].startswith("Глобальная квота исчерпана.")
        # Nothing can be known to start while the quota is 0: both say so.
        assert view["next_campaign_at"] is None

    await still_waiting_for_the_quota()
    await notes.wait(first, 1)
    # Two hours, the evening, the night, the next morning: nothing changes.
    for hours in (2, 5, 12, 20, 24):
        clock.set(MONDAY_1315_MSK + timedelta(hours=hours))
        await _settle(service)
        await still_waiting_for_the_quota()
    assert len(sink.messages) == 3
    assert len(notes.of(first)) == 1
    assert [e["defer_reason"] for e in events.of(first, "deferred")] == ["quota_exhausted"] * len(
        events.of(first, "deferred")
    )
    assert (
        await db.fetchval("SELECT deferred_until FROM queue_entry WHERE campaign_id = $1", first)
        is None
    )


async def test_campaigns_that_have_sent_nothing_show_ready_and_start_with_their_first_message(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    # The issue: one campaign at a time, before 09:00 all five queued campaigns
    # showed `sending` while /metrics said 0 active; started_at was the first
    # dispatch, not the first message.
    from prometheus_client import REGISTRY

    early = datetime(2026, 11, 23, 5, 0, tzinfo=UTC)  # 08:00 Moscow
    clock = FakeClock(early)
    service = await make_service(clock=clock, max_active_campaigns=1, **OFFICE)
    ids = [await crm.campaign(people(2, f"c{i}.example")) for i in range(5)]
    for cid in ids:
        await crm.start(cid)
    for cid in ids:
        await events.wait(cid, ("deferred",))
    await _settle(service)
    for cid in ids:
        view = await crm.get(cid)
        assert view["status"] == "ready", view
        assert view["queue"]["started_at"] is None
    manager = await _view(crm)
    assert manager["active_campaign"]["status"] == "ready"
    assert manager["active_campaign"]["started_at"] is None
    assert [q["status"] for q in manager["queue"]] == ["ready"] * 5
    assert REGISTRY.get_sample_value("mailer_campaigns_active") == 0
    assert not any(e["event"] == "started" for e in events.seen)
    assert all(e["status"] == "ready" for e in events.seen if e["event"] == "deferred")

    nine = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
    clock.set(nine)
    for cid in ids:
        assert (await events.wait(cid, ("sent", "completed_with_errors")))["event"] == "sent"
    started = [e for e in events.seen if e["event"] == "started"]
    assert [e["campaign_id"] for e in started] == ids
    assert all(e["status"] == "sending" for e in started)
    rows = await db.fetch("SELECT started_at FROM queue_entry ORDER BY campaign_id")
    assert [r["started_at"] for r in rows] == [nine] * 5
    assert len(sink.messages) == 10


async def test_fair_share_is_work_conserving_5_20_20_at_30_per_hour(
    make_service, crm: Crm, events: Events, sink
) -> None:
    # The issue: at 30/h with campaigns of 5, 20 and 20 running together the
    # result was 5/15/10 — the small one's unused share went to whoever asked
    # first. Max-min: 5, and the other 25 split evenly.
    early = datetime(2026, 11, 23, 5, 0, tzinfo=UTC)  # 08:00 Moscow: all three wait
    clock = FakeClock(early)
    await make_service(
        clock=clock, max_active_campaigns=3, rate_per_hour=30, batch_size=4, **OFFICE
    )
    small = await crm.campaign(people(5, "small.example"))
    big1 = await crm.campaign(people(20, "big1.example"))
    big2 = await crm.campaign(people(20, "big2.example"))
    for cid in (small, big1, big2):
        await crm.start(cid)
    for cid in (small, big1, big2):
        await events.wait(cid, ("deferred",))
    clock.set(datetime(2026, 11, 23, 6, 0, tzinfo=UTC))  # 09:00: all three at once
    assert (await events.wait(small, ("sent", "completed_with_errors")))["event"] == "sent"
    for cid in (big1, big2):
        await events.wait_count(cid, "deferred", 2)
    per = {d: 0 for d in ("small.example", "big1.example", "big2.example")}
    for m in sink.messages:
        per[m.rcpt_tos[0].rpartition("@")[2]] += 1
    assert per["small.example"] == 5
    assert sorted((per["big1.example"], per["big2.example"])) == [12, 13], per


async def test_forecast_matches_the_real_completion_of_a_multi_day_campaign(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    # 5/h, sending 09:00-11:00: two windows, ten emails a day. 25 from Monday
    # 09:30 go Mon 09:30 and 10:00, Tue 09:00 and 10:00, Wed 09:00; the next
    # campaign (5) starts and ends at Wed 10:00.
    monday_0930 = datetime(2026, 11, 23, 6, 30, tzinfo=UTC)
    clock = FakeClock(monday_0930)
    await make_service(
        clock=clock,
        rate_per_hour=5,
        batch_size=5,
        max_active_campaigns=1,
        working_hours_start="09:00",
        working_hours_end="11:00",
    )
    first = await crm.campaign(people(25, "first.example"))
    second = await crm.campaign(people(5, "second.example"))
    await crm.start(first)
    await crm.start(second)
    await events.wait(first, ("deferred",))
    view = await crm.get(first)
    assert view["estimate_reason"] is None
    forecast_first = datetime.fromisoformat(view["estimated_completion_at"])
    assert forecast_first == datetime(2026, 11, 25, 6, 0, tzinfo=UTC)  # Wed 09:00 Moscow
    queued = await crm.get(second)
    assert queued["status"] == "ready"
    start_second = datetime.fromisoformat(queued["estimated_start_at"])
    forecast_second = datetime.fromisoformat(queued["estimated_completion_at"])
    assert start_second == forecast_second == datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
    manager = await _view(crm)
    assert manager["active_campaign"]["estimated_completion_at"] == "2026-11-25T06:00:00Z"
    assert manager["next_campaign_at"] == "2026-11-25T07:00:00Z"

    # Nobody acts but the clock: each wait ends when it said, until both are done.
    for _ in range(20):
        finals = [e for e in events.seen if e["event"] in ("sent", "completed_with_errors")]
        if len(finals) == 2:
            break
        ends = await db.fetch(
            "SELECT deferred_until FROM queue_entry WHERE completed_at IS NULL"
            " AND deferred_until IS NOT NULL ORDER BY deferred_until LIMIT 1"
        )
        assert ends, "a campaign waits without a time"
        clock.set(ends[0]["deferred_until"])
        await _settle(None)
        # Until the window is used and the campaign waits again: moving the clock on
        # before that (a loaded machine's slow batch) would skip an hour of sending.
        for _ in range(600):  # 30 s
            if not await db.fetchval(
                "SELECT count(*) FROM queue_entry WHERE completed_at IS NULL"
                " AND (lease_owner IS NOT NULL OR deferred_until <= $1)",
                clock.now(),
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"still sending or due at {clock.now()} after 30 s")
    for cid, expected in ((first, forecast_first), (second, forecast_second)):
        done = await db.fetchval("SELECT finished_at FROM campaign WHERE id = $1", cid)
        assert done is not None
        assert abs((done - expected).total_seconds()) < 3600, (cid, done, expected)
    started = await db.fetchval("SELECT started_at FROM queue_entry WHERE campaign_id = $1", second)
    assert started == start_second
    assert len(sink.messages) == 30


async def test_the_large_campaign_warning_counts_working_days(make_service, crm: Crm) -> None:
    # The issue: "about 100 h" for 10 000 at 100/h ignored working hours. Here
    # 1000 at 10/h, 09:00-18:00 on weekdays, from Monday 13:15: 50 today, 90 a
    # working day after — done Tuesday 8.12, the 12th working day.
    clock = FakeClock(MONDAY_1315_MSK)
    await make_service(
        clock=clock,
        rate_per_hour=10,
        working_days="1,2,3,4,5",
        large_campaign_warning=500,
        **OFFICE,
    )
    cid = await crm.campaign(people(1000))
    started = await crm.start(cid)
    by_code = {w["code"]: w["message"] for w in started["warnings"]}
    assert by_code["large_campaign"] == (
        "Большая кампания: 1000 получателей. При лимите 10 писем/час отправка займёт около "
        "12 рабочих дней, до 08.12."
    )
    english = await crm.campaign(people(600, "en.example"))
    started = await crm.call("campaign.start", {"campaign_id": english}, lang="en")
    by_code = {w["code"]: w["message"] for w in started["warnings"]}
    assert by_code["large_campaign"].startswith(
        "A large campaign: 600 recipients. At 10 emails/hour sending takes about "
    )
    assert "working days, until " in by_code["large_campaign"]


ADMIN = {"user": "boss", "roles": "admin"}


async def test_quota_set_tops_up_the_local_quota_without_a_restart(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    # The issue: the local quota could not be topped up without a restart.
    clock = FakeClock(MONDAY_1315_MSK)
    await make_service(clock=clock, monthly_quota=3, **OFFICE)
    cid = await crm.campaign(people(5))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "quota_exhausted" and len(sink.messages) == 3

    err = await crm.fails("quota.set", {"monthly_limit": 10})
    assert err.code == "forbidden"
    err = await crm.fails("quota.set", {"monthly_limit": -1}, **ADMIN)
    assert err.code == "validation_error"
    quota = await crm.call("quota.set", {"monthly_limit": 10}, **ADMIN)
    # 10 this month, 3 already sent.
    assert (quota["monthly_limit"], quota["emails_available"]) == (10, 7)
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent" and len(sink.messages) == 5
    # A later sync keeps the set allowance.
    synced = await crm.call("quota.sync", {}, **ADMIN)
    assert (synced["monthly_limit"], synced["emails_available"]) == (10, 5)
    audit = await db.fetchval("SELECT details FROM audit_log WHERE action = 'quota.set'")
    assert audit is not None


async def test_a_restart_with_new_limits_re_evaluates_every_deferral_at_once(
    make_service, crm: Crm, events: Events, sink
) -> None:
    # The issue: after a restart with new limits deferred campaigns kept their
    # old deferral until the next 5-minute reconcile (or its end).
    clock = FakeClock(MONDAY_1315_MSK)
    first = await make_service(clock=clock, rate_per_hour=2, **OFFICE)
    cid = await crm.campaign(people(5))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["deferred_until"] == "2026-11-23T11:00:00Z" and len(sink.messages) == 2
    await first.stop()
    await make_service(clock=clock, rate_per_hour=100, **OFFICE)  # the same hour, new limit
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent" and len(sink.messages) == 5
    assert clock.now() == MONDAY_1315_MSK


async def test_limits_reload_decides_every_deferral_again(
    make_service, crm: Crm, events: Events, sink
) -> None:
    clock = FakeClock(MONDAY_1315_MSK)
    await make_service(clock=clock, rate_per_hour=2, **OFFICE)
    cid = await crm.campaign(people(3))
    await crm.start(cid)
    await events.wait(cid, ("deferred",))
    err = await crm.fails("limits.reload", {})
    assert err.code == "forbidden"
    reply = await crm.call("limits.reload", {}, **ADMIN)
    assert reply == {"reevaluated": 1}
    # Still held by the same limit: deferred again, to the same time.
    await events.wait_count(cid, "deferred", 2)
    again = events.of(cid, "deferred")[1]
    assert (again["defer_reason"], again["deferred_until"]) == (
        "rate_per_hour",
        "2026-11-23T11:00:00Z",
    )
    assert len(sink.messages) == 2


async def test_quota_set_is_refused_when_the_provider_owns_the_quota(
    make_service, crm: Crm, db
) -> None:
    await make_service(quota_provider="http", quota_http_url="http://127.0.0.1:9/quota")
    before = await db.fetchrow("SELECT emails_available, monthly_override FROM quota")
    err = await crm.fails("quota.set", {"monthly_limit": 10}, **ADMIN)
    assert (err.code, err.status) == ("quota_not_local", 409)
    assert err.message.startswith("Квоту можно задать только для локального учёта")
    assert await db.fetchrow("SELECT emails_available, monthly_override FROM quota") == before


async def test_a_test_email_refused_for_the_quota_names_no_time(make_service, crm: Crm, db) -> None:
    await make_service(clock=FakeClock(MONDAY_1315_MSK), **OFFICE)
    await db.execute("UPDATE quota SET emails_available = 0")
    cid = await crm.campaign([])
    err = await crm.fails("campaign.test", {"campaign_id": cid, "email": "a@example.org"})
    assert err.code == "quota_exhausted"
    assert "retry_at" not in err.details


async def test_a_place_in_the_queue_is_promised_and_a_pause_ahead_gives_the_turn_back(
    make_service, crm: Crm, events: Events, notes: Notes, sink
) -> None:
    # 10/h, one at a time: `big` (25) sends 10 now, `small` behind it is
    # promised 12:00 UTC (big takes 11:00's hour and half of 12:00's). When
    # big is paused, small's wait is decided again at once: 11:00 — earlier
    # than promised, so no new notice.
    clock = FakeClock(MONDAY_1315_MSK)
    await make_service(clock=clock, rate_per_hour=10, batch_size=5, max_active_campaigns=1)
    big = await crm.campaign(people(25, "big.example"))
    small = await crm.campaign(people(5, "small.example"))
    await crm.start(big)
    await crm.start(small)
    await events.wait(big, ("deferred",))
    first = await events.wait(small, ("deferred",))
    assert (first["defer_reason"], first["deferred_until"]) == (
        "rate_per_hour",
        "2026-11-23T12:00:00Z",
    )
    manager = await _view(crm)
    assert manager["next_campaign_at"] == "2026-11-23T12:00:00Z"
    await crm.call("campaign.pause", {"campaign_id": big})
    await events.wait_count(small, "deferred", 2)
    again = events.of(small, "deferred")[1]
    assert (again["defer_reason"], again["deferred_until"]) == (
        "rate_per_hour",
        "2026-11-23T11:00:00Z",
    )
    clock.set(datetime(2026, 11, 23, 11, 0, tzinfo=UTC))
    done = await events.wait(small, ("sent", "completed_with_errors"))
    assert done["event"] == "sent"
    assert len(notes.of(small)) == 1
    assert sum(m.rcpt_tos[0].endswith("@small.example") for m in sink.messages) == 5
