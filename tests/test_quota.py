"""Quota sync (mailer.quota): providers, what a sync records, and the restore that
resumes campaigns deferred with ``quota_exhausted``.

The http provider talks to a real aiohttp server on a free loopback port;
PostgreSQL is the session's embedded one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
import pytest
from aiohttp import web

from mailer.actors.runtime import ActorRef, start_actor
from mailer.clock import FakeClock
from mailer.config import Settings
from mailer.db import connect_pool
from mailer.quota import (
    HttpQuotaProvider,
    LocalQuotaProvider,
    PgQuota,
    QuotaError,
    QuotaProvider,
    QuotaState,
    QuotaSyncActor,
    SyncNow,
    dig,
    lift_deferrals,
    provider_from_settings,
)
from tests.helpers import Crm, Events, people

MONDAY_1315_MSK = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
HOUR = 3600.0


class Stub:
    """The provider's API: answers what the test sets, records what it was sent."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b'{"data": {"emails_available": 1234}}'
        self.hang = False
        self.release = asyncio.Event()
        self.asked = asyncio.Event()  # set once a request has arrived
        self.authorizations: list[str | None] = []
        self.url = ""

    def answer(self, available: int) -> None:
        self.status = 200
        self.body = msgspec.json.encode({"data": {"emails_available": available}})

    async def handle(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        self.asked.set()
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.status, body=self.body, content_type="application/json")


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    s = Stub()
    app = web.Application()
    app.router.add_get("/v1/user", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # a free loopback port
    await site.start()
    host, port = runner.addresses[0][:2]
    s.url = f"http://{host}:{port}/v1/user"
    yield s
    s.release.set()
    await runner.cleanup()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_pool(settings.database_url, size=3)
    yield p
    await p.close()


class Restores:
    """The on_restored callback: counts calls, can fail, lets a test wait for one."""

    def __init__(self, action: Callable[[], Awaitable[None]] | None = None) -> None:
        self.calls = 0
        self.fail_next = False
        self._action = action
        self._changed = asyncio.Condition()

    async def __call__(self) -> None:
        async with self._changed:
            self.calls += 1
            self._changed.notify_all()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("scheduler unreachable")
        if self._action is not None:
            await self._action()

    async def wait_for(self, calls: int) -> None:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: self.calls >= calls)


async def start_sync(
    pool: asyncpg.Pool, provider: QuotaProvider, clock: FakeClock, restores: Restores
) -> ActorRef[Any]:
    actor = QuotaSyncActor(
        ledger=PgQuota(pool),
        provider=provider,
        clock=clock,
        interval_seconds=HOUR,
        on_restored=restores,
    )
    return await start_actor(actor, name="quota-sync")


async def sync(ref: ActorRef[Any]) -> QuotaState:
    state = await ref.ask(SyncNow(), timeout=15)
    assert isinstance(state, QuotaState)
    return state


async def stored(db: asyncpg.Connection) -> QuotaState:
    row = await db.fetchrow("SELECT * FROM quota")
    assert row is not None
    return QuotaState(
        emails_available=row["emails_available"],
        monthly_limit=row["monthly_limit"],
        last_synced_at=row["last_synced_at"],
        sync_error=row["sync_error"],
    )


def http(stub: Stub, timeout: float = 5.0) -> HttpQuotaProvider:
    return HttpQuotaProvider(stub.url, token="tok", field="data.emails_available", timeout=timeout)


# --- the http provider --------------------------------------------------------------------


