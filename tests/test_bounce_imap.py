"""The IMAP poller of a bounce mailbox (issue 12), against a real IMAP server on loopback:
pymap (PyPI) with its in-memory backend, which speaks IMAP4rev1 with IDLE. Only the
service's clock is fake: the poller's fallback timer never fires, so whatever it reads
it reads because the server's IDLE told it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aioimaplib import IMAP4
from prometheus_client import REGISTRY

from mailer.clock import FakeClock
from mailer.config import ConfigError, Settings, load_settings
from mailer.devstack import free_port
from tests.helpers import Crm, Events
from tests.test_bounces import DOMAIN, arf, dsn, send_campaign, statuses

USER, PASSWORD = "bounces", "imap-secret-123"
MONDAY_1015_UTC = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


@dataclass
class Mailbox:
    """The test's own session with the mailbox, kept open: pymap's dict backend can miss
    an IDLE announcement of a change made just after another session logs in, which a
    session per append would hit now and then."""

    port: int
    session: IMAP4

    async def append(self, *messages: bytes) -> None:
        for m in messages:
            assert (await self.session.append(m, mailbox="INBOX")).result == "OK"

    async def flags(self) -> list[str]:
        """Each message's flags, in order (FETCH FLAGS)."""
        r = await self.session.fetch("1:*", "(FLAGS)")
        return [bytes(line).decode() for line in r.lines[:-1] if b"FETCH" in bytes(line)]

    async def count(self) -> int:
        r = await self.session.select("INBOX")
        return next(int(bytes(x).split()[0]) for x in r.lines if b"EXISTS" in bytes(x))


async def _session(port: int) -> IMAP4:
    c = IMAP4("127.0.0.1", port, timeout=5)
    await c.wait_hello_from_server()
    assert (await c.login(USER, PASSWORD)).result == "OK"
    assert (await c.select("INBOX")).result == "OK"
    return c


