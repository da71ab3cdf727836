"""The walking skeleton end to end: public NATS API -> actors -> SMTP sink.

Real NATS, PostgreSQL, Redis and SMTP (the session's embedded stack); only
the clock is faked where a test needs time to stand still.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections import Counter
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from mailer.client import MailerClient
from mailer.clock import FakeClock
from tests.helpers import FINAL, Crm, Events, people


async def test_campaign_sent_end_to_end(make_service, client: MailerClient, sink, db) -> None:
    """Through mailer.client, as a CRM service drives it."""
    await make_service()
    recipients = people(25)
    recipients[3]["name"] = "<script>alert(1)</script>"
    created = await client.create_campaign(
        "Осенняя рассылка",
        "Привет, это тест",
        body_text="Здравствуйте, {{name}}!\nЭто письмо для {{email}}.",
        body_html="<p>Здравствуйте, <b>{{name}}</b>!</p>",
    )
    cid = created.id
    await client.add_recipients(cid, recipients)
    view = await client.get_campaign(cid)
    assert view.status == "draft" and view.counts == {"pending": 25}

    async with client.campaign_events(cid) as events:
        started = await client.start_campaign(cid)
        assert started.campaign.status in ("ready", "sending", "sent")
        async with asyncio.timeout(30):
            done = await anext(e async for e in events if e.event in FINAL)
    assert done.event == "sent"
    assert done.counts == {"sent": 25}

    got = sink.messages
    assert len(got) == 25
    assert Counter(r for m in got for r in m.rcpt_tos) == Counter(r["email"] for r in recipients)
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    for i, r in enumerate(recipients):
        msg = email.message_from_bytes(by_rcpt[r["email"]].data, policy=email.policy.default)
        assert msg["Subject"] == "Привет, это тест"
        assert msg["To"].addresses[0].display_name == r["name"]
        assert msg["To"].addresses[0].addr_spec == r["email"]
        assert msg["From"].addresses[0].addr_spec == "crm@example.com"
        assert msg["Message-ID"].startswith(f"<c{cid}.r")
        assert msg["Date"] is not None
        assert msg["List-Unsubscribe"].startswith("<http")
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        text = msg.get_body(("plain",)).get_content()
        html = msg.get_body(("html",)).get_content()
        assert f"Здравствуйте, {r['name']}!" in text
        assert f"Это письмо для {r['email']}." in text
        if i == 3:
            assert "&lt;script&gt;" in html and "<script>" not in html
        assert "/u/" in text and "/u/" in html  # a visible unsubscribe link

    view = await client.get_campaign(cid)
    assert view.status == "sent"
    assert view.counts == {"sent": 25}
    rows = await db.fetch(
        "SELECT status, smtp_message_id FROM send_log WHERE campaign_id = $1", cid
    )
    assert len(rows) == 25 and {r["status"] for r in rows} == {"sent"}
    # The send log and the recipients agree, message id for message id.
    ids = await db.fetch("SELECT smtp_message_id FROM recipient WHERE campaign_id = $1", cid)
    assert {r["smtp_message_id"] for r in rows} == {r["smtp_message_id"] for r in ids}
    audit = [
        r["action"]
        for r in await db.fetch(
            "SELECT action FROM audit_log WHERE campaign_id = $1 ORDER BY id", cid
        )
    ]
    assert audit[:3] == ["campaign.create", "recipients.add", "campaign.start"]


async def test_crash_mid_campaign_is_restarted_without_duplicates(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    crashes = []

    async def fault(campaign_id: int, batch: int) -> None:
        # Once, after batch 2 was accepted by SMTP and before it was recorded.
        if batch == 2 and not crashes:
            crashes.append(campaign_id)
            raise RuntimeError("injected crash between send and record")

    def campaign_restarts() -> float:
        value = REGISTRY.get_sample_value("mailer_actor_restarts_total", {"actor": "campaign"})
        return value or 0.0

    restarts_before = campaign_restarts()
    await make_service(batch_size=5, fault=fault)
    recipients = people(23)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    done = await events.wait(cid, ("sent", "completed_with_errors"))

    assert crashes == [cid]
    assert done["event"] == "sent", done
    # The supervisor restarted the crashed actor in place, once: the campaign was
    # not merely dispatched again by the scheduler after its actor ended.
    assert campaign_restarts() - restarts_before == 1
    rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert rcpts == Counter(r["email"] for r in recipients), "each exactly once"
    dup = await db.fetchval(
        "SELECT count(*) FROM (SELECT recipient_id FROM send_log WHERE campaign_id = $1 "
        "GROUP BY recipient_id HAVING count(*) > 1) d",
        cid,
    )
    assert dup == 0
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE campaign_id = $1", cid) == 23


@pytest.mark.parametrize("processes", [1, 2])
async def test_hourly_limit_is_never_exceeded(
    make_service, crm: Crm, events: Events, sink, db, redis_client, settings, processes
) -> None:
    # 08:59 in Moscow, one minute before working hours: both campaigns are
    # queued, then become runnable at the same moment, so two campaign actors
    # ask at once -- in one process or spread over two; neither fits the hour.
    clock = FakeClock(datetime(2026, 11, 23, 5, 59, tzinfo=UTC))
    for _ in range(processes):
        await make_service(
            clock=clock,
            rate_per_hour=10,
            batch_size=3,
            max_active_campaigns=2,
            working_hours_start="09:00",
            working_hours_end="18:00",
        )
    a = await crm.campaign(people(12, "a.example"))
    b = await crm.campaign(people(12, "b.example"))
    await crm.start(a)
    await crm.start(b)
    for cid in (a, b):
        assert (await events.wait(cid, ("deferred",)))["defer_reason"] == "outside_hours"
    clock.set(datetime(2026, 11, 23, 6, 0, tzinfo=UTC))
    for cid in (a, b):
        await events.wait_count(cid, "deferred", 2)
        last = events.of(cid, "deferred")[-1]
        assert last["defer_reason"] == "rate_per_hour"
    assert len(sink.messages) == 10

    # A campaign stopped by its fair share looks again 30 s later; by then the
    # hour is used up and both wait for the next one.
    clock.advance(31)
    for cid in (a, b):
        if not events.of(cid, "deferred")[-1]["deferred_until"].startswith("2026-11-23T07"):
            await events.wait_count(cid, "deferred", 3)
        last = events.of(cid, "deferred")[-1]
        assert last["defer_reason"] == "rate_per_hour"
        assert last["deferred_until"].startswith("2026-11-23T07:00:00")
    assert len(sink.messages) == 10
    # Both competed from their first ask: each got exactly half of the hour.
    per_domain = Counter(r.split("@")[1] for m in sink.messages for r in m.rcpt_tos)
    assert per_domain == {"a.example": 5, "b.example": 5}
    key = f"{settings.redis_key_prefix}rate:default:2026112306"
    assert int(await redis_client.get(key)) == 10
    sent = await db.fetchval("SELECT count(*) FROM recipient WHERE status = 'sent'")
    assert sent == 10
    assert await db.fetchval("SELECT count(*) FROM recipient WHERE status = 'pending'") == 14