async def test_http_sync_records_the_number_or_the_error_and_keeps_the_last_good_one(
    stub: Stub, pool, db
) -> None:
    clock = FakeClock(MONDAY_1315_MSK)
    ref = await start_sync(pool, http(stub), clock, Restores())
    try:
        synced = await sync(ref)
        # The provider reports no monthly limit: none is shown (issue 8: it
        # showed 15000, a number the provider never gave).
        assert synced == QuotaState(
            emails_available=1234,
            monthly_limit=None,
            last_synced_at=MONDAY_1315_MSK,
            sync_error=None,
        )
        assert await stored(db) == synced
        assert stub.authorizations[-1] == "Bearer tok"

        failures = [
            (500, b"provider is down", "HTTP 500"),
            (200, b"{not json", "invalid JSON"),
            (200, b'{"data": {}}', "no field 'data.emails_available'"),
            (200, b'{"data": {"emails_available": "lots"}}', "not a number"),
        ]
        for status, body, error in failures:
            clock.advance(60)
            stub.status, stub.body = status, body
            state = await sync(ref)
            # The last good number and its time stay; the error says what went wrong.
            assert state.emails_available == 1234
            assert state.last_synced_at == MONDAY_1315_MSK
            assert state.sync_error is not None and error in state.sync_error, state
            assert await stored(db) == state

        clock.advance(60)
        stub.answer(99)
        state = await sync(ref)
        assert (state.emails_available, state.sync_error) == (99, None)
        assert state.last_synced_at == clock.now()
    finally:
        await ref.stop()


async def test_http_sync_gives_up_after_its_timeout(stub: Stub, pool, db) -> None:
    stub.hang = True
    provider = http(stub, timeout=0.3)
    ref = await start_sync(pool, provider, FakeClock(MONDAY_1315_MSK), Restores())
    try:
        state = await sync(ref)
        assert state.sync_error is not None and "Timeout" in state.sync_error
        assert state.emails_available == 15000  # untouched
    finally:
        await ref.stop()


def test_dotted_paths_and_provider_choice(settings: Settings) -> None:
    assert dig({"data": {"quota": [{"left": 5}]}}, "data.quota.0.left") == 5
    with pytest.raises(QuotaError):
        dig({"data": [1]}, "data.3")
    s = msgspec.structs.replace(
        settings, quota_provider="http", quota_http_url="http://quota.example/api"
    )
    assert provider_from_settings(s).name == "http"
    assert provider_from_settings(settings).name == "local"


# --- the local provider ---------------------------------------------------------------------


async def test_local_sync_counts_this_months_sends_in_the_configured_timezone(pool, db) -> None:
    rows = [
        # (status, is_test, created_at UTC)
        ("sent", False, datetime(2026, 11, 10, 12, 0, tzinfo=UTC)),
        ("sent", False, datetime(2026, 11, 20, 12, 0, tzinfo=UTC)),
        ("in_doubt", False, datetime(2026, 11, 21, 12, 0, tzinfo=UTC)),
        ("sent", True, datetime(2026, 11, 22, 12, 0, tzinfo=UTC)),  # a test email counts
        # Nov 1, 00:30 in Moscow: November there, though October in UTC.
        ("sent", False, datetime(2026, 10, 31, 21, 30, tzinfo=UTC)),
        # Not counted: refused or not sent, or another month in Moscow.
        ("failed", False, datetime(2026, 11, 11, 12, 0, tzinfo=UTC)),
        ("transient", False, datetime(2026, 11, 12, 12, 0, tzinfo=UTC)),
        ("sent", False, datetime(2026, 10, 31, 20, 30, tzinfo=UTC)),
        ("sent", False, datetime(2026, 11, 30, 21, 0, tzinfo=UTC)),  # Dec 1 in Moscow
    ]
    await db.executemany(
        "INSERT INTO send_log (email, status, is_test, error, created_at)"
        " VALUES ('a@example.org', $1, $2, NULL, $3)",
        rows,
    )
    provider = LocalQuotaProvider(monthly_quota=100, tz=ZoneInfo("Europe/Moscow"))
    ref = await start_sync(pool, provider, FakeClock(MONDAY_1315_MSK), Restores())
    try:
        state = await sync(ref)
        assert (state.emails_available, state.monthly_limit, state.sync_error) == (95, 100, None)
    finally:
        await ref.stop()


