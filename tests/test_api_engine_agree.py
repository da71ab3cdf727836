"""The API accepts only what the engine can send, and one campaign that cannot be
sent never holds up the queue.

Real NATS, PostgreSQL, Redis and SMTP sink; the whole service runs.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from mailer.render import check_attachment
from tests.helpers import Crm, Events, people

NOW = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
# Characters str.splitlines() breaks on that are neither CR nor LF: the
# header code of the standard library refuses them in a filename.
SPLITTING = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def _att(cid: int, filename: str) -> dict[str, object]:
    return {
        "campaign_id": cid,
        "filename": filename,
        "content_type": "text/plain",
        "content": base64.b64encode(b"hello").decode(),
    }


@pytest.mark.parametrize("char", SPLITTING)
def test_the_renderer_refuses_line_splitting_filenames(char: str) -> None:
    with pytest.raises(ValueError, match="linefeed"):
        check_attachment(f"a{char}b.txt", "text/plain")


async def test_an_attachment_the_engine_cannot_send_is_refused_at_the_api(
    make_service, crm: Crm, db
) -> None:
    await make_service()
    cid = await crm.campaign(people(1))
    for char in SPLITTING:
        err = await crm.fails("attachments.add", _att(cid, f"report{char}2026.txt"))
        assert err.code == "validation_error" and err.status == 422, repr(char)
    assert await db.fetchval("SELECT count(*) FROM attachment") == 0
    ok = await crm.call("attachments.add", _att(cid, "отчёт 2026.txt"))
    assert ok["filename"] == "отчёт 2026.txt"


async def test_a_campaign_that_cannot_be_rendered_is_paused_and_the_queue_goes_on(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    await make_service(max_active_campaigns=1)
    broken = await crm.campaign(people(2), priority=9)
    fine = await crm.campaign(people(2, start=10), priority=1)
    # A row the API would refuse today (stored before it checked, or by hand).
    await db.execute(
        "INSERT INTO attachment (campaign_id, filename, content_type, content, created_at)"
        " VALUES ($1, $2, 'text/plain', $3, $4)",
        broken,
        "bad\x0bname.txt",
        b"x",
        NOW,
    )
    # Its start is refused: the API builds the whole message as the engine would.
    err = await crm.fails("campaign.start", {"campaign_id": broken})
    assert err.code == "validation_error"
    # Queued all the same, as the store's start does (an older version let it
    # through): the engine is the last line.
    await db.execute("UPDATE campaign SET status = 'ready' WHERE id = $1", broken)
    await db.execute(
        "INSERT INTO queue_entry (campaign_id, priority, queued_at) VALUES ($1, 9, $2)",
        broken,
        NOW,
    )
    await crm.start(fine)

    paused = await events.wait(broken, ("paused",))
    assert paused["defer_reason"] == "render_error"
    await events.wait(fine, ("sent", "completed_with_errors"))
    assert len(sink.messages) == 2  # only the fine campaign's
    got = await crm.get(broken)
    assert got["status"] == "paused" and got["queue"]["defer_reason"] == "render_error"
    assert got["counts"] == {"pending": 2}
    view = await crm.call("manager.status", {}, lang="en")
    assert view["active_campaign"]["id"] == broken
    assert view["reason_code"] == "render_error"
    assert view["reason"].startswith("Sending paused: the message cannot be built")
    # Nothing holds its slot: no live lease on it.
    assert (
        await db.fetchval("SELECT lease_owner FROM queue_entry WHERE campaign_id = $1", broken)
        is None
    )
    # Resuming it unchanged is refused; fixed, it goes.
    err = await crm.fails("campaign.resume", {"campaign_id": broken})
    assert err.code == "validation_error"
    await db.execute("DELETE FROM attachment WHERE campaign_id = $1", broken)
    await crm.call("campaign.resume", {"campaign_id": broken})
    await events.wait(broken, ("sent",))


async def test_an_add_past_the_recipients_cap_is_refused_whole(make_service, crm: Crm, db) -> None:
    await make_service(max_campaign_recipients=3)
    cid = await crm.campaign(people(2))
    err = await crm.fails(
        "recipients.add", {"campaign_id": cid, "recipients": people(2, start=5)}, lang="en"
    )
    assert err.code == "recipients_limit" and err.status == 422
    assert err.message == (
        "Nothing added: the campaign would have 4 recipients, at most 3 allowed. Split it."
    )
    assert await db.fetchval("SELECT count(*) FROM recipient") == 2
    # Duplicates collapse before the count: re-adding the same two is fine.
    same = await crm.call("recipients.add", {"campaign_id": cid, "recipients": people(2)})
    assert same["added"] == 0 and same["duplicates"] == 2
    one = await crm.call("recipients.add", {"campaign_id": cid, "recipients": people(1, start=7)})
    assert one["added"] == 1
    # Paused or ready, the cap holds all the same.
    await crm.start(cid)
    await crm.call("campaign.pause", {"campaign_id": cid})
    err = await crm.fails("recipients.add", {"campaign_id": cid, "recipients": people(1, start=9)})
    assert err.code == "recipients_limit"


async def test_start_audits_the_status_it_came_from(make_service, crm: Crm, db) -> None:
    await make_service()
    cid = await crm.campaign(people(1))
    await crm.start(cid)
    rows = await db.fetch(
        "SELECT details->>'from' AS f, details->>'to' AS t FROM audit_log"
        " WHERE action = 'campaign.status' AND campaign_id = $1 ORDER BY id",
        cid,
    )
    assert (rows[0]["f"], rows[0]["t"]) == ("draft", "ready")
