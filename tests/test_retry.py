"""campaign.retry_failed and recipients.resolve on the embedded stack.

The sink refuses chosen addresses (451 transient, 550 permanent) once; a retry
then sends each requeued recipient exactly once more, never a suppressed one,
and the campaign finishes again with the status its recipients call for.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from tests.helpers import Crm, Events, people

FINAL = ("sent", "completed_with_errors")
ADMIN: dict[str, Any] = {"user": "boss", "roles": "admin"}


async def _statuses(db: Any, cid: int) -> dict[str, str]:
    rows = await db.fetch("SELECT email, status FROM recipient WHERE campaign_id = $1", cid)
    return {r["email"]: r["status"] for r in rows}


def _delivered(sink: Any) -> Counter[str]:
    return Counter(r for m in sink.messages for r in m.rcpt_tos)


async def test_retry_sends_each_failed_once_more_and_never_a_suppressed_one(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    # One transient answer fails a recipient: its attempts ran out.
    await make_service(max_transient_attempts=1)
    recipients = people(5)
    a, b, c, d, e = (r["email"] for r in recipients)
    sink.fail(a, "451 4.3.0 Try again later", times=1)
    sink.fail(b, "550 5.1.1 No such user", times=1)
    sink.fail(e, "452 4.2.2 Mailbox full", times=1)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    async with asyncio.timeout(30):
        assert (await events.wait(cid, FINAL))["event"] == "completed_with_errors"
    assert await _statuses(db, cid) == {a: "failed", b: "failed", c: "sent", d: "sent", e: "failed"}
    assert _delivered(sink) == Counter({c: 1, d: 1})
    await crm.call("suppression.add", {"email": e, "detail": "asked by phone"}, **ADMIN)

    # Transient failures only, by default: a, not b (permanent), not e (suppressed).
    reply = await crm.call("campaign.retry_failed", {"campaign_id": cid})
    assert reply["requeued"] == 1
    assert reply["campaign"]["status"] in ("ready", "sending", "completed_with_errors")
    async with asyncio.timeout(30):
        await events.wait_count(cid, "completed_with_errors", 2)
    assert _delivered(sink) == Counter({a: 1, c: 1, d: 1})
    assert await _statuses(db, cid) == {a: "sent", b: "failed", c: "sent", d: "sent", e: "failed"}

    # Permanent ones only when asked; e stays failed, never sent.
    reply = await crm.call("campaign.retry_failed", {"campaign_id": cid, "permanent": True})
    assert reply["requeued"] == 1
    async with asyncio.timeout(30):
        await events.wait_count(cid, "completed_with_errors", 3)
    assert _delivered(sink) == Counter({a: 1, b: 1, c: 1, d: 1})
    assert (await crm.get(cid))["status"] == "completed_with_errors"  # e: failed, suppressed

    # Nothing left to retry: nothing changes, no reopening, no audit row.
    reply = await crm.call("campaign.retry_failed", {"campaign_id": cid, "permanent": True})
    assert reply["requeued"] == 0 and reply["campaign"]["status"] == "completed_with_errors"
    audits = await db.fetch(
        "SELECT details FROM audit_log WHERE campaign_id = $1 AND action = 'campaign.retry_failed'",
        cid,
    )
    assert len(audits) == 2
    # Someone else's campaign is not theirs to retry.
    e2 = await crm.fails("campaign.retry_failed", {"campaign_id": cid}, user="manager-2")
    assert e2.code == "forbidden"


async def test_resolve_in_doubt_sent_failed_and_retry(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    await make_service()
    recipients = people(4)
    emails = [r["email"] for r in recipients]
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    async with asyncio.timeout(30):
        assert (await events.wait(cid, FINAL))["event"] == "sent"
    # Three of them as a crash would have left them.
    ids = {
        r["email"]: r["id"]
        for r in await db.fetch("SELECT id, email FROM recipient WHERE campaign_id = $1", cid)
    }
    await db.execute(
        "UPDATE recipient SET status = 'in_doubt', error = 'owner died' WHERE id = ANY($1)",
        [ids[x] for x in emails[:3]],
    )
    await db.execute("UPDATE campaign SET status = 'completed_with_errors' WHERE id = $1", cid)
    sink.reset()

    body = {"campaign_id": cid, "recipient_ids": [ids[emails[0]]], "to": "sent"}
    assert (await crm.fails("recipients.resolve", body)).code == "forbidden"
    reply = await crm.call("recipients.resolve", {**body, "note": "OPS-1"}, **ADMIN)
    assert reply["resolved"] == [ids[emails[0]]] and reply["warning"] is None
    assert reply["campaign"]["status"] == "completed_with_errors"  # two still in doubt
    reply = await crm.call(
        "recipients.resolve",
        {"campaign_id": cid, "recipient_ids": [ids[emails[1]], ids[emails[3]]], "to": "failed"},
        **ADMIN,
    )
    assert reply["resolved"] == [ids[emails[1]]]  # emails[3] was not in doubt: untouched
    reply = await crm.call(
        "recipients.resolve",
        {"campaign_id": cid, "recipient_ids": [ids[emails[2]]], "to": "retry"},
        lang="en",
        **ADMIN,
    )
    assert reply["warning"].startswith("Warning: these messages will be sent again")
    async with asyncio.timeout(30):
        await events.wait_count(cid, "completed_with_errors", 1)
    assert _delivered(sink) == Counter({emails[2]: 1})
    got = await _statuses(db, cid)
    assert got == {emails[0]: "sent", emails[1]: "failed", emails[2]: "sent", emails[3]: "sent"}
    assert (await crm.get(cid))["status"] == "completed_with_errors"  # emails[1] failed

    # Once nothing failed or is in doubt, the campaign is honestly "sent".
    await db.execute("UPDATE recipient SET status = 'in_doubt' WHERE id = $1", ids[emails[1]])
    reply = await crm.call(
        "recipients.resolve",
        {"campaign_id": cid, "recipient_ids": [ids[emails[1]]], "to": "sent"},
        **ADMIN,
    )
    assert reply["campaign"]["status"] == "sent"
    details = await db.fetch(
        "SELECT details FROM audit_log WHERE campaign_id = $1 AND action = 'recipients.resolve'",
        cid,
    )
    assert len(details) == 4
