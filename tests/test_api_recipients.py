"""Recipients and attachments through the public API."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
from datetime import UTC, datetime

from mailer.clock import FakeClock
from tests.helpers import Crm, Events, people


async def test_add_list_remove_recipients(make_service, crm: Crm, db) -> None:
    await make_service()
    cid = await crm.campaign([])
    added = await crm.call(
        "recipients.add",
        {
            "campaign_id": cid,
            "recipients": [
                {"email": "anna@example.org", "name": "Анна", "variables": {"city": "Казань"}},
                {"email": "ANNA@example.org"},  # the same address in another case
                {"email": "борис@пример.рф"},  # internationalized: accepted
                {"email": "no-at-sign"},
                {"email": "bad\x01@example.org"},
                {"email": "vera@example.org"},
                {"email": "gleb@example.org"},
            ],
        },
    )
    assert added["added"] == 4 and added["duplicates"] == 1
    assert {i["email"]: i["reason"] for i in added["invalid"]} == {
        "no-at-sign": "must contain exactly one @",
        "bad\x01@example.org": "control characters",
    }
    again = await crm.call(
        "recipients.add", {"campaign_id": cid, "recipients": [{"email": "Vera@Example.org"}]}
    )
    assert again == {"added": 0, "duplicates": 1, "invalid": []}

    page = await crm.call("recipients.list", {"campaign_id": cid, "limit": 3})
    assert [r["email"] for r in page["items"]] == [
        "anna@example.org",
        "борис@пример.рф",
        "vera@example.org",
    ]
    assert page["items"][0]["variables"] == {"city": "Казань"}
    assert page["items"][0]["name"] == "Анна" and page["items"][0]["status"] == "pending"
    rest = await crm.call("recipients.list", {"campaign_id": cid, "cursor": page["next_cursor"]})
    assert [r["email"] for r in rest["items"]] == ["gleb@example.org"]
    assert rest["next_cursor"] is None
    none_failed = await crm.call("recipients.list", {"campaign_id": cid, "status": "failed"})
    assert none_failed["items"] == []

    # A recipient already handled is history: it stays.
    await db.execute(
        "UPDATE recipient SET status = 'failed', error = 'x' WHERE email = 'gleb@example.org'"
    )
    removed = await crm.call(
        "recipients.remove",
        {"campaign_id": cid, "emails": ["ANNA@example.org", "gleb@example.org", "who@x.example"]},
    )
    assert removed["removed"] == 1
    assert {n["email"]: n["reason"] for n in removed["not_removed"]} == {
        "gleb@example.org": "not_pending",
        "who@x.example": "not_found",
    }
    assert (await crm.get(cid))["counts"] == {"pending": 2, "failed": 1}

    err = await crm.fails(
        "recipients.add",
        {"campaign_id": cid, "recipients": [{"email": f"u{i}@e.example"} for i in range(5001)]},
    )
    assert err.code == "too_many_in_one_call"
    assert err.message == "За один раз можно добавить не больше 5000 адресов."


async def test_recipients_not_changed_while_sending(make_service, crm: Crm, events: Events) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    await make_service(clock=clock, rate_per_hour=1, batch_size=1)
    cid = await crm.campaign(people(2))
    await crm.start(cid)
    await events.wait(cid, ("deferred",))
    err = await crm.fails(
        "recipients.add", {"campaign_id": cid, "recipients": [{"email": "late@example.org"}]}
    )
    assert err.code == "invalid_state"
    assert err.message == "Действие невозможно: кампания в статусе «отправляется»."
    err = await crm.fails(
        "recipients.remove", {"campaign_id": cid, "emails": ["user1@example.org"]}
    )
    assert err.code == "invalid_state"
    err = await crm.fails(
        "attachments.add",
        {"campaign_id": cid, "filename": "a.txt", "content_type": "text/plain", "content": "aGk="},
    )
    assert err.code == "invalid_state"
    # Paused, it may change again.
    await crm.call("campaign.pause", {"campaign_id": cid})
    removed = await crm.call(
        "recipients.remove", {"campaign_id": cid, "emails": ["user1@example.org"]}
    )
    assert removed["removed"] == 1


async def test_attachments_limits(make_service, crm: Crm, sink, db) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    await make_service(clock=clock, max_attachment_bytes=1000, max_attachments_total_bytes=1500)
    cid = await crm.campaign([])

    def att(name: str, size: int, content_type: str = "application/pdf") -> dict[str, object]:
        content = base64.b64encode(bytes([65 + i % 26 for i in range(size)])).decode()
        return {
            "campaign_id": cid,
            "filename": name,
            "content_type": content_type,
            "content": content,
        }

    first = await crm.call("attachments.add", att("Отчёт за год.pdf", 800))
    assert first["size"] == 800 and first["filename"] == "Отчёт за год.pdf"
    err = await crm.fails("attachments.add", att("second.pdf", 800))
    assert err.code == "attachments_total_too_large" and err.status == 422
    assert err.message == "Вложения кампании вместе заняли бы 1600 байт, максимум 1500."
    err = await crm.fails("attachments.add", att("huge.pdf", 1001))
    assert err.code == "attachment_too_large"
    assert err.message == "Вложение «huge.pdf» занимает 1001 байт, максимум 1000."
    err = await crm.fails("attachments.add", {**att("x.pdf", 10), "content": "not base64!"})
    assert err.code == "validation_error"
    err = await crm.fails("attachments.add", att("x.pdf", 10, content_type="text/plain; x=1"))
    assert err.code == "validation_error"
    err = await crm.fails("attachments.add", att("../etc/passwd", 10))
    assert err.code == "validation_error"

    small = await crm.call("attachments.add", att("notes.txt", 600, "text/plain"))
    listed = await crm.call("attachments.list", {"campaign_id": cid})
    assert [a["filename"] for a in listed["items"]] == ["Отчёт за год.pdf", "notes.txt"]
    assert listed["total_size"] == 1400
    after = await crm.call("attachments.remove", {"campaign_id": cid, "attachment_id": first["id"]})
    assert [a["id"] for a in after["items"]] == [small["id"]]
    err = await crm.fails("attachments.remove", {"campaign_id": cid, "attachment_id": first["id"]})
    assert err.code == "attachment_not_found" and err.status == 404

    # The test email carries the attachment the recipients will get.
    await crm.call("campaign.test", {"campaign_id": cid, "email": "me@example.org"})
    [got] = sink.messages
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    [part] = list(msg.iter_attachments())
    assert part.get_filename() == "notes.txt" and len(part.get_content()) == 600
    actions = [r["action"] for r in await db.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions.count("attachment.add") == 2 and "attachment.remove" in actions


async def test_adding_recipients_is_audited(make_service, crm: Crm, db) -> None:
    await make_service()
    cid = await crm.campaign([])
    added = await crm.call(
        "recipients.add",
        {
            "campaign_id": cid,
            "recipients": [
                {"email": "anna@example.org"},
                {"email": "ANNA@example.org"},
                {"email": "boris@example.org"},
                {"email": "no-at-sign"},
            ],
        },
    )
    assert added["added"] == 2 and added["duplicates"] == 1
    # An admin adding to someone's campaign is the one the audit names.
    await crm.call(
        "recipients.add",
        {"campaign_id": cid, "recipients": [{"email": "vera@example.org"}]},
        user="boss",
        roles="admin",
    )
    # Nothing new (only a duplicate): nothing happened, nothing to audit.
    await crm.call(
        "recipients.add", {"campaign_id": cid, "recipients": [{"email": "Vera@Example.org"}]}
    )
    rows = await db.fetch(
        "SELECT actor_id, details FROM audit_log WHERE campaign_id = $1 "
        "AND action = 'recipients.add' ORDER BY id",
        cid,
    )
    assert [(r["actor_id"], json.loads(r["details"])) for r in rows] == [
        ("manager-1", {"count": 2, "duplicates": 1}),
        ("boss", {"count": 1, "duplicates": 0}),
    ]
    page = await crm.call("audit.list", {"campaign_id": cid})
    assert [e["action"] for e in page["items"]] == [
        "campaign.create",
        "recipients.add",
        "recipients.add",
    ]


async def test_recipients_refused_once_sending_or_over(
    make_service, crm: Crm, events: Events, db
) -> None:
    mid_batch = asyncio.Event()
    go_on = asyncio.Event()
    held = 0  # the campaign kept sending: its first batch waits for go_on

    async def hold(campaign_id: int, batch: int) -> None:
        if campaign_id == held:
            mid_batch.set()
            await go_on.wait()

    await make_service(clock=FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC)), fault=hold)
    done = await crm.campaign(people(2))
    await crm.start(done)
    assert (await events.wait(done, ("sent", "completed_with_errors")))["event"] == "sent"
    cancelled = await crm.campaign(people(2))
    await crm.call("campaign.cancel", {"campaign_id": cancelled})
    held = await crm.campaign(people(2))
    await crm.start(held)
    async with asyncio.timeout(20):
        await mid_batch.wait()
    assert (await crm.get(held))["status"] == "sending"

    try:
        for cid, status in [(held, "sending"), (done, "sent"), (cancelled, "cancelled")]:
            before = await _campaign_rows(db, cid)
            for who in ({}, {"user": "boss", "roles": "admin"}):
                err = await crm.fails(
                    "recipients.add",
                    {"campaign_id": cid, "recipients": [{"email": "late@example.org"}]},
                    **who,
                )
                assert err.code == "invalid_state" and err.status == 409, (status, who)
                assert err.details == {"status": status}
            assert await _campaign_rows(db, cid) == before, status
    finally:
        go_on.set()


async def test_adding_waits_for_a_concurrent_status_change(make_service, crm: Crm, db) -> None:
    """The status is checked under the campaign's row lock, not before it.

    Another transaction (what the engine does when a campaign begins sending)
    holds the campaign row and moves it to 'sending'. recipients.add must wait
    for it and then refuse; checked before the lock, it would read 'draft' and
    insert, because inserting a recipient does not conflict with that lock.
    """
    await make_service()
    cid = await crm.campaign(people(1))
    tx = db.transaction()
    await tx.start()
    committed = False
    try:
        await db.execute("UPDATE campaign SET status = 'sending' WHERE id = $1", cid)
        adding = asyncio.ensure_future(
            crm.fails(
                "recipients.add", {"campaign_id": cid, "recipients": [{"email": "x@example.org"}]}
            )
        )
        # Until the request blocks on the lock (pg_stat_activity shows it), or
        # answers without having waited; at most 10 s.
        for _ in range(1000):
            if adding.done() or await _someone_waits_for_a_lock(db):
                break
            await asyncio.wait({adding}, timeout=0.01)
        assert not adding.done(), "recipients.add did not wait for the campaign's lock"
        await tx.commit()
        committed = True
    finally:
        if not committed:
            await tx.rollback()
    err = await adding
    assert err.code == "invalid_state" and err.details == {"status": "sending"}
    assert await db.fetchval("SELECT count(*) FROM recipient WHERE campaign_id = $1", cid) == 1


async def _someone_waits_for_a_lock(db) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def _campaign_rows(db, cid: int) -> tuple[object, ...]:
    recipients = await db.fetch(
        "SELECT id, email, status FROM recipient WHERE campaign_id = $1 ORDER BY id", cid
    )
    audit = await db.fetch(
        "SELECT id, action FROM audit_log WHERE campaign_id = $1 AND actor_id <> 'system' "
        "ORDER BY id",
        cid,
    )
    status = await db.fetchval("SELECT status FROM campaign WHERE id = $1", cid)
    return status, [tuple(r) for r in recipients], [tuple(r) for r in audit]
