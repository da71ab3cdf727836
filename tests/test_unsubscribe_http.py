"""The unsubscribe pages through the service's real HTTP server, and their effect.

Real NATS/PostgreSQL/Redis/SMTP; requests go over loopback to the port the
service bound. A mail client's RFC 8058 one-click POST carries no cookies, so
the client here has none either.
"""

from __future__ import annotations

import email
import email.policy
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from nats.aio.client import Client

from mailer.clock import FakeClock
from mailer.config import Settings
from mailer.events import UnsubscribeEvent, stream_name
from mailer.logs import email_hash, mask_email
from mailer.service import Service
from mailer.sink import SmtpSink
from mailer.texts import text
from mailer.unsubscribe import sign
from tests.conftest import MakeService
from tests.helpers import Crm, Events, people

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # DummyCookieJar: like a mail client's one-click POST, no cookies ever.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def base(service: Service) -> str:
    return f"http://127.0.0.1:{service.public_http_port}"


def tampered(token: str, at: int) -> str:
    flipped = "A" if token[at] != "A" else "B"
    return token[:at] + flipped + token[at + 1 :]


async def unsubscribe_events(nc: Client, settings: Settings) -> int:
    subject = f"{settings.subject_prefix}.events.unsubscribe"
    info = await nc.jetstream().stream_info(
        stream_name(settings.subject_prefix), subjects_filter=subject
    )
    return (info.state.subjects or {}).get(subject, 0)


async def recorded(db: asyncpg.Connection) -> tuple[int, int]:
    unsubscribed = await db.fetchval("SELECT count(*) FROM unsubscribe")
    audited = await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'unsubscribe'")
    return unsubscribed, audited


async def test_get_shows_a_confirmation_page_in_russian_or_english(
    make_service: MakeService, http: aiohttp.ClientSession, settings: Settings, db: Any
) -> None:
    service = await make_service()
    address = "anna.smith@example.org"
    url = f"{base(service)}/u/{sign(settings.unsubscribe_secret, 1, address)}"
    masked = mask_email(address)

    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html" and resp.charset == "utf-8"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["Cache-Control"] == "no-store"
        page = await resp.text()
    assert '<html lang="ru">' in page
    assert text("unsubscribe_page_question", "ru", email=masked) in page
    assert text("unsubscribe_page_button", "ru") in page
    assert '<form method="post"' in page
    assert address not in page  # a forwarded link does not reveal the address

    async with http.get(url, params={"lang": "en"}) as resp:
        page = await resp.text()
    assert '<html lang="en">' in page
    assert text("unsubscribe_page_question", "en", email=masked) in page
    assert 'action="/u/' in page and "lang=en" in page  # the click stays in English

    for header, lang in (
        ("en-US,en;q=0.9,ru;q=0.5", "en"),
        ("ru-RU, en;q=0.5", "ru"),
        ("de-DE", "ru"),
    ):
        async with http.get(url, headers={"Accept-Language": header}) as resp:
            assert f'<html lang="{lang}">' in await resp.text(), header

    # Showing the page never unsubscribes (link scanners fetch links).
    assert await recorded(db) == (0, 0)


async def test_page_escapes_everything(
    make_service: MakeService, http: aiohttp.ClientSession, settings: Settings
) -> None:
    service = await make_service()
    token = sign(settings.unsubscribe_secret, 1, '<b onclick="x">@evil.example')
    async with http.get(f"{base(service)}/u/{token}", params={"lang": 'en"><script>'}) as resp:
        page = await resp.text()
    assert resp.status == 200
    assert "<b***" not in page and "&lt;b***@evil.example" in page
    assert "<script>" not in page