async def test_a_sync_does_not_hand_back_the_tokens_of_a_batch_in_flight(
    make_service, crm: Crm, events: Events, stub: Stub, pool, db
) -> None:
    # A sync lands between a batch's sends and their record (the recipients
    # are claimed, the governor already took their quota). Whatever the
    # provider says, those sends are not in its count yet: the sync must not
    # give their emails back, or the month could go over its quota.
    quota = PgQuota(pool)
    local = LocalQuotaProvider(monthly_quota=100, tz=ZoneInfo("Europe/Moscow"))
    seen: list[QuotaState] = []

    async def sync_mid_batch(campaign_id: int, batch: int) -> None:
        if batch == 2:
            now = datetime.now(UTC)
            _, state = await quota.record_sync(await local.fetch(now), now)
            seen.append(state)
            stub.answer(60)  # the provider has counted 40 of this month's sends
            _, state = await quota.record_sync(await http(stub).fetch(now), now)
            seen.append(state)

    # Two batches exactly: batch 2 is the last, so no next batch is claimed in
    # advance while it is sent (the campaign asks for the next one during a
    # batch's last waves, and those claims would count as in flight too).
    await make_service(fault=sync_mid_batch, batch_size=5, monthly_quota=100)
    cid = await crm.campaign(people(10))
    await crm.start(cid)
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["counts"] == {"sent": 10}

    # Mid-batch 2: 5 sent and recorded, 5 claimed and sent but not recorded.
    assert seen[0].emails_available == 100 - 5 - 5
    assert seen[1].emails_available == 60 - 5
    # Batch 2 was recorded since: it is in the month's count, not given back.
    assert (await stored(db)).emails_available == 60 - 5


async def test_an_http_sync_subtracts_a_batch_recorded_while_the_provider_answered(
    stub: Stub, pool, db
) -> None:
    # Five recipients are claimed ('sending'): the provider has not counted them.
    # While it answers, the batch is sent and recorded, so when the reading is
    # written they are no longer claimed: they must still be subtracted.
    now = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
    cid = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
        " updated_at) VALUES ('o', 'n', 's', 'b', 'sending', $1, $1) RETURNING id",
        now,
    )
    await db.executemany(
        "INSERT INTO recipient (campaign_id, email, status, claimed_by, created_at, updated_at)"
        " VALUES ($1, $2, 'sending', 'w#1', $3, $3)",
        [(cid, f"r{i}@example.org", now) for i in range(5)],
    )
    stub.answer(60)
    stub.hang = True
    fetch = asyncio.create_task(http(stub).fetch(now))
    await asyncio.wait_for(stub.asked.wait(), 5)  # the provider has the request
    await db.execute(
        "UPDATE recipient SET status = 'sent', claimed_by = NULL WHERE campaign_id = $1", cid
    )
    await db.execute(
        "INSERT INTO send_log (campaign_id, recipient_id, email, status, created_at)"
        " SELECT campaign_id, id, email, 'sent', $2 FROM recipient WHERE campaign_id = $1",
        cid,
        now + timedelta(seconds=1),
    )
    stub.release.set()
    _, state = await PgQuota(pool).record_sync(await fetch, now + timedelta(seconds=2))
    assert state.emails_available == 55


# --- restore: 0 -> more -----------------------------------------------------------------------


async def test_restore_is_signalled_only_when_the_quota_leaves_zero(stub: Stub, pool, db) -> None:
    await db.execute("UPDATE quota SET emails_available = 0")
    restores = Restores()
    stub.answer(500)
    ref = await start_sync(pool, http(stub), FakeClock(MONDAY_1315_MSK), restores)
    try:
        await restores.wait_for(1)  # the sync on start took it from 0 to 500
        stub.answer(400)
        await sync(ref)
        stub.status = 500
        await sync(ref)  # a failure changes nothing
        assert restores.calls == 1
        stub.answer(0)
        await sync(ref)
        stub.answer(10)
        await sync(ref)
        assert restores.calls == 2

        # A callback that fails is tried again after the next good sync.
        stub.answer(0)
        await sync(ref)
        restores.fail_next = True
        stub.answer(5)
        await sync(ref)
        stub.answer(6)
        await sync(ref)
        assert restores.calls == 4
        stub.answer(7)
        await sync(ref)
        assert restores.calls == 4
    finally:
        await ref.stop()


