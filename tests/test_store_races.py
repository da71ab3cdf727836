"""Races between a campaign's owners, its manager and the leader, decided in the store.

Each race is driven deterministically on real PostgreSQL: the steps of the
two sides are run in the order under test, and where one side must be in the
middle of a statement, a store hook or a trigger holds it there. Times are
explicit (the store takes ``now`` from its caller).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from mailer.apistore import ApiStore, Locked
from mailer.db import connect_pool
from mailer.messages import Notice
from mailer.store import Lease, Outcome, PgStore

T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)


class Hooks(dict[str, Callable[[int], Awaitable[None]]]):
    """The store's hooks, set by a test while it runs."""


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
async def pool(settings) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_pool(settings.database_url, size=4)
    yield p
    await p.close()


@pytest.fixture
def store(pool: asyncpg.Pool, hooks: Hooks) -> PgStore:
    return PgStore(pool, max_transient_attempts=3, hooks=hooks)


@pytest.fixture
def api(pool: asyncpg.Pool) -> ApiStore:
    return ApiStore(pool)


async def _campaign(db: asyncpg.Connection, n: int, status: str = "sending") -> int:
    cid: int = await db.fetchval(
        "INSERT INTO campaign (owner_id, name, subject, body_text, status, created_at,"
        " updated_at) VALUES ('o', 'n', 's', 'b', $1, $2, $2) RETURNING id",
        status,
        T0,
    )
    await db.execute("INSERT INTO queue_entry (campaign_id, queued_at) VALUES ($1, $2)", cid, T0)
    await db.executemany(
        "INSERT INTO recipient (campaign_id, email, created_at, updated_at)"
        " VALUES ($1, $2, $3, $3)",
        [(cid, f"r{i}@example.org", T0) for i in range(n)],
    )
    return cid


async def _lease(store: PgStore, cid: int, owner: str = "A", at: datetime = T0) -> Lease:
    lease = await store.acquire(cid, owner, until=at + timedelta(seconds=1), now=at, fence=0)
    assert lease is not None
    return lease


def _outcome(r: Any, status: str, error: str | None = None) -> Outcome:
    return Outcome(
        recipient_id=r.id,
        email=r.email,
        status=status,
        message_id=f"<m{r.id}>",
        answer=(error or "451 try later") if status == "transient" else "250 ok",
        error=error or ("451 try later" if status in ("transient", "failed") else None),
        took_ms=2.0,
    )


def _final(cid: int, owner: str, status: str, counts: dict[str, int]) -> list[Notice]:
    return [
        Notice(
            kind="campaign",
            subject=f"t.events.campaign.{status}",
            msg_id=f"{cid}:{status}",
            payload=b"{}",
            campaign_id=cid,
        )
    ]


# What the API's pause and cancel do, under the same locks (mailer.api.campaigns).
async def _pause(tx: Locked) -> None:
    assert tx.campaign is not None
    if tx.campaign.status not in ("ready", "sending"):
        raise LookupError(tx.campaign.status)
    await tx.set_status("paused", T1)
    await tx.pause_queue()


async def _resume(tx: Locked) -> None:
    await tx.set_status("ready", T1)
    await tx.resume_queue()


async def _cancel(tx: Locked) -> None:
    assert tx.campaign is not None
    if tx.campaign.status not in ("draft", "ready", "sending", "paused"):
        raise LookupError(tx.campaign.status)
    await tx.set_status("cancelled", T1)
    await tx.cancel_queue(T1)
    await tx.audit("m", "campaign.cancel", {}, T1)


async def _statuses(db: asyncpg.Connection, cid: int) -> list[str]:
    rows = await db.fetch("SELECT status FROM recipient WHERE campaign_id = $1 ORDER BY id", cid)
    return [r["status"] for r in rows]


async def _waiting_on_lock(db: asyncpg.Connection, wait_event: str | None = None) -> None:
    """Until some backend of this database waits on a lock (of kind ``wait_event``).

    PostgreSQL announces no lock wait, so this looks at pg_stat_activity until
    it shows one: a condition polled, bounded, never a fixed sleep.
    """
    async with asyncio.timeout(10):
        while not await db.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND ($1::text IS NULL OR wait_event = $1)",
            wait_event,
        ):
            await asyncio.sleep(0.01)


