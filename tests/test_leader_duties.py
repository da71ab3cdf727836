"""What the leader's authority means: fencing, reconcile, the stuck report,
and the SMTP account's circuit breaker."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from mailer import metrics
from mailer.breaker import BreakerState, CircuitBreaker
from mailer.clock import FakeClock
from mailer.store import PgStore
from tests.helpers import Crm, Events, people

NOW = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


@pytest.fixture
async def store(database_url: str):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield PgStore(pool)
    await pool.close()


async def _queued_campaign(db, recipients: int = 3, status: str = "ready") -> int:
    cid = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at, "
        "updated_at) VALUES ('m', 'n', 's', 'b', $1, $2, $2) RETURNING id",
        status,
        NOW,
    )
    for i in range(recipients):
        await db.execute(
            "INSERT INTO recipient (campaign_id, email, created_at, updated_at) "
            "VALUES ($1, $2, $3, $3)",
            cid,
            f"r{i}@example.org",
            NOW,
        )
    await db.execute("INSERT INTO queue_entry (campaign_id, queued_at) VALUES ($1, $2)", cid, NOW)
    return int(cid)


async def test_a_deposed_leaders_dispatch_acquires_nothing(store: PgStore, db) -> None:
    cid = await _queued_campaign(db)
    old = await store.take_fence("old", NOW)
    new = await store.take_fence("new", NOW)
    assert new == old + 1  # each winner takes the next epoch: it never goes back
    assert await store.fence() == (new, "new")
    until = NOW + timedelta(seconds=30)
    assert await store.acquire(cid, "p1", until=until, now=NOW, fence=old) is None
    lease = await store.acquire(cid, "p2", until=until, now=NOW, fence=new)
    assert lease is not None and lease.owner == "p2"
    # Held: nobody else acquires it until the lease runs out.
    assert await store.acquire(cid, "p3", until=until, now=NOW, fence=new) is None
    later = until + timedelta(seconds=1)
    taken = await store.acquire(
        cid, "p3", until=later + timedelta(seconds=30), now=later, fence=new
    )
    assert taken is not None and taken.epoch > lease.epoch
    # The old holder's writes carry its epoch: they change nothing now.
    assert not await store.renew(lease, later + timedelta(minutes=1))


async def test_reconcile_finishes_what_nobody_would_and_reports_stuck_campaigns(
    make_service, db, caplog, events: Events
) -> None:
    # A campaign whose every recipient was recorded but whose final status
    # was never written (its owner died right there).
    done = await _queued_campaign(db, recipients=2, status="sending")
    await db.execute("UPDATE recipient SET status = 'sent' WHERE campaign_id = $1", done)
    # A campaign an owner has held for 40 minutes without letting go.
    stuck = await _queued_campaign(db, recipients=1, status="sending")
    await db.execute(
        "UPDATE queue_entry SET lease_owner = 'elsewhere', lease_until = $2, leased_at = $3, "
        "started_at = $3 WHERE campaign_id = $1",
        stuck,
        NOW + timedelta(hours=1),
        NOW - timedelta(minutes=40),
    )
    clock = FakeClock(NOW)
    with caplog.at_level(logging.ERROR, logger="mailer.scheduler"):
        await make_service(clock=clock)
        final = await events.wait(done, ("sent", "completed_with_errors"))
        assert final["counts"] == {"sent": 2}
        assert await db.fetchval("SELECT status FROM campaign WHERE id = $1", done) == "sent"
        by = await db.fetchval(
            "SELECT details->>'by' FROM audit_log WHERE campaign_id = $1 "
            "AND action = 'campaign.status'",
            done,
        )
        assert by == "reconcile"
    assert (
        await db.fetchval("SELECT completed_at FROM queue_entry WHERE campaign_id = $1", done)
        == NOW
    )
    stuck_logs = [r for r in caplog.records if r.getMessage() == "campaign processing for too long"]
    assert [r.campaign_id for r in stuck_logs] == [stuck]  # type: ignore[attr-defined]
    assert metrics.PROCESSING_OLDEST_SECONDS._value.get() == pytest.approx(40 * 60)


def test_the_accounts_breaker_opens_half_opens_and_closes() -> None:
    b = CircuitBreaker("acct", threshold=3, cooldown=timedelta(minutes=5))
    gauge = metrics.CIRCUIT_BREAKER_STATE.labels(account="acct")
    assert b.allow(NOW) and b.state is BreakerState.CLOSED
    b.record(successes=0, transient_failures=2, now=NOW)
    assert b.state is BreakerState.CLOSED
    b.record(successes=1, transient_failures=0, now=NOW)  # a success resets the count
    b.record(successes=0, transient_failures=2, now=NOW)
    assert b.state is BreakerState.CLOSED
    b.record(successes=0, transient_failures=1, now=NOW)
    assert b.state is BreakerState.OPEN and gauge._value.get() == 2
    assert not b.allow(NOW + timedelta(minutes=4))
    assert b.allow(NOW + timedelta(minutes=5))  # the probe
    assert b.state is BreakerState.HALF_OPEN and gauge._value.get() == 1
    b.record(successes=0, transient_failures=1, now=NOW + timedelta(minutes=5))
    assert b.state is BreakerState.OPEN  # a failed probe opens it again
    assert b.allow(NOW + timedelta(minutes=10))
    b.record(successes=1, transient_failures=0, now=NOW + timedelta(minutes=10))
    assert b.state is BreakerState.CLOSED and gauge._value.get() == 0


def test_after_the_cooldown_one_campaign_probes_and_the_others_wait() -> None:
    b = CircuitBreaker("acct", threshold=1, cooldown=timedelta(minutes=5))
    b.record(successes=0, transient_failures=1, now=NOW)
    assert b.state is BreakerState.OPEN
    assert b.blocked_until(NOW + timedelta(minutes=1)) == NOW + timedelta(minutes=5)

    # The cooldown is over and three campaigns ask: one may send the probe.
    later = NOW + timedelta(minutes=5)
    waits = [b.blocked_until(later) for _ in range(3)]
    assert waits == [None, later + timedelta(seconds=30), later + timedelta(seconds=30)]
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow(later)  # the probe goes out...
    assert not b.allow(later)  # ...and nothing else while it is out
    assert b.blocked_until(later) == later + timedelta(seconds=30)
    b.record(successes=0, transient_failures=1, now=later)
    assert b.state is BreakerState.OPEN  # the probe failed: another cooldown

    # A promised probe that never goes out (its campaign got no tokens) passes on.
    again = later + timedelta(minutes=5)
    assert b.blocked_until(again) is None
    assert b.blocked_until(again + timedelta(seconds=10)) is not None
    assert b.blocked_until(again + timedelta(seconds=30)) is None
    assert b.allow(again + timedelta(seconds=31))
    b.record(successes=1, transient_failures=0, now=again + timedelta(seconds=31))
    assert b.state is BreakerState.CLOSED
    assert b.blocked_until(again + timedelta(seconds=31)) is None and b.allow(again)


async def test_an_open_breaker_sends_nothing(sink, stack) -> None:
    from mailer.actors import start_actor
    from mailer.actors.campaign import Mail
    from mailer.actors.sender import ActorMailer, SenderActor
    from mailer.transport import SmtpTransport

    clock = FakeClock(NOW)
    breaker = CircuitBreaker("acct", threshold=1, cooldown=timedelta(minutes=5))
    transport = SmtpTransport(
        stack.endpoints.smtp_host,
        stack.endpoints.smtp_port,
        security="none",
        username=None,
        password=None,
        timeout=5.0,
        connections=1,
    )
    ref = await start_actor(SenderActor(transport, breaker=breaker, clock=clock), name="s")
    try:
        sink.fail("a@example.org", "421 4.3.2 Shutting down", times=1)
        # Through the campaigns' own client of the sender (a closed breaker's batch is
        # served by a task of the sender's, which ActorMailer awaits).
        mailer = ActorMailer(ref, mail_from="crm@example.com", timeout=10)
        batch = [Mail("a@example.org", b"Subject: x\r\n\r\nx")]
        first = await mailer.send_all(batch)
        assert first[0].outcome == "transient" and not first[0].short_circuited
        assert breaker.state is BreakerState.OPEN
        second = await mailer.send_all(batch)
        assert second[0].short_circuited  # not attempted: the server is left alone
        assert sink.count == 0 and len(sink.rejections) == 1
        clock.advance(timedelta(minutes=5))
        third = await mailer.send_all(batch)  # the half-open probe goes out
        assert third[0].outcome == "sent" and breaker.state is BreakerState.CLOSED
        assert sink.count == 1
    finally:
        await ref.stop()


async def _finished_by_reconcile(db, campaign_id: int, recipients: dict[str, str]) -> None:
    """Turns a fresh queued campaign into the anomaly reconcile exists for: nothing
    left to send, not final, and deferred (so no wake or timer of the scheduler
    dispatches it and lets its own actor finish it: only reconcile can)."""
    for email, status in recipients.items():
        await db.execute(
            "INSERT INTO recipient (campaign_id, email, status, error, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $5)",
            campaign_id,
            email,
            status,
            "550 5.1.1 No such user" if status == "failed" else None,
            NOW,
        )
    await db.execute(
        "UPDATE queue_entry SET defer_reason = 'rate_per_hour', deferred_until = $2 "
        "WHERE campaign_id = $1",
        campaign_id,
        NOW + timedelta(hours=2),
    )


async def test_the_leader_reconciles_again_every_five_minutes(
    make_service, db, crm: Crm, events: Events, sink, caplog
) -> None:
    # Present at takeover: repaired at once (and tells us the takeover pass ran).
    before = await _queued_campaign(db, recipients=0, status="sending")
    await _finished_by_reconcile(db, before, {"a@example.org": "sent"})
    clock = FakeClock(NOW)
    with caplog.at_level(logging.INFO, logger="mailer.scheduler"):
        await make_service(clock=clock, reconcile_interval_seconds=300.0)
        assert (await events.wait(before, ("sent", "completed_with_errors")))["event"] == "sent"

        # Created after the takeover pass: one recipient sent, one failed.
        after = await _queued_campaign(db, recipients=0, status="sending")
        await _finished_by_reconcile(
            db, after, {"b@example.org": "sent", "c@example.org": "failed"}
        )
        # 4:59 later the scheduler still works (a campaign started now is sent)
        # but has not reconciled: the anomaly is still there.
        clock.advance(timedelta(seconds=299))
        other = await crm.campaign(people(1))
        await crm.start(other)
        assert (await events.wait(other, ("sent", "completed_with_errors")))["event"] == "sent"
        assert await db.fetchval("SELECT status FROM campaign WHERE id = $1", after) == "sending"
        assert not events.of(after, "completed_with_errors") and not events.of(after, "sent")

        # The 5-minute mark: the periodic pass finishes it, honestly.
        clock.advance(timedelta(seconds=1))
        final = await events.wait(after, ("sent", "completed_with_errors"))
        assert final["event"] == "completed_with_errors"
        assert final["counts"] == {"sent": 1, "failed": 1}
        row = await db.fetchrow(
            "SELECT c.status, q.completed_at FROM campaign c JOIN queue_entry q "
            "ON q.campaign_id = c.id WHERE c.id = $1",
            after,
        )
        assert (row["status"], row["completed_at"]) == (
            "completed_with_errors",
            NOW + timedelta(minutes=5),
        )

        # And again five minutes after that, not only once.
        third = await _queued_campaign(db, recipients=0, status="sending")
        await _finished_by_reconcile(db, third, {"d@example.org": "sent"})
        clock.advance(timedelta(minutes=5))
        assert (await events.wait(third, ("sent", "completed_with_errors")))["event"] == "sent"

    # Logged like the campaign actor logs a finish: with finished_with_errors.
    finished = {
        r.campaign_id: r  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "reconcile: campaign had nothing left but was not final"
    }
    assert set(finished) == {before, after, third}
    assert finished[after].finished_with_errors is True  # type: ignore[attr-defined]
    assert finished[after].status == "completed_with_errors"  # type: ignore[attr-defined]
    assert finished[after].counts == {"sent": 1, "failed": 1}  # type: ignore[attr-defined]
    assert finished[before].finished_with_errors is False  # type: ignore[attr-defined]


async def test_reconcile_puts_rows_claimed_under_a_lost_lease_in_doubt(
    make_service, db, caplog
) -> None:
    from mailer.actors.scheduler import Reconcile

    # A live owner ('elsewhere' at epoch 0) and a row still claimed under an
    # earlier holder's token: the live owner would wait for it forever.
    cid = await _queued_campaign(db, recipients=2, status="sending")
    await db.execute(
        "UPDATE queue_entry SET lease_owner = 'elsewhere', lease_until = $2, leased_at = $3"
        " WHERE campaign_id = $1",
        cid,
        NOW + timedelta(hours=1),
        NOW,
    )
    await db.execute(
        "UPDATE recipient SET status = 'sending', claimed_by = 'gone#0', claimed_at = $2"
        " WHERE id = (SELECT min(id) FROM recipient WHERE campaign_id = $1)",
        cid,
        NOW,
    )
    # Handed to SMTP before its owner lost the lease: it may have gone out.
    await db.execute(
        "UPDATE recipient SET handed_at = $2"
        " WHERE id = (SELECT min(id) FROM recipient WHERE campaign_id = $1)",
        cid,
        NOW,
    )
    with caplog.at_level(logging.WARNING, logger="mailer.scheduler"):
        service = await make_service(clock=FakeClock(NOW))
        await asyncio.wait_for(service.leadership.wait(), 10)
        scheduler = service.supervisor.get("scheduler")
        assert scheduler is not None
        await scheduler.ask(Reconcile(), timeout=10)
    rows = await db.fetch("SELECT status FROM recipient WHERE campaign_id = $1 ORDER BY id", cid)
    assert [r["status"] for r in rows] == ["in_doubt", "pending"]
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE status = 'in_doubt'") == 1
    settled = [
        r
        for r in caplog.records
        if r.getMessage() == "reconcile: recipients claimed under a lost lease settled"
    ]
    assert settled and settled[0].campaign_id == cid  # type: ignore[attr-defined]