async def test_the_timer_syncs_every_interval_on_the_clock(stub: Stub, pool, db) -> None:
    clock = FakeClock(MONDAY_1315_MSK)
    restores = Restores()
    stub.answer(0)
    ref = await start_sync(pool, http(stub), clock, restores)
    try:
        await sync(ref)  # after the start's sync: the quota is 0, the timer armed
        assert clock.sleepers == 1
        assert clock.next_deadline() == MONDAY_1315_MSK + timedelta(seconds=HOUR)
        requests = len(stub.authorizations)

        stub.answer(300)
        clock.advance(HOUR)
        await restores.wait_for(1)
        assert len(stub.authorizations) == requests + 1
        state = await stored(db)
        assert (state.emails_available, state.last_synced_at) == (300, clock.now())
    finally:
        await ref.stop()


async def test_lift_deferrals_ends_only_that_reasons_future_waits(pool, db) -> None:
    now = MONDAY_1315_MSK
    later, earlier = now + timedelta(hours=1), now - timedelta(minutes=1)
    entries = [
        ("quota_exhausted", later, None),  # lifted
        ("quota_exhausted", later, None),  # lifted
        ("quota_exhausted", earlier, None),  # already runnable
        ("quota_exhausted", later, now),  # finished
        ("rate_per_hour", later, None),  # another reason
    ]
    ids = []
    for reason, until, completed in entries:
        cid = await db.fetchval(
            "INSERT INTO campaign (owner_id, name, subject, body_text, created_at, updated_at)"
            " VALUES ('anna', 'c', 's', 'b', $1, $1) RETURNING id",
            now,
        )
        await db.execute(
            "INSERT INTO queue_entry (campaign_id, queued_at, defer_reason, deferred_until,"
            " completed_at) VALUES ($1, $2, $3, $4, $5)",
            cid,
            now,
            reason,
            until,
            completed,
        )
        ids.append(cid)

    assert sorted(await lift_deferrals(pool, "quota_exhausted", now)) == ids[:2]
    rows = await db.fetch(
        "SELECT campaign_id, defer_reason, deferred_until FROM queue_entry ORDER BY campaign_id"
    )
    assert [(r["defer_reason"], r["deferred_until"]) for r in rows] == [
        ("quota_exhausted", now),
        ("quota_exhausted", now),
        ("quota_exhausted", earlier),
        ("quota_exhausted", later),
        ("rate_per_hour", later),
    ]
    assert await lift_deferrals(pool, "quota_exhausted", now) == []


async def test_a_campaign_waiting_for_quota_resumes_when_a_sync_restores_it(
    make_service, crm: Crm, events: Events, sink, db, stub: Stub
) -> None:
    """MISSION: "resume by itself when a sync restores it" — nobody acts after the start.

    The service's own wiring: its quota-sync actor reads the provider (an HTTP
    stub) at start and every hour of the injected clock; a sync that takes the
    quota from 0 lifts the deferral and wakes the scheduler.
    """
    stub.answer(0)
    clock = FakeClock(MONDAY_1315_MSK)
    await make_service(
        clock=clock,
        quota_provider="http",
        quota_http_url=stub.url,
        quota_http_field="data.emails_available",
        quota_sync_interval_seconds=HOUR,
    )
    cid = await crm.campaign(people(6))
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "quota_exhausted"
    assert len(sink.messages) == 0
    view = await crm.get(cid)
    assert view["queue"]["defer_reason"] == "quota_exhausted"
    manager = await crm.call("manager.status", {})
    assert manager["reason_code"] == "quota_exhausted"
    assert manager["reason"].startswith("Глобальная квота исчерпана.")

    # The provider's quota is topped up; the hourly sync sees it and resumes
    # the campaign. Until then no time can be named (issue 8): none is given.
    assert deferred["deferred_until"] is None
    assert manager["next_run_at"] is None
    stub.answer(1000)
    clock.advance(HOUR)
    done = await events.wait(cid, ("sent",))
    assert done["counts"] == {"sent": 6}
    assert len(sink.messages) == 6
    assert await db.fetchval("SELECT emails_available FROM quota") == 1000 - 6
