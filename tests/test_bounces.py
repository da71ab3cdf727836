"""Bounces and complaints -> the suppression list, on the embedded stack.

Reports reach the service's own SMTP receiver (aiosmtplib on loopback) and its
webhook; the database and the sink show what changed.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from mailer.bounces.parse import parse_report
from mailer.bounces.verp import bounce_address, recipient_of
from mailer.bounces.webhook import SIGNATURE_HEADER, signature
from tests.helpers import FINAL, ApiFailed, Crm, Events, people

DOMAIN = "bounces.example.com"
SECRET = "webhook-secret-0123456789"


def dsn(action: str = "failed", status: str = "5.1.1", rcpt: str = "x@example.org") -> bytes:
    """An RFC 3464 report as an MTA writes it."""
    return (
        "From: MAILER-DAEMON@mx.example.org\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        "\r\n--B1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} user unknown\r\n"
        "\r\n--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "From: crm@example.com\r\nSubject: hi\r\n"
        "\r\n--B1--\r\n"
    ).encode()


def arf(return_path: str, feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 complaint carrying the original message's headers."""
    return (
        "From: fbl@isp.example.net\r\nSubject: Complaint\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="B2"\r\n'
        "\r\n--B2\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        "--B2\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
        "\r\n--B2\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Return-Path: <{return_path}>\r\nFrom: crm@example.com\r\nSubject: hi\r\n"
        "\r\n--B2--\r\n"
    ).encode()