# --- 2: a late record from a deposed owner ------------------------------------------------


async def test_a_late_transient_record_leaves_the_doubt_of_a_finished_campaign(
    store: PgStore, db
) -> None:
    cid = await _campaign(db, 2)
    a = await _lease(store, cid)
    claimed, _ = await store.claim(a, 10, T0)
    await store.hand(a, [r.id for r in claimed], T0)  # A handed both to SMTP
    b = await _lease(store, cid, "B", T1)
    assert await store.begin_sending(b, T1) == 2
    done = await store.finish(b, T1)
    assert done.status == "completed_with_errors"

    # A's link stalled past its lease; its record arrives now: one 4xx, one sent.
    written = await store.record(
        a, [_outcome(claimed[0], "transient"), _outcome(claimed[1], "sent")], T1
    )
    assert written == {claimed[1].id: "sent"}
    # The 4xx leaves the doubt (nobody would send a pending row of a finished
    # campaign); the known final outcome replaces it.
    assert await _statuses(db, cid) == ["in_doubt", "sent"]
    log = await db.fetch(
        "SELECT recipient_id, status FROM send_log WHERE campaign_id = $1 ORDER BY recipient_id",
        cid,
    )
    assert [(r["recipient_id"], r["status"]) for r in log] == [
        (claimed[0].id, "in_doubt"),
        (claimed[1].id, "sent"),
    ]


async def test_a_retried_record_writes_each_attempt_once(store: PgStore, db) -> None:
    cid = await _campaign(db, 2)
    a = await _lease(store, cid)
    claimed, _ = await store.claim(a, 10, T0)
    outcomes = [_outcome(claimed[0], "sent"), _outcome(claimed[1], "failed")]
    assert await store.record(a, outcomes, T0) == {
        claimed[0].id: "sent",
        claimed[1].id: "failed",
    }
    # The commit's answer was lost: the actor records the same batch again.
    assert await store.record(a, outcomes, T0) == {}
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE campaign_id = $1", cid) == 2


# --- 5: a recipient that always answers 4xx ----------------------------------------------


async def test_a_recipient_fails_after_its_transient_attempts(store: PgStore, db) -> None:
    cid = await _campaign(db, 1)
    a = await _lease(store, cid)
    for attempt in range(1, 4):
        claimed, _ = await store.claim(a, 10, T0)
        assert len(claimed) == 1, attempt
        answer = f"451 greylisted, attempt {attempt}"
        written = await store.record(a, [_outcome(claimed[0], "transient", answer)], T0)
        assert written == {claimed[0].id: "pending" if attempt < 3 else "failed"}
    row = await db.fetchrow("SELECT status, error, transient_attempts FROM recipient")
    assert row["status"] == "failed" and row["transient_attempts"] == 3
    assert row["error"].endswith("451 greylisted, attempt 3")
    log = await db.fetch("SELECT status, error FROM send_log ORDER BY id")
    assert [r["status"] for r in log] == ["transient", "transient", "failed"]
    assert log[-1]["error"] == row["error"]  # the send log and the recipient agree
    assert (await store.finish(a, T0)).status == "completed_with_errors"


async def test_a_short_circuited_send_is_no_attempt(store: PgStore, db) -> None:
    cid = await _campaign(db, 1)
    a = await _lease(store, cid)
    for _ in range(5):
        claimed, _ = await store.claim(a, 10, T0)
        skipped = Outcome(
            recipient_id=claimed[0].id,
            email=claimed[0].email,
            status="transient",
            message_id=None,
            answer=None,
            error="breaker open",
            took_ms=0.0,
            short_circuited=True,
        )
        assert await store.record(a, [skipped], T0) == {claimed[0].id: "pending"}
    assert await db.fetchval("SELECT transient_attempts FROM recipient") == 0


# --- 3: pause or cancel racing the last batch ----------------------------------------------


async def _all_sent(store: PgStore, db, cid: int) -> Lease:
    a = await _lease(store, cid)
    claimed, _ = await store.claim(a, 10, T0)
    await store.record(a, [_outcome(r, "sent") for r in claimed], T0)
    return a


