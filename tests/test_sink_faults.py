"""The SMTP sink's behaviours for fault injection: by address (reject…/temp…), a 421 outage,
a black hole that never answers and accepts nothing, and healing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from mailer.sink import OUTAGE_REPLY, ByLocalPart, SmtpSink

pytestmark = pytest.mark.timeout(30)

MESSAGE = "From: a@example.com\r\nTo: b@example.com\r\nSubject: x\r\n\r\nhi\r\n"


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    async with SmtpSink(None) as s:
        yield s


async def _send(sink: SmtpSink, rcpt: str, timeout: float = 5.0) -> None:
    await aiosmtplib.send(
        MESSAGE,
        sender="a@example.com",
        recipients=[rcpt],
        hostname=sink.host,
        port=sink.port,
        timeout=timeout,
    )


async def _refused(sink: SmtpSink, rcpt: str) -> int:
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await _send(sink, rcpt)
    (only,) = refused.value.recipients
    return only.code


async def test_by_local_part(sink: SmtpSink) -> None:
    sink.hook = ByLocalPart()
    assert await _refused(sink, "reject-1@example.org") == 550
    for _ in range(2):  # temp2: refused twice, then accepted
        assert await _refused(sink, "temp2-1@example.org") == 451
    await _send(sink, "temp2-1@example.org")
    for _ in range(5):  # temp: for ever
        assert await _refused(sink, "temp-1@example.org") == 451
    await _send(sink, "u-1@example.org")
    assert [m.rcpt_tos for m in sink.messages] == [("temp2-1@example.org",), ("u-1@example.org",)]


async def test_421_outage_until_healed(sink: SmtpSink) -> None:
    sink.outage("421")
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await _send(sink, "u-1@example.org")
    assert refused.value.code == 421 and OUTAGE_REPLY.endswith(refused.value.message)
    sink.heal()
    await _send(sink, "u-1@example.org")
    assert sink.count == 1


async def test_black_hole_never_answers_and_accepts_nothing(sink: SmtpSink) -> None:
    sink.outage("blackhole")
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await _send(sink, "u-1@example.org", timeout=0.5)
    # A session caught in the hole when it ends is closed, never answered 250.
    held = asyncio.ensure_future(_send(sink, "u-2@example.org", timeout=5))
    await asyncio.sleep(0.2)
    sink.heal()
    with pytest.raises(aiosmtplib.SMTPException):
        await held
    assert sink.count == 0
    await _send(sink, "u-3@example.org")
    assert [m.rcpt_tos for m in sink.messages] == [("u-3@example.org",)]
