"""SMTP connection failures: classified by cause on real loopback servers, counted, logged
once per cause per 30 s with the number left out, and shown as the smtp dependency state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from prometheus_client import REGISTRY

from mailer.clock import FakeClock
from mailer.devstack import free_port
from mailer.logs import LogLimiter
from mailer.sink import SmtpSink
from mailer.smtphealth import SmtpHealth
from mailer.transport import SmtpTransport
from tests.conftest import MakeService
from tests.helpers import Crm, Events

Serve = Callable[[Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]], int]


def _errors(cause: str, account: str = "default") -> float:
    value = REGISTRY.get_sample_value(
        "mailer_smtp_connection_errors_total", {"account": account, "cause": cause}
    )
    assert value is not None, f"no series for cause {cause} of account {account}"
    return value


def _smtp_up() -> float | None:
    return REGISTRY.get_sample_value("mailer_dependency_up", {"dependency": "smtp"})


@pytest.fixture
async def tcp_server() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Starts a loopback TCP server with a given connection handler; returns its port."""
    servers: list[asyncio.Server] = []

    async def start(
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # never greets


async def _refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"554 5.3.2 not now\r\n")
    await writer.drain()
    await reader.read()


async def _send_once(port: int, health: SmtpHealth, **kw: object) -> str | None:
    transport = SmtpTransport(
        "127.0.0.1",
        port,
        security=kw.pop("security", "none"),  # type: ignore[arg-type]
        username=kw.pop("username", None),  # type: ignore[arg-type]
        password=kw.pop("password", None),  # type: ignore[arg-type]
        timeout=0.5,
        connections=1,
        local_hostname="test.local",
        tls_verify=False,
        health=health,
    )
    try:
        result = await transport.send(
            "crm@example.com", "a@example.org", b"Subject: x\r\n\r\nhi\r\n"
        )
    finally:
        await transport.close(grace=0.1)
    return result.error


async def test_each_cause_is_recognised_and_counted(
    tcp_server: Callable[..., Awaitable[int]], sink: SmtpSink
) -> None:
    health = SmtpHealth("127.0.0.1", 0, account="test")
    cases = {
        "connect": (free_port(), {}),  # nothing listens
        "timeout": (await tcp_server(_silent), {}),
        "protocol": (await tcp_server(_refusing), {}),
        "tls": (sink.port, {"security": "tls"}),  # implicit TLS to a plaintext server
        "auth": (sink.port, {"username": "u", "password": "p"}),  # the sink offers no AUTH
    }
    for cause, (port, kw) in cases.items():
        before = {c: _errors(c, "test") for c in cases}
        error = await _send_once(port, health, **kw)
        assert error is not None, cause
        moved = {c: _errors(c, "test") - before[c] for c in cases}
        assert moved == {c: (1 if c == cause else 0) for c in cases}, (cause, error)
        assert not health.up and _smtp_up() == 0

    assert await _send_once(sink.port, health) is None
    assert health.up and _smtp_up() == 1


def test_one_line_per_cause_per_interval_with_the_count_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 10, 0, tzinfo=UTC))
    limiter = LogLimiter(logging.getLogger("mailer.test.limited"), every=30.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="mailer.test.limited"):
        for _ in range(3):
            limiter.log(logging.WARNING, "connect", "down", extra={"cause": "connect"})
        limiter.log(logging.WARNING, "auth", "down", extra={"cause": "auth"})
        clock.advance(timedelta(seconds=29))
        limiter.log(logging.WARNING, "connect", "down", extra={"cause": "connect"})
        clock.advance(timedelta(seconds=1))
        limiter.log(logging.WARNING, "connect", "down", extra={"cause": "connect"})
    written = [(r.cause, r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    assert written == [("connect", 0), ("auth", 0), ("connect", 3)]


async def test_a_dead_smtp_server_is_logged_counted_and_reported(
    make_service: MakeService, crm: Crm, events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    service = await make_service(smtp_port=free_port(), smtp_host="127.0.0.1")
    before = _errors("connect")
    with caplog.at_level(logging.WARNING, logger="mailer.smtp"):
        cid = await crm.campaign([{"email": f"r{i}@example.org"} for i in range(5)])
        await crm.start(cid)
        deferred = await events.wait(cid, ("deferred",), timeout=20)
    assert deferred["defer_reason"] == "transient_error"
    assert _errors("connect") - before == 5
    lines = [r for r in caplog.records if r.name == "mailer.smtp"]
    assert len(lines) == 1  # five failures, one line within 30 s
    assert lines[0].levelno == logging.WARNING and lines[0].cause == "connect"  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{service.http_port}"
    async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as resp:
        assert resp.status == 200  # SMTP does not decide readiness
        assert (await resp.json())["reported"]["smtp"] is False