async def deliver(port: int, rcpt: str, data: bytes) -> None:
    """Sends a report the way MTAs do: from the null sender (MAIL FROM:<>)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    try:
        await smtp.sendmail("", [rcpt], data)
    finally:
        await smtp.quit()


async def send_campaign(crm: Crm, events: Events, recipients: list[dict[str, Any]]) -> int:
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    async with asyncio.timeout(30):
        await events.wait(cid, FINAL)
    return cid


async def statuses(db: Any, cid: int) -> dict[str, tuple[str, str | None]]:
    rows = await db.fetch("SELECT email, status, error FROM recipient WHERE campaign_id = $1", cid)
    return {r["email"]: (r["status"], r["error"]) for r in rows}


def test_verp_tokens_are_signed() -> None:
    a = bounce_address("secret-1", DOMAIN, 42)
    assert recipient_of(["secret-1"], DOMAIN, a) == 42
    assert recipient_of(["old", "secret-1"], DOMAIN, a.upper()) == 42  # MTAs may change case
    assert recipient_of(["other"], DOMAIN, a) is None
    assert recipient_of(["secret-1"], "other.example", a) is None
    local, _, dom = a.partition("@")
    for i in range(len("bounce+"), len(local)):
        c = "a" if local[i] != "a" else "b"
        assert (
            recipient_of(["secret-1"], DOMAIN, local[:i] + c + local[i + 1 :] + "@" + dom) is None
        )
    assert recipient_of(["secret-1"], DOMAIN, f"bounce+42@{DOMAIN}") is None


def test_parse_reports() -> None:
    assert parse_report(dsn()).kind == "hard"
    assert parse_report(dsn(status="4.2.2")).kind == "soft"
    assert parse_report(dsn(action="delayed", status="4.4.7")).kind == "soft"
    assert parse_report(dsn(action="delivered", status="2.0.0")).kind is None
    r = parse_report(arf("bounce+abc@x"))
    assert (r.kind, r.format) == ("complaint", "arf")
    assert parse_report(arf("x@y", feedback_type="not-spam")).kind is None
    plain = EmailMessage()
    plain["From"] = "someone@example.org"
    plain["Subject"] = "hello"
    plain.set_content("just a reply")
    assert parse_report(plain.as_bytes()).kind is None
    assert parse_report(b"\x00\xff garbage").kind is None
    # A non-standard bounce (qmail's format), which flufl.bounce recognizes.
    qmail = (
        b"From: MAILER-DAEMON@mx.example.org\nSubject: failure notice\n\n"
        b"Hi. This is the qmail-send program at mx.example.org.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        b"<gone@example.org>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
        b"--- Below this line is a copy of the message.\n"
    )
    assert parse_report(qmail).kind == "hard"


async def test_dsn_and_arf_suppress_and_the_next_campaign_skips(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    service = await make_service(bounce_domain=DOMAIN, bounce_smtp_port=0)
    port = service.bounce_smtp_port
    assert port
    recipients = people(4)
    cid = await send_campaign(crm, events, recipients)
    senders = {m.rcpt_tos[0]: m.mail_from for m in sink.messages}
    assert len(set(senders.values())) == 4
    assert all(s.startswith("bounce+") and s.endswith("@" + DOMAIN) for s in senders.values())
    a, b, c, d = (r["email"] for r in recipients)

    await deliver(port, senders[a], dsn(rcpt=a))  # a DSN to a's envelope sender
    await deliver(port, f"fbl@{DOMAIN}", arf(senders[b]))  # a complaint naming b's message
    # Forged and unsigned bounce addresses: accepted by SMTP, change nothing.
    forged = senders[c][:10] + ("a" if senders[c][10] != "a" else "b") + senders[c][11:]
    await deliver(port, forged, dsn(rcpt=c))
    await deliver(port, f"bounce+{c}@{DOMAIN}".replace("@example.org", ""), dsn(rcpt=c))
    await deliver(port, f"fbl@{DOMAIN}", arf(f"bounce+forged@{DOMAIN}"))
    # Another domain is refused at RCPT: no open relay.
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await deliver(port, senders[c].replace(DOMAIN, "example.net"), dsn(rcpt=c))

    got = await statuses(db, cid)
    assert got[a][0] == "bounced" and "5.1.1" in (got[a][1] or "")
    assert got[b][0] == "complained"
    assert got[c] == ("sent", None) and got[d] == ("sent", None)
    rows = await db.fetch(
        "SELECT email, reason, source, campaign_id FROM unsubscribe ORDER BY email"
    )
    assert [(r["email"], r["reason"], r["source"], r["campaign_id"]) for r in rows] == [
        (a, "hard_bounce", "dsn", cid),
        (b, "complaint", "arf", cid),
    ]
    audit = await db.fetch("SELECT details FROM audit_log WHERE action = 'suppression.add'")
    assert len(audit) == 2

    # A suppression event per address, through the outbox.
    kinds = sorted(r["kind"] for r in await db.fetch("SELECT kind FROM event_outbox"))
    assert "suppression" not in kinds  # published and deleted already

    sink.reset()
    cid2 = await send_campaign(crm, events, recipients)
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted([c, d])
    got = await statuses(db, cid2)
    assert got[a] == ("suppressed", "suppressed: hard_bounce")
    assert got[b] == ("suppressed", "suppressed: complaint")
    view = await crm.get(cid2)
    assert view["status"] == "sent"


async def test_soft_bounces_suppress_after_the_limit(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    service = await make_service(bounce_domain=DOMAIN, bounce_smtp_port=0, soft_bounce_limit=2)
    recipients = people(1)
    await send_campaign(crm, events, recipients)
    sender = sink.messages[0].mail_from
    await deliver(service.bounce_smtp_port, sender, dsn(action="delayed", status="4.4.7"))
    assert await db.fetchval("SELECT count(*) FROM unsubscribe") == 0
    await deliver(service.bounce_smtp_port, sender, dsn(status="4.2.2"))
    row = await db.fetchrow("SELECT email, reason FROM unsubscribe")
    assert row is not None and row["reason"] == "soft_bounce"
    assert await db.fetchval("SELECT status FROM recipient") == "sent"


async def test_webhook_is_hmac_verified(make_service, crm: Crm, events: Events, sink, db) -> None:
    service = await make_service(
        bounce_domain=DOMAIN, bounce_smtp_port=0, bounce_webhook_secret=SECRET
    )
    recipients = people(2)
    cid = await send_campaign(crm, events, recipients)
    senders = {m.rcpt_tos[0]: m.mail_from for m in sink.messages}
    a, b = (r["email"] for r in recipients)
    url = f"http://127.0.0.1:{service.public_http_port}/bounces/webhook"
    body = json.dumps(
        {
            "events": [
                {"type": "complaint", "address": senders[a], "detail": "spam button"},
                {"type": "hard_bounce", "address": f"bounce+nope@{DOMAIN}"},
            ]
        }
    ).encode()
    async with aiohttp.ClientSession() as http:
        for bad in ("", "sha256=00", signature("another-secret-0123456789", body)):
            async with http.post(url, data=body, headers={SIGNATURE_HEADER: bad}) as resp:
                assert resp.status == 401
        assert (await statuses(db, cid))[a] == ("sent", None)
        async with http.post(
            url, data=b"{", headers={SIGNATURE_HEADER: signature(SECRET, b"{")}
        ) as resp:
            assert resp.status == 400
        async with http.post(
            url, data=body, headers={SIGNATURE_HEADER: signature(SECRET, body)}
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {"received": 2, "applied": 1}
    got = await statuses(db, cid)
    assert got[a][0] == "complained" and got[b] == ("sent", None)
    assert await db.fetchval("SELECT reason FROM unsubscribe WHERE email = $1", a) == "complaint"


async def test_suppression_admin_subjects(make_service, crm: Crm, db) -> None:
    await make_service()
    admin = {"user": "boss", "roles": "admin"}
    e = await crm.fails("suppression.add", {"email": "x@example.org"})
    assert e.code == "forbidden"
    added = await crm.call(
        "suppression.add", {"email": "X@Example.org", "detail": "asked by phone"}, **admin
    )
    assert (
        added["suppressed"] is True
        and added["reason"] == "manual"
        and added["email"] == "x@example.org"
    )
    check = await crm.call("suppression.check", {"email": "x@example.org"})
    assert check["reason"] == "manual" and check["source"] == "api"
    page = await crm.call("suppression.list", {"reason": "manual"}, **admin)
    assert [i["email"] for i in page["items"]] == ["x@example.org"]
    assert (await crm.call("suppression.list", {"reason": "complaint"}, **admin))["items"] == []
    # Unsubscribes are on the same list.
    await crm.call("unsubscribe.add", {"email": "u@example.org"}, **admin)
    check = await crm.call("suppression.check", {"email": "u@example.org"})
    assert check["reason"] == "unsubscribed"
    removed = await crm.call("suppression.remove", {"email": "x@example.org"}, **admin)
    assert removed == {"email": "x@example.org", "removed": True, "reason": "manual"}
    assert (await crm.call("suppression.check", {"email": "x@example.org"}))["suppressed"] is False
    actions = [r["action"] for r in await db.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions.count("suppression.add") == 1 and actions.count("suppression.remove") == 1
    with pytest.raises(ApiFailed):
        await crm.call("suppression.check", {"email": "not an address"})


async def test_soft_bounces_past_their_window_are_removed(db, database_url) -> None:
    import asyncpg

    from mailer.retention import Retention, RetentionPolicy

    now = datetime(2026, 12, 1, tzinfo=UTC)
    for days in (1, 6, 8, 30):
        await db.execute(
            "INSERT INTO soft_bounce (email, created_at) VALUES ('a@example.org', $1)",
            now - timedelta(days=days),
        )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        policy = RetentionPolicy(
            send_log_days=0, audit_log_days=0, recipients_days=0, soft_bounce_days=7, batch=1
        )
        assert await Retention(pool, policy).run(now) == {"soft_bounce": 2}
    finally:
        await pool.close()
    assert await db.fetchval("SELECT count(*) FROM soft_bounce") == 2


async def test_receiver_refuses_oversized_and_answers_451_when_the_database_fails(
    database_url,
) -> None:
    """The failure policies of the receiver: 552 past the size limit; a database that
    cannot record the report gets 451, so the reporting MTA tries again later."""
    import asyncpg

    from mailer.bounces.inbound import BounceProcessor
    from mailer.bounces.receiver import BounceReceiver
    from mailer.clock import SystemClock
    from mailer.suppression import PgSuppressions

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    secret = "s" * 20
    processor = BounceProcessor(
        domain=DOMAIN, secrets=[secret], store=PgSuppressions(pool), clock=SystemClock()
    )
    receiver = BounceReceiver("127.0.0.1", 0, domain=DOMAIN, processor=processor, max_bytes=4096)
    await receiver.start()
    try:
        rcpt = bounce_address(secret, DOMAIN, 12345)
        with pytest.raises(aiosmtplib.SMTPResponseException) as big:
            await deliver(receiver.port, rcpt, dsn() + b"x" * 5000 + b"\r\n")
        assert big.value.code == 552
        await deliver(receiver.port, rcpt, dsn())  # the recipient does not exist: 250, nothing
        await pool.close()  # the database is gone
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await deliver(receiver.port, rcpt, dsn())
        assert failed.value.code == 451
    finally:
        await receiver.stop()
        await pool.close()


async def test_webhook_answers_503_when_the_database_fails(database_url) -> None:
    import asyncpg
    from aiohttp import web

    from mailer.bounces.inbound import BounceProcessor
    from mailer.bounces.webhook import BounceWebhook
    from mailer.clock import SystemClock
    from mailer.suppression import PgSuppressions

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    secret = "s" * 20
    processor = BounceProcessor(
        domain=DOMAIN, secrets=[secret], store=PgSuppressions(pool), clock=SystemClock()
    )
    app = web.Application()
    app.add_routes(BounceWebhook(secret=SECRET, processor=processor).routes())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    body = json.dumps(
        {"events": [{"type": "hard_bounce", "address": bounce_address(secret, DOMAIN, 7)}]}
    ).encode()
    try:
        await pool.close()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/bounces/webhook",
                data=body,
                headers={SIGNATURE_HEADER: signature(SECRET, body)},
            ) as resp,
        ):
            assert resp.status == 503
    finally:
        await runner.cleanup()
