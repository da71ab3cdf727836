"""Fixtures: one embedded stack per test session, isolation per test.

Each test gets a fresh database cloned from a migrated template, its own NATS
subject prefix and its own Redis key prefix, so tests never see each other's
state. The SMTP sink is shared and emptied before each test.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
import redis.asyncio as redis
from nats.aio.client import Client

from mailer.client import ClientOptions, MailerClient
from mailer.config import Settings, load_settings
from mailer.db import migrate
from mailer.devstack import EmbeddedStack, StackOverrides, create_database, drop_database
from mailer.service import Service
from mailer.sink import SmtpSink
from tests.helpers import Crm, Events

TEMPLATE_DB = "mailer_template"
_ids = itertools.count(1)


@pytest.fixture(scope="session")
async def stack() -> AsyncIterator[EmbeddedStack]:
    var = Path(os.environ.get("MAILER_TEST_VAR", tempfile.mkdtemp(prefix="mailer-test-")))
    # Tests always run on their own embedded servers, whatever MAILER_* says.
    s = EmbeddedStack(var, StackOverrides(), fresh=True, write_outbox=False)
    await s.start()
    admin = s.endpoints.database_url
    await drop_database(admin, TEMPLATE_DB)
    await migrate(await create_database(admin, TEMPLATE_DB))
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def database_url(stack: EmbeddedStack) -> AsyncIterator[str]:
    name = f"t{os.getpid()}_{next(_ids)}"
    admin = stack.endpoints.database_url
    dsn = await create_database(admin, name, template=TEMPLATE_DB)
    yield dsn
    await drop_database(admin, name)


@pytest.fixture
def settings(stack: EmbeddedStack, database_url: str) -> Settings:
    n = next(_ids)
    e = stack.endpoints
    return load_settings(
        {},
        dotenv=None,
        nats_url=e.nats_url,
        database_url=database_url,
        redis_url=e.redis_url,
        smtp_host=e.smtp_host,
        smtp_port=e.smtp_port,
        subject_prefix=f"t{n}.mailer",
        redis_key_prefix=f"t{n}:mailer:",
        http_port=0,
        public_http_port=0,
        instance_id=f"test-{n}",
        shutdown_timeout_seconds=10.0,
        # Tests run at any hour of the real clock: open all day unless a test
        # places itself in time with a FakeClock and its own hours.
        working_hours_start="00:00",
        working_hours_end="24:00",
        leader_ttl_seconds=3.0,
        # Every test has its own events stream; JetStream reserves each one's cap
        # on disk, so a session of hundreds must keep them small.
        events_max_bytes=8 * 1024 * 1024,
    )


@pytest.fixture
def sink(stack: EmbeddedStack) -> SmtpSink:
    s = stack.sink
    assert s is not None
    s.reset()
    return s


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def redis_client(stack: EmbeddedStack) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(stack.endpoints.redis_url)
    yield client
    await client.aclose()


MakeService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(settings: Settings) -> AsyncIterator[MakeService]:
    """Starts services on this test's settings (plus overrides); stops them after."""
    started: list[Service] = []

    async def make(
        *,
        clock: Any = None,
        fault: Any = None,
        stage_fault: Any = None,
        actor_fault: Any = None,
        restart_policy: Any = None,
        **overrides: Any,
    ) -> Service:
        fields = {f: getattr(settings, f) for f in Settings.__struct_fields__}
        fields.update(overrides)
        if "instance_id" not in overrides:
            fields["instance_id"] = f"{settings.instance_id}-{len(started)}"
        service = Service(
            Settings(**fields),
            clock=clock,
            fault=fault,
            stage_fault=stage_fault,
            actor_fault=actor_fault,
            restart_policy=restart_policy,
        )
        started.append(service)
        await service.start()
        return service

    yield make
    for service in reversed(started):
        await service.stop()


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    yield client
    await client.close()


@pytest.fixture
def crm(nc: Client, settings: Settings) -> Crm:
    return Crm(nc, settings.subject_prefix)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[MailerClient]:
    """mailer.client on this test's prefix, acting as manager-1."""
    options = ClientOptions(url=settings.nats_url, prefix=settings.subject_prefix)
    c = await MailerClient.connect(options, user="manager-1")
    yield c
    await c.close()


@pytest.fixture
async def events(nc: Client, settings: Settings) -> Events:
    e = Events()
    await e.subscribe(nc, settings.subject_prefix)
    await nc.flush()
    return e