async def test_a_pause_between_the_last_record_and_finish_stands(
    store: PgStore, api: ApiStore, db
) -> None:
    cid = await _campaign(db, 2)
    a = await _all_sent(store, db, cid)
    await api.locked(cid, _pause)

    done = await store.finish(a, T1, notices=_final)
    assert (done.status, done.stopped) == (None, "paused")
    assert await db.fetchval("SELECT status FROM campaign") == "paused"
    q = await db.fetchrow("SELECT completed_at, defer_reason, lease_owner FROM queue_entry")
    assert (q["completed_at"], q["defer_reason"], q["lease_owner"]) == (None, "paused", None)
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0

    # The manager's resume runs it again: the next owner finds nothing left and finishes.
    await api.locked(cid, _resume)
    assert await store.runnable(T1, 10) == [cid]
    b = await _lease(store, cid, "B", T1)
    assert await store.begin_sending(b, T1) == 0
    assert (await store.finish(b, T1)).status == "sent"


async def test_a_cancel_between_the_last_record_and_finish_writes_no_sent(
    store: PgStore, api: ApiStore, db
) -> None:
    cid = await _campaign(db, 2)
    a = await _all_sent(store, db, cid)
    await api.locked(cid, _cancel)

    done = await store.finish(a, T1, notices=_final)
    assert (done.status, done.stopped) == (None, "cancelled")
    assert await db.fetchval("SELECT status FROM campaign") == "cancelled"
    assert not await db.fetchval(
        "SELECT count(*) FROM audit_log"
        " WHERE action = 'campaign.status' AND details->>'to' = 'sent'"
    )
    assert await db.fetchval("SELECT count(*) FROM event_outbox") == 0


async def test_a_pause_while_finish_decides_waits_and_finds_it_finished(
    store: PgStore, api: ApiStore, hooks: Hooks, db
) -> None:
    cid = await _campaign(db, 2)
    a = await _all_sent(store, db, cid)
    pausing: list[asyncio.Task[None]] = []

    async def pause_now(_: int) -> None:
        # The manager's pause arrives after finish read the counts: it must wait
        # for the campaign's lock, then find the campaign finished.
        pausing.append(asyncio.ensure_future(api.locked(cid, _pause)))
        await _waiting_on_lock(db)

    hooks["finish.checked"] = pause_now
    done = await store.finish(a, T1, notices=_final)
    assert done.status == "sent"
    with pytest.raises(LookupError, match="sent"):
        await pausing[0]
    assert await db.fetchval("SELECT status FROM campaign") == "sent"
    q = await db.fetchrow("SELECT completed_at, defer_reason FROM queue_entry")
    assert q["completed_at"] is not None and q["defer_reason"] is None
    # The final event is stored with the status, for the relay.
    assert await db.fetchval("SELECT msg_id FROM event_outbox") == f"{cid}:sent"


# --- 4: a claim racing a takeover ------------------------------------------------------------


async def test_a_claim_racing_a_takeover_leaves_no_row_sending_under_the_new_owner(
    store: PgStore, db, database_url: str
) -> None:
    cid = await _campaign(db, 3)
    a = await _lease(store, cid)
    # A trigger holds A's claim in the middle of its statement (after its
    # snapshot, before its rows change) until the test lets it go.
    await db.execute(
        """
        CREATE FUNCTION hold_claim() RETURNS trigger AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$ LANGUAGE plpgsql;
        CREATE TRIGGER hold_claim BEFORE UPDATE ON recipient
        FOR EACH ROW WHEN (NEW.status = 'sending') EXECUTE FUNCTION hold_claim();
        """
    )
    gate = await asyncpg.connect(database_url)
    tx = gate.transaction()
    await tx.start()
    await gate.execute("SELECT pg_advisory_xact_lock(4242)")

    claiming = asyncio.ensure_future(store.claim(a, 10, T0))
    await _waiting_on_lock(db, "advisory")

    async def take_over() -> Lease:
        b = await _lease(store, cid, "B", T1)
        assert await store.begin_sending(b, T1) is not None
        return b

    taking = asyncio.ensure_future(take_over())
    # Either the takeover went through (the claim's lease check was a snapshot)
    # or it waits for the claim's lock on the queue entry.
    async with asyncio.timeout(10):
        while not taking.done():
            waiting = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event <> 'advisory'"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
    await tx.rollback()
    await gate.close()
    await claiming
    b = await taking

    token = f"{b.owner}#{b.epoch}"
    stray = await db.fetchval(
        "SELECT count(*) FROM recipient WHERE status = 'sending' AND claimed_by <> $1", token
    )
    assert stray == 0, "rows claimed under a lost lease would hold the new owner forever"
    # A never handed what it claimed (if anything): nothing is in doubt, B sends it all.
    assert await _statuses(db, cid) == ["pending"] * 3
    mine, _ = await store.claim(b, 10, T1)
    await store.record(b, [_outcome(r, "sent") for r in mine], T1)
    assert (await store.finish(b, T1)).status == "sent"