async def test_post_records_the_unsubscribe_once(
    make_service: MakeService,
    http: aiohttp.ClientSession,
    crm: Crm,
    nc: Client,
    settings: Settings,
    db: Any,
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    service = await make_service(clock=clock)
    cid = await crm.campaign(people(1))
    address = "Anna.Smith@Example.ORG"
    url = f"{base(service)}/u/{sign(settings.unsubscribe_secret, cid, address)}"
    live: list[UnsubscribeEvent] = []

    async def on_event(msg: Any) -> None:
        live.append(msgspec.json.decode(msg.data, type=UnsubscribeEvent))

    await nc.subscribe(f"{settings.subject_prefix}.events.unsubscribe", cb=on_event)
    await nc.flush()

    async with http.post(url, data=ONE_CLICK, allow_redirects=False) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert text("unsubscribe_page_done", "ru", email=mask_email(address.lower())) in page

    row = await db.fetchrow("SELECT email, source, created_at FROM unsubscribe")
    assert dict(row) == {
        "email": "anna.smith@example.org",
        "source": "link",
        "created_at": clock.now(),
    }
    audit = await db.fetch("SELECT * FROM audit_log WHERE action = 'unsubscribe'")
    assert len(audit) == 1
    assert audit[0]["actor_id"] == "recipient"
    assert audit[0]["campaign_id"] == cid
    assert audit[0]["at"] == clock.now()
    # The audit keeps the hash only: no address in the audit trail.
    details = msgspec.json.decode(audit[0]["details"])  # a plain connection: jsonb as text
    assert details == {"email_hash": email_hash("anna.smith@example.org")}

    # The event other services consume carries the address; it is on the stream.
    assert await unsubscribe_events(nc, settings) == 1
    await nc.flush()
    assert [e.email for e in live] == ["anna.smith@example.org"]
    assert live[0].email_domain == "example.org" and live[0].source == "link"
    assert live[0].campaign_id == cid and live[0].at == clock.now()

    # A second click (or the mail client retrying): 200 again, nothing new.
    clock.advance(60)
    async with http.post(url, data=ONE_CLICK, allow_redirects=False) as resp:
        assert resp.status == 200
    assert await recorded(db) == (1, 1)
    assert await db.fetchval("SELECT created_at FROM unsubscribe") == row["created_at"]
    assert await unsubscribe_events(nc, settings) == 1


async def test_an_unsubscribe_event_jetstream_refused_is_relayed_later(
    make_service: MakeService,
    http: aiohttp.ClientSession,
    crm: Crm,
    nc: Client,
    settings: Settings,
    db: Any,
) -> None:
    service = await make_service()
    cid = await crm.campaign(people(1))
    js = nc.jetstream()
    stream = stream_name(settings.subject_prefix)
    info = await js.stream_info(stream)
    await js.delete_stream(stream)  # every publish to the events stream fails now

    url = f"{base(service)}/u/{sign(settings.unsubscribe_secret, cid, 'vera@example.org')}"
    async with http.post(url, data=ONE_CLICK, allow_redirects=False) as resp:
        assert resp.status == 200
    # Stored with the unsubscribe itself: not lost with the publish that failed.
    row = await db.fetchrow("SELECT kind, msg_id FROM event_outbox")
    assert row["kind"] == "unsubscribe" and row["msg_id"].startswith("unsubscribe:")

    await js.add_stream(info.config)
    assert await service._outbox.flush() == 1  # what the leader's relay does at its next look
    assert await unsubscribe_events(nc, settings) == 1
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0


async def test_forged_or_malformed_token_records_nothing(
    make_service: MakeService,
    http: aiohttp.ClientSession,
    nc: Client,
    settings: Settings,
    db: Any,
) -> None:
    service = await make_service()
    good = sign(settings.unsubscribe_secret, 1, "victim@example.org")
    forged = [
        tampered(good, len(good) - 5),  # one character of the sealed address or its MAC
        tampered(good, 10),  # one character of the nonce
        tampered(good, 0),  # the format's version
        sign("another-secret-of-16-chars", 1, "victim@example.org"),
        good[:-1],
        good + "A",
        "garbage",
        "a.b.c",
        f"{good}.",
        "x" * 5000,
    ]
    for token in forged:
        for method in ("GET", "POST"):
            async with http.request(
                method, f"{base(service)}/u/{token}", data=ONE_CLICK, allow_redirects=False
            ) as resp:
                assert resp.status == 400, (method, token)
                page = await resp.text()
            assert text("unsubscribe_page_invalid", "ru") in page
    async with http.post(
        f"{base(service)}/u/{forged[0]}", data=ONE_CLICK, params={"lang": "en"}
    ) as resp:
        assert text("unsubscribe_page_invalid", "en") in await resp.text()

    assert await recorded(db) == (0, 0)
    assert await unsubscribe_events(nc, settings) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_list_unsubscribe_of_a_sent_message_works_and_next_campaign_skips(
    make_service: MakeService,
    http: aiohttp.ClientSession,
    crm: Crm,
    events: Events,
    sink: SmtpSink,
    db: Any,
) -> None:
    # The links in the messages must point at this very server: its port is
    # chosen first so public_url can name it.
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    await make_service(public_http_port=port, public_url=public)

    first = await crm.campaign(people(3))
    await crm.start(first)
    assert (await events.wait(first, ("sent", "completed_with_errors")))["event"] == "sent"
    [mail] = sink.messages_to("user1@example.org")
    msg = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = str(msg["List-Unsubscribe"]).strip("<>")
    assert link.startswith(f"{public}/u/")
    body = msg.get_body(("plain",))
    assert body is not None and link in body.get_content()  # the visible link too

    # What a mail client does for the one-click header (RFC 8058).
    async with http.post(
        link,
        data="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 200
    assert await db.fetchval("SELECT email FROM unsubscribe") == "user1@example.org"

    # The next campaign to that address (in another case) skips it.
    recipients = people(3)
    recipients[1]["email"] = "User1@Example.org"
    second = await crm.campaign(recipients)
    await crm.start(second)
    done = await events.wait(second, ("sent", "completed_with_errors"))
    assert done["event"] == "sent"
    assert done["counts"] == {"sent": 2, "unsubscribed": 1}
    statuses = dict(
        await db.fetch("SELECT lower(email), status FROM recipient WHERE campaign_id = $1", second)
    )
    assert statuses == {
        "user0@example.org": "sent",
        "user1@example.org": "unsubscribed",
        "user2@example.org": "sent",
    }
    to_second = [
        r
        for m in sink.messages
        if f"<c{second}.r" in m.data.decode(errors="replace")
        for r in m.rcpt_tos
    ]
    assert sorted(r.lower() for r in to_second) == ["user0@example.org", "user2@example.org"]
    assert len(sink.messages_to("user1@example.org")) == 1  # the first campaign's only
