"""Recipients and attachments through the public API."""

from __future__ import annotations

import base64
import email
import email.policy
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