@pytest.fixture
async def mailbox(tmp_path: Path) -> AsyncIterator[Mailbox]:
    """pymap on a free loopback port, its demo messages removed: an empty INBOX."""
    port = free_port()
    log = (tmp_path / "pymap.log").open("wb")
    pymap = Path(sys.executable).parent / "pymap"
    argv = [str(pymap), "--host", "127.0.0.1", "--port", str(port), "--no-tls", "dict"]
    argv += ["--demo-data", "--demo-user", USER, "--demo-password", PASSWORD]
    proc = subprocess.Popen(  # noqa: ASYNC220 - starts a server, does not wait on it
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    assert proc.poll() is None, (tmp_path / "pymap.log").read_text()
                    await asyncio.sleep(0.05)
        box = Mailbox(port, await _session(port))
        await box.session.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")
        await box.session.expunge()
        assert await box.count() == 0
        yield box
        await box.session.logout()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _imap(box: Mailbox, **more: Any) -> dict[str, Any]:
    return {
        "bounce_domain": DOMAIN,
        "bounce_smtp_port": 0,
        "bounce_imap_host": "127.0.0.1",
        "bounce_imap_port": box.port,
        "bounce_imap_security": "none",
        "bounce_imap_username": USER,
        "bounce_imap_password": PASSWORD,
        **more,
    }


def _reports(kind: str) -> float:
    return (
        REGISTRY.get_sample_value("mailer_bounce_reports_total", {"kind": kind, "source": "imap"})
        or 0.0
    )


async def _until(service: Any, check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    """Until ``check`` holds, looking again each time the poller finished a look."""
    mb = service.bounce_mailbox
    async with asyncio.timeout(timeout):
        while True:
            # Counted before the check: a look that ends meanwhile is not waited for.
            seen = mb.looks
            if await check():
                return
            async with mb.looked:
                await mb.looked.wait_for(lambda seen=seen: mb.looks > seen)


async def idling(service: Any) -> None:
    """Until the poller idles. pymap registers an IDLE's listener in a task of its own
    after it said "+ Idling": a message appended in between would be announced only with
    the next change, so the tests give it a moment."""
    await asyncio.wait_for(service.bounce_mailbox.idling.wait(), 15)
    await asyncio.sleep(0.3)


async def test_reports_in_the_mailbox_suppress_through_the_same_path_and_are_marked_seen(
    make_service, crm: Crm, events: Events, sink, db, mailbox: Mailbox
) -> None:
    service = await make_service(clock=FakeClock(MONDAY_1015_UTC), **_imap(mailbox))
    await asyncio.wait_for(service.leadership.wait(), 10)
    assert service.bounce_mailbox is not None and service.bounce_mailbox.running
    recipients = [{"email": f"user{i}@example.org"} for i in range(3)]
    cid = await send_campaign(crm, events, recipients)
    senders = {m.rcpt_tos[0]: m.mail_from for m in sink.messages}
    a, b, c = (r["email"] for r in recipients)
    hard, complaint, ignored = _reports("hard"), _reports("complaint"), _reports("ignored")
    unverified = _reports("unverified")

    await idling(service)
    await mailbox.append(
        # What a provider's mailbox holds: the DSN with the envelope recipient it was
        # delivered to (our VERP address) in Delivered-To.
        f"Delivered-To: {senders[a]}\r\n".encode() + dsn(rcpt=a),
        # A complaint naming b's message through its Return-Path inside.
        arf(senders[b]),
        # A forged bounce address: changes nothing.
        f"Delivered-To: bounce+{'a' * 31}@{DOMAIN}\r\n".encode() + dsn(rcpt=c),
        # Not a report at all.
        b"From: someone@example.net\r\nSubject: hello\r\n\r\nnot a bounce\r\n",
    )

    async def applied() -> bool:
        got = await statuses(db, cid)
        return got[a][0] == "bounced" and got[b][0] == "complained"

    await _until(service, applied)

    async def all_seen() -> bool:
        flags = await mailbox.flags()
        return len(flags) == 4 and all("\\Seen" in f for f in flags)

    await _until(service, all_seen)
    got = await statuses(db, cid)
    assert got[c] == ("sent", None)
    rows = await db.fetch("SELECT email, reason, source FROM unsubscribe ORDER BY email")
    assert [(r["email"], r["reason"], r["source"]) for r in rows] == [
        (a, "hard_bounce", "dsn"),
        (b, "complaint", "arf"),
    ]
    assert _reports("hard") == hard + 1
    assert _reports("complaint") == complaint + 1
    assert _reports("unverified") == unverified + 1
    assert _reports("ignored") == ignored + 1

    # A later report: the same IDLE session hears it (the fake clock never moves).
    await idling(service)
    await mailbox.append(f"Delivered-To: {senders[c]}\r\n".encode() + dsn(rcpt=c))

    async def c_bounced() -> bool:
        return (await statuses(db, cid))[c][0] == "bounced"

    await _until(service, c_bounced)


async def test_a_database_failure_leaves_the_message_unseen_and_delete_mode_expunges(
    make_service, crm: Crm, events: Events, sink, db, mailbox: Mailbox
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    service = await make_service(clock=clock, **_imap(mailbox, bounce_imap_delete=True))
    await asyncio.wait_for(service.leadership.wait(), 10)
    cid = await send_campaign(crm, events, [{"email": "anna@example.org"}])
    sender = sink.messages[0].mail_from

    # The database cannot record the report (its table is away): the message stays
    # unseen, the session ends, and the poller waits its pause (1 s of its clock).
    mb = service.bounce_mailbox
    assert mb is not None
    await db.execute("ALTER TABLE unsubscribe RENAME TO unsubscribe_away")
    try:
        failures = mb.failures
        await idling(service)
        await mailbox.append(f"Delivered-To: {sender}\r\n".encode() + dsn(rcpt="anna@example.org"))
        async with asyncio.timeout(15), mb.looked:
            await mb.looked.wait_for(lambda: mb.failures > failures)
    finally:
        await db.execute("ALTER TABLE unsubscribe_away RENAME TO unsubscribe")
    assert await mailbox.count() == 1
    (flags,) = await mailbox.flags()
    assert "\\Seen" not in flags and "\\Deleted" not in flags
    assert (await statuses(db, cid))["anna@example.org"][0] == "sent"

    # The database is back; the pause ends, a new session reads the message again:
    # recorded, then deleted (expunged).
    clock.advance(timedelta(seconds=2))

    async def deleted() -> bool:
        return await mailbox.count() == 0

    await _until(service, deleted)
    assert (await statuses(db, cid))["anna@example.org"][0] == "bounced"


def test_the_imap_settings_are_validated_at_start() -> None:
    base = {
        "MAILER_BOUNCE_IMAP_HOST": "imap.example.com",
        "MAILER_BOUNCE_IMAP_USERNAME": "u",
        "MAILER_BOUNCE_IMAP_PASSWORD": "p",
    }
    with pytest.raises(ConfigError, match="MAILER_BOUNCE_IMAP_HOST needs MAILER_BOUNCE_DOMAIN"):
        load_settings(base, dotenv=None)
    with_domain = {**base, "MAILER_BOUNCE_DOMAIN": DOMAIN}
    s = load_settings(with_domain, dotenv=None)
    assert (s.bounce_imap_security, s.bounce_imap_mailbox, s.bounce_imap_delete) == (
        "tls",
        "INBOX",
        False,
    )
    for missing in ("MAILER_BOUNCE_IMAP_USERNAME", "MAILER_BOUNCE_IMAP_PASSWORD"):
        env = {k: v for k, v in with_domain.items() if k != missing}
        with pytest.raises(ConfigError, match=missing):
            load_settings(env, dotenv=None)
    with pytest.raises(ConfigError, match="MAILER_BOUNCE_IMAP_SECURITY"):
        load_settings({**with_domain, "MAILER_BOUNCE_IMAP_SECURITY": "starttls"}, dotenv=None)
    assert isinstance(s, Settings)
    # Production: the mailbox's password never in clear text over the network.
    production = {
        "MAILER_ENV": "production",
        "MAILER_NATS_URL": "nats://n:4222",
        "MAILER_DATABASE_URL": "postgresql://u@db/mailer",
        "MAILER_REDIS_URL": "redis://r:6379",
        "MAILER_LOG_HASH_SALT": "x" * 20,
        "MAILER_UNSUBSCRIBE_SECRET": "y" * 20,
        "MAILER_PUBLIC_URL": "https://mail.example.com",
        "MAILER_SMTP_HOST": "smtp.example.com",
        "MAILER_SMTP_SECURITY": "starttls",
        **with_domain,
    }
    load_settings(production, dotenv=None)
    with pytest.raises(ConfigError, match="MAILER_BOUNCE_IMAP_SECURITY=none"):
        load_settings({**production, "MAILER_BOUNCE_IMAP_SECURITY": "none"}, dotenv=None)
    loopback = {"MAILER_BOUNCE_IMAP_SECURITY": "none", "MAILER_BOUNCE_IMAP_HOST": "127.0.0.1"}
    load_settings({**production, **loopback}, dotenv=None)