async def test_reconcile_puts_claims_under_a_lost_lease_in_doubt(store: PgStore, db) -> None:
    cid = await _campaign(db, 3)
    a = await _lease(store, cid)
    b = await _lease(store, cid, "B", T1)
    # Rows left claimed by A's old epoch under B's live lease (what the race, or
    # an older version, left behind).
    await db.execute(
        "UPDATE recipient SET status = 'sending', claimed_by = $1, claimed_at = $2"
        " WHERE id IN (SELECT id FROM recipient ORDER BY id LIMIT 2)",
        a.claim_token,
        T0,
    )
    # The first was handed to SMTP by A (it may have gone out); the second never was.
    await db.execute(
        "UPDATE recipient SET handed_at = $1 WHERE id = (SELECT min(id) FROM recipient)", T0
    )
    mine, _ = await store.claim(b, 10, T1)
    assert len(mine) == 1
    assert await store.settle_stale_claims(T1, fence=1) == {}  # not the leader's epoch
    assert await store.settle_stale_claims(T1, fence=0) == {cid: {"in_doubt": 1, "pending": 1}}
    assert await _statuses(db, cid) == ["in_doubt", "pending", "sending"]
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE status = 'in_doubt'") == 1
    await store.record(b, [_outcome(mine[0], "sent")], T1)
    # The one never handed is B's to send, once.
    again, _ = await store.claim(b, 10, T1)
    assert len(again) == 1
    await store.record(b, [_outcome(again[0], "sent")], T1)
    assert (await store.finish(b, T1)).status == "completed_with_errors"


# --- 6: smaller ones ---------------------------------------------------------------------------


async def test_a_takeover_that_lost_its_lease_begins_nothing(store: PgStore, db) -> None:
    cid = await _campaign(db, 2, status="ready")
    late = await _lease(store, cid, "A", T0)
    now = await _lease(store, cid, "B", T1)
    assert await store.begin_sending(now, T1) == 0
    claimed, _ = await store.claim(now, 10, T1)
    assert len(claimed) == 2
    # A, deposed before it began, begins late: it must not doubt B's claims.
    assert await store.begin_sending(late, T1) is None
    assert await _statuses(db, cid) == ["sending", "sending"]
    assert await db.fetchval("SELECT count(*) FROM send_log") == 0


async def test_reconcile_leaves_a_campaign_paused_after_it_looked(
    store: PgStore, api: ApiStore, hooks: Hooks, db
) -> None:
    done_cid = await _campaign(db, 0)
    paused_cid = await _campaign(db, 0)
    paused: list[int] = []

    async def pause_now(cid: int) -> None:
        if cid == paused_cid:
            await api.locked(cid, _pause)
            paused.append(cid)

    hooks["finish_orphans.listed"] = pause_now
    finished = await store.finish_orphans(T1, 0, notices=_final)
    assert paused == [paused_cid]
    assert [(c, s) for c, _, s, _ in finished] == [(done_cid, "sent")]
    assert await db.fetchval("SELECT msg_id FROM event_outbox") == f"{done_cid}:sent"
    q = await db.fetchrow(
        "SELECT completed_at, defer_reason FROM queue_entry WHERE campaign_id = $1", paused_cid
    )
    assert (q["completed_at"], q["defer_reason"]) == (None, "paused")
    assert await db.fetchval("SELECT status FROM campaign WHERE id = $1", paused_cid) == "paused"
