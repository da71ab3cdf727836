"""The public API's campaign operations, on the real stack (NATS, PostgreSQL, Redis, SMTP).

Where sending must happen (or must wait) at a known moment, the clock is a
FakeClock on a Monday inside working hours (13:15 Moscow time).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime

import pytest

from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER
from mailer.clock import FakeClock
from tests.helpers import Crm, Events, people

MONDAY_MIDDAY = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)  # 13:15 MSK


async def _table_counts(db) -> dict[str, int]:
    tables = ("campaign", "attachment", "recipient", "queue_entry", "send_log", "audit_log")
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


async def test_create_update_get_list_delete(make_service, crm: Crm, db) -> None:
    await make_service()
    cid = await crm.campaign(people(3), priority=5)
    view = await crm.get(cid)
    assert view["status"] == "draft" and view["priority"] == 5 and view["counts"] == {"pending": 3}

    updated = await crm.call(
        "campaign.update",
        {"campaign_id": cid, "name": "Зимняя рассылка", "body_html": None, "priority": 7},
    )
    assert updated["name"] == "Зимняя рассылка" and updated["priority"] == 7
    row = await db.fetchrow("SELECT body_text, body_html, subject FROM campaign WHERE id = $1", cid)
    assert row["body_html"] is None and row["body_text"] and row["subject"] == "Привет, это тест"

    # Clearing the last body is refused, and nothing changes.
    err = await crm.fails("campaign.update", {"campaign_id": cid, "body_text": None})
    assert (
        err.code == "validation_error" and err.message == "Нужно тело письма: текст, HTML или оба."
    )
    err = await crm.fails("campaign.update", {"campaign_id": cid})
    assert err.message == "Не указано ни одного поля для изменения."
    err = await crm.fails("campaign.update", {"campaign_id": cid, "subject": "Привет, {{name}}"})
    assert "Подстановки в теме письма не поддерживаются" in err.message
    assert (await db.fetchval("SELECT body_text FROM campaign WHERE id = $1", cid)) is not None

    # A page of 2, newest first, then the rest; a status filter.
    others = [await crm.campaign([]) for _ in range(4)]
    page1 = await crm.call("campaign.list", {"limit": 2})
    assert [c["id"] for c in page1["items"]] == [others[3], others[2]]
    page2 = await crm.call("campaign.list", {"limit": 2, "cursor": page1["next_cursor"]})
    page3 = await crm.call("campaign.list", {"limit": 2, "cursor": page2["next_cursor"]})
    assert [c["id"] for c in page2["items"] + page3["items"]] == [others[1], others[0], cid]
    assert page3["next_cursor"] is None
    assert page3["items"][-1]["counts"] == {"pending": 3}
    drafts = await crm.call("campaign.list", {"status": ["draft"], "limit": 500})
    assert len(drafts["items"]) == 5
    assert (await crm.call("campaign.list", {"status": ["sent", "paused"]}))["items"] == []

    deleted = await crm.call("campaign.delete", {"campaign_id": cid})
    assert deleted == {"campaign_id": cid, "deleted": True}
    err = await crm.fails("campaign.get", {"campaign_id": cid})
    assert err.code == "not_found" and err.status == 404
    assert err.message == f"Кампания {cid} не найдена."
    assert await db.fetchval("SELECT count(*) FROM recipient WHERE campaign_id = $1", cid) == 0
    audit = await db.fetch("SELECT action, details FROM audit_log ORDER BY id")
    actions = [a["action"] for a in audit]
    assert "campaign.update" in actions and actions[-1] == "campaign.delete"
    details = json.loads(audit[-1]["details"])
    assert details == {"campaign_id": cid, "name": "Зимняя рассылка", "status": "draft"}


async def test_pause_resume_cancel_contract(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    clock = FakeClock(MONDAY_MIDDAY)
    await make_service(clock=clock, rate_per_hour=2, batch_size=2)
    cid = await crm.campaign(people(4))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "rate_per_hour" and len(sink.messages) == 2

    # The manager sees why it waits, in Russian by default and in English on request.
    status = await crm.call("manager.status", {})
    assert status["active_campaign"]["id"] == cid
    assert status["reason_code"] == "rate_per_hour"
    assert status["reason"] == "Достигнут лимит 2 писем/час. Продолжим в 14:00."
    assert status["next_run_at"].startswith("2026-11-23T11:00:00")
    status_en = await crm.call("manager.status", {}, lang="en")
    assert status_en["reason"] == "The limit of 2 emails/hour is reached. We continue at 14:00."

    paused = await crm.call("campaign.pause", {"campaign_id": cid})
    assert paused["status"] == "paused"
    q = await db.fetchrow(
        "SELECT defer_reason, deferred_until, completed_at FROM queue_entry WHERE campaign_id = $1",
        cid,
    )
    assert (q["defer_reason"], q["deferred_until"], q["completed_at"]) == ("paused", None, None)
    await events.wait(cid, ("paused",))
    status = await crm.call("manager.status", {})
    assert status["reason_code"] == "paused" and status["next_run_at"] is None
    assert status["reason"].startswith("Рассылка приостановлена вручную")
    err = await crm.fails("campaign.pause", {"campaign_id": cid})
    assert err.code == "invalid_state" and err.status == 409
    assert err.message == "Действие невозможно: кампания в статусе «приостановлена»."
    assert err.details == {"status": "paused"}

    # The hour passes while it is paused: nothing is sent.
    clock.set(datetime(2026, 11, 23, 11, 5, tzinfo=UTC))
    resumed = await crm.call("campaign.resume", {"campaign_id": cid})
    assert resumed["status"] in ("ready", "sending", "sent")
    await events.wait(cid, ("resumed",))
    # Wake made the scheduler run it at once: the last two go out.
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent" and len(sink.messages) == 4
    q = await db.fetchrow(
        "SELECT defer_reason, deferred_until, consecutive_transient_errors FROM queue_entry "
        "WHERE campaign_id = $1",
        cid,
    )
    assert (q["defer_reason"], q["deferred_until"], q["consecutive_transient_errors"]) == (
        None,
        None,
        0,
    )
    err = await crm.fails("campaign.cancel", {"campaign_id": cid})
    assert err.code == "invalid_state"

    actions = [
        r["action"]
        for r in await db.fetch(
            "SELECT action FROM audit_log WHERE campaign_id = $1 AND actor_id = 'manager-1' "
            "ORDER BY id",
            cid,
        )
    ]
    assert actions == [
        "campaign.create",
        "recipients.add",
        "campaign.start",
        "campaign.status",
        "campaign.pause",
        "campaign.status",
        "campaign.resume",
        "campaign.status",
    ]


async def test_cancel_and_delete_rules(make_service, crm: Crm, events: Events, db) -> None:
    clock = FakeClock(MONDAY_MIDDAY)
    await make_service(clock=clock, rate_per_hour=1, batch_size=1)
    cid = await crm.campaign(people(3))
    await crm.start(cid)
    await events.wait(cid, ("deferred",))
    assert (await crm.get(cid))["status"] == "sending"

    # A sending campaign is never deleted: the error says what to do instead.
    err = await crm.fails("campaign.delete", {"campaign_id": cid})
    assert err.code == "campaign_sending" and err.status == 409
    assert "Сначала приостановите или отмените её" in err.message

    cancelled = await crm.call("campaign.cancel", {"campaign_id": cid})
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    await events.wait(cid, ("cancelled",))
    q = await db.fetchrow(
        "SELECT completed_at, defer_reason, deferred_until FROM queue_entry WHERE campaign_id = $1",
        cid,
    )
    assert q["completed_at"] is not None and q["defer_reason"] is None
    assert q["deferred_until"] is None
    for subject in ("campaign.start", "campaign.resume", "campaign.pause", "campaign.cancel"):
        err = await crm.fails(subject, {"campaign_id": cid})
        assert err.code == "invalid_state", subject
    err = await crm.fails("campaign.update", {"campaign_id": cid, "name": "x"})
    assert err.code == "invalid_state"

    assert (await crm.call("campaign.delete", {"campaign_id": cid}))["deleted"] is True
    # A ready (queued) campaign must be cancelled or paused before it can go.
    other = await crm.campaign(people(1, "b.example"))
    err = await crm.fails("campaign.pause", {"campaign_id": other})
    assert err.code == "invalid_state"  # a draft is not paused, it is simply not started
    assert (await crm.call("campaign.cancel", {"campaign_id": other}))["status"] == "cancelled"


async def test_start_checks_and_warnings(make_service, crm: Crm, db) -> None:
    # 20:30 in Moscow: outside working hours.
    clock = FakeClock(datetime(2026, 11, 23, 17, 30, tzinfo=UTC))
    await make_service(
        clock=clock,
        max_campaign_recipients=3,
        large_campaign_warning=2,
        working_hours_start="09:00",
        working_hours_end="18:00",
    )

    empty = await crm.campaign([])
    err = await crm.fails("campaign.start", {"campaign_id": empty})
    assert err.code == "empty_campaign" and err.message == "Нет писем в очереди"
    err = await crm.fails("campaign.start", {"campaign_id": empty}, lang="en")
    assert err.message == "No emails in the queue"

    # An add past the cap is refused (recipients_limit); a campaign that grew
    # past it before the cap was lowered is refused at start.
    big = await crm.campaign(people(3))
    err = await crm.fails("recipients.add", {"campaign_id": big, "recipients": people(1, start=3)})
    assert err.code == "recipients_limit"
    await db.execute(
        "INSERT INTO recipient (campaign_id, email, created_at, updated_at)"
        " VALUES ($1, 'late@example.org', now(), now())",
        big,
    )
    err = await crm.fails("campaign.start", {"campaign_id": big})
    assert err.code == "too_many_recipients"
    assert err.message == "В кампании 4 получателя, максимум 3. Разделите её на несколько."
    assert (await crm.get(big))["status"] == "draft"

    await db.execute("UPDATE quota SET emails_available = 0")
    cid = await crm.campaign(people(3))
    started = await crm.start(cid)
    assert started["campaign"]["status"] in ("ready", "sending")
    by_code = {w["code"]: w["message"] for w in started["warnings"]}
    assert set(by_code) == {"quota_exhausted", "outside_hours", "large_campaign"}
    assert by_code["quota_exhausted"].startswith("Глобальная квота исчерпана")
    assert by_code["outside_hours"] == (
        "Сейчас нерабочее время (9:00-18:00 МСК): кампания поставлена в очередь, "
        "отправка начнётся завтра в 09:00 МСК."
    )
    # Its duration comes from the forecast: with the quota at 0 nobody can say
    # (issue 8: it used to divide by the hourly rate whatever else held).
    assert by_code["large_campaign"] == (
        "Большая кампания: 3 получателя. При лимите 100 писем/час срок отправки сейчас "
        "не определить: квота исчерпана."
    )
    err = await crm.fails("campaign.start", {"campaign_id": cid})
    assert err.code == "invalid_state"


async def test_only_owner_or_admin(make_service, crm: Crm, events: Events) -> None:
    clock = FakeClock(MONDAY_MIDDAY)
    await make_service(clock=clock, rate_per_hour=1)
    cid = await crm.campaign(people(2))
    attachment = await crm.call(
        "attachments.add",
        {"campaign_id": cid, "filename": "a.txt", "content_type": "text/plain", "content": "aGk="},
    )
    stranger = {"user": "manager-2"}
    for subject, body in [
        ("campaign.get", {"campaign_id": cid}),
        ("campaign.update", {"campaign_id": cid, "name": "чужая"}),
        ("campaign.start", {"campaign_id": cid}),
        ("campaign.pause", {"campaign_id": cid}),
        ("campaign.resume", {"campaign_id": cid}),
        ("campaign.cancel", {"campaign_id": cid}),
        ("campaign.delete", {"campaign_id": cid}),
        ("campaign.test", {"campaign_id": cid, "email": "x@example.org"}),
        ("recipients.add", {"campaign_id": cid, "recipients": [{"email": "a@b.example"}]}),
        ("recipients.list", {"campaign_id": cid}),
        ("recipients.remove", {"campaign_id": cid, "emails": ["user0@example.org"]}),
        (
            "attachments.add",
            {
                "campaign_id": cid,
                "filename": "a.txt",
                "content_type": "text/plain",
                "content": "aGk=",
            },
        ),
        ("attachments.list", {"campaign_id": cid}),
        ("attachments.remove", {"campaign_id": cid, "attachment_id": attachment["id"]}),
        ("audit.list", {"campaign_id": cid}),
    ]:
        err = await crm.fails(subject, body, **stranger)
        assert err.code == "forbidden" and err.status == 403, subject
        assert err.message.startswith("Недостаточно прав"), subject
    listed = await crm.call("attachments.list", {"campaign_id": cid})
    assert [a["id"] for a in listed["items"]] == [attachment["id"]], "the refusals changed nothing"
    err = await crm.fails("campaign.list", {"owner_id": "manager-1"}, **stranger)
    assert err.code == "forbidden"
    err = await crm.fails("manager.status", {"owner_id": "manager-1"}, **stranger)
    assert err.code == "forbidden"
    assert (await crm.call("campaign.list", {}, **stranger))["items"] == []

    # An admin may do all of it, for anyone.
    admin = {"user": "boss", "roles": "viewer, admin"}
    assert (await crm.call("campaign.get", {"campaign_id": cid}, **admin))["id"] == cid
    listed = await crm.call("campaign.list", {}, **admin)
    assert [c["id"] for c in listed["items"]] == [cid]
    await crm.call("campaign.start", {"campaign_id": cid}, **admin)
    await events.wait(cid, ("deferred",))
    assert (await crm.call("campaign.pause", {"campaign_id": cid}, **admin))["status"] == "paused"
    view = await crm.call("manager.status", {"owner_id": "manager-1"}, **admin)
    assert view["owner_id"] == "manager-1" and view["reason_code"] == "paused"
    mine = await crm.call("manager.status", {}, **admin)
    assert mine["reason_code"] == "empty" and mine["reason"] == "Нет писем в очереди"

    err = await crm.fails("campaign.get", {"campaign_id": cid}, user="")
    assert err.code == "unauthenticated" and err.status == 401


async def test_update_of_a_sending_campaign_is_refused(
    make_service, crm: Crm, events: Events, db
) -> None:
    clock = FakeClock(MONDAY_MIDDAY)
    await make_service(clock=clock, rate_per_hour=1, batch_size=1)
    cid = await crm.campaign(people(2), priority=3)
    await crm.start(cid)
    await events.wait(cid, ("deferred",))  # one sent, the hour is used up: still sending
    assert (await crm.get(cid))["status"] == "sending"
    before = await _campaign_state(db, cid)

    change = {
        "campaign_id": cid,
        "name": "Другое имя",
        "subject": "Другая тема",
        "body_text": "Другой текст",
        "body_html": None,
        "priority": 50,
    }
    for who in ({}, {"user": "boss", "roles": "admin"}):
        err = await crm.fails("campaign.update", change, **who)
        assert err.code == "invalid_state" and err.status == 409
        assert err.details == {"status": "sending"}
        assert err.message == "Действие невозможно: кампания в статусе «отправляется»."
        for field in ("name", "priority"):
            err = await crm.fails("campaign.update", {"campaign_id": cid, field: change[field]})
            assert err.code == "invalid_state", field
    assert await _campaign_state(db, cid) == before
    view = await crm.get(cid)
    assert (view["name"], view["priority"], view["queue"]["priority"]) == (
        "Осенняя рассылка",
        3,
        3,
    )


async def test_admin_lists_one_owners_campaigns(make_service, crm: Crm) -> None:
    await make_service()
    mine = [await crm.campaign([]) for _ in range(2)]
    theirs = [await crm.campaign([], user="manager-2") for _ in range(3)]
    await crm.call("campaign.cancel", {"campaign_id": theirs[0]}, user="manager-2")
    admin = {"user": "boss", "roles": "admin"}

    listed = await crm.call("campaign.list", {"owner_id": "manager-2"}, **admin)
    assert [c["id"] for c in listed["items"]] == theirs[::-1]
    assert {c["owner_id"] for c in listed["items"]} == {"manager-2"}
    page = await crm.call("campaign.list", {"owner_id": "manager-2", "limit": 2}, **admin)
    assert [c["id"] for c in page["items"]] == [theirs[2], theirs[1]]
    rest = await crm.call(
        "campaign.list",
        {"owner_id": "manager-2", "limit": 2, "cursor": page["next_cursor"]},
        **admin,
    )
    assert [c["id"] for c in rest["items"]] == [theirs[0]] and rest["next_cursor"] is None
    drafts = await crm.call(
        "campaign.list", {"owner_id": "manager-2", "status": ["draft"]}, **admin
    )
    assert [c["id"] for c in drafts["items"]] == [theirs[2], theirs[1]]
    listed = await crm.call("campaign.list", {"owner_id": "manager-1"}, **admin)
    assert [c["id"] for c in listed["items"]] == mine[::-1]
    assert (await crm.call("campaign.list", {"owner_id": "nobody"}, **admin))["items"] == []
    everyone = await crm.call("campaign.list", {}, **admin)
    assert [c["id"] for c in everyone["items"]] == sorted(mine + theirs, reverse=True)
    # A manager may name only themselves.
    assert (await crm.fails("campaign.list", {"owner_id": "manager-2"})).code == "forbidden"
    own = await crm.call("campaign.list", {"owner_id": "manager-1"})
    assert [c["id"] for c in own["items"]] == mine[::-1]


async def _campaign_state(db, cid: int) -> tuple[object, ...]:
    campaign = await db.fetchrow("SELECT * FROM campaign WHERE id = $1", cid)
    queue = await db.fetchrow(
        "SELECT priority, queued_at, completed_at FROM queue_entry WHERE campaign_id = $1", cid
    )
    audit = await db.fetch(
        "SELECT id, action FROM audit_log WHERE campaign_id = $1 AND actor_id <> 'system' "
        "ORDER BY id",
        cid,
    )
    return dict(campaign or {}), dict(queue or {}), [tuple(a) for a in audit]


@pytest.mark.parametrize(
    "field,value",
    [
        ("subject", "Привет\r\nBcc: victim@example.org"),
        ("subject", "Привет\nBcc: victim@example.org"),
        ("subject", "Привет\n"),  # "$" of a naive pattern would let a trailing newline in
        ("subject", "Привет\r"),
        ("name", "Имя\r\nX-Injected: 1"),
        ("name", "Имя\n"),
    ],
)
async def test_header_injection_is_refused(make_service, crm: Crm, db, field, value) -> None:
    await make_service()
    cid = await crm.campaign([])
    before = await _table_counts(db)
    body = {"name": "ok", "subject": "ok", "body_text": "hi", field: value}
    err = await crm.fails("campaign.create", body)
    assert err.code == "validation_error" and err.status == 422
    err = await crm.fails("campaign.update", {"campaign_id": cid, field: value})
    assert err.code == "validation_error"
    err = await crm.fails(
        "recipients.add",
        {"campaign_id": cid, "recipients": [{"email": "a@example.org", "name": value}]},
    )
    assert err.code == "validation_error"
    err = await crm.fails(
        "campaign.test", {"campaign_id": cid, "email": "a@example.org", "name": value}
    )
    assert err.code == "validation_error"
    err = await crm.fails(
        "attachments.add",
        {
            "campaign_id": cid,
            "filename": f"a{value}.txt",
            "content_type": "text/plain",
            "content": "aGk=",
        },
    )
    assert err.code == "validation_error"
    assert await _table_counts(db) == before


async def test_error_shape_and_languages(make_service, crm: Crm) -> None:
    await make_service()
    reply = await crm.raw("campaign.get", b'{"campaign_id": 99}')
    assert reply.headers[ERROR_CODE_HEADER] == "404"
    assert reply.headers[ERROR_HEADER] == "Кампания 99 не найдена."
    err = await crm.fails("campaign.get", {"campaign_id": 99}, lang="en")
    assert err.message == "Campaign 99 not found." and err.details == {"campaign_id": "99"}

    err = await crm.fails("campaign.get", {"campaign_id": "1"})
    assert err.code == "validation_error"
    assert err.message.startswith("Неверные данные: Expected `int`, got `str`")
    err = await crm.fails("campaign.get", {"campaign_id": 1, "extra": True})
    assert err.code == "validation_error" and "unknown field" in err.message
    err = await crm.fails("campaign.get", {"campaign_id": 2**63})
    assert err.code == "validation_error"
    reply = await crm.raw("campaign.get", b"{not json")
    assert reply.headers[ERROR_CODE_HEADER] == "400"
    reply = await crm.raw("campaign.get", b'{"campaign_id": 1}' + b" " * 70_000)
    assert reply.headers[ERROR_CODE_HEADER] == "413"
    err = await crm.fails("campaign.create", {"name": "a", "subject": "s", "body_text": "b\x00"})
    assert err.code == "validation_error" and "NUL" in err.message


async def test_pause_stops_a_running_campaign_and_resume_finishes_it(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    """Paused mid-batch: the actor stops at its next batch; resumed, each goes out once."""
    mid_batch = asyncio.Event()
    go_on = asyncio.Event()

    async def hold(campaign_id: int, batch: int) -> None:
        # After batch 2 went to SMTP, before it is recorded: the campaign is sending.
        if batch == 2:
            mid_batch.set()
            await go_on.wait()

    service = await make_service(clock=FakeClock(MONDAY_MIDDAY), batch_size=2, fault=hold)
    recipients = people(9)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    async with asyncio.timeout(20):
        await mid_batch.wait()
    actor = service.supervisor.get(f"campaign-{cid}")
    assert actor is not None
    assert (await crm.call("campaign.pause", {"campaign_id": cid}))["status"] == "paused"
    go_on.set()
    await events.wait(cid, ("paused",))

    # The actor records the batch it had in flight, claims nothing more (the
    # campaign is no longer 'sending'), lets the campaign go and ends.
    async with asyncio.timeout(20):
        await actor.wait()
    owner = await db.fetchval("SELECT lease_owner FROM queue_entry WHERE campaign_id = $1", cid)
    assert owner is None
    assert (await crm.get(cid))["counts"] == {"sent": 4, "pending": 5}
    assert len(sink.messages) == 4
    resumed = await crm.call("campaign.resume", {"campaign_id": cid})
    assert resumed["status"] in ("ready", "sending", "sent")
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    assert done["event"] == "sent"
    got = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert got == Counter(r["email"] for r in recipients), "each exactly once"
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE campaign_id = $1", cid) == 9
