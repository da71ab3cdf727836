"""A real ``mailer run`` OS process: SIGTERM mid-campaign, and the supervisor giving up.

The processes run ``python -m mailer.cli run`` against the session's embedded
stack (like tests/test_cluster.py); the test drives them over NATS and signals,
and reads the outcome from the SMTP sink, PostgreSQL and the process's own log
and exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailer.config import Settings
from tests.helpers import Crm, Events, LeaderWatch, people, worker_env

pytestmark = pytest.mark.timeout(120)


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def exit_code(self, timeout: float) -> int:
        # Awaited, never a blocking wait(): the SMTP sink runs on this test's loop,
        # and the process finishes its batch in flight against it.
        return await asyncio.wait_for(self.proc.wait(), timeout)


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(settings: Settings, tmp_path: Path) -> AsyncIterator[StartWorker]:
    workers: list[Worker] = []

    async def start(instance: str, **extra: str) -> Worker:
        log_path = tmp_path / f"{instance}.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mailer.cli",
                "run",
                env=worker_env(settings, instance, **extra),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        worker = Worker(proc, log_path)
        workers.append(worker)
        return worker

    yield start
    # Shown by pytest only when the test failed: what each process said.
    for w in workers:
        print(f"--- {w.log_path.name} (exit {w.proc.returncode}) ---")
        print("\n".join(w.log().splitlines()[-60:]))
    for w in workers:
        if w.proc.returncode is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            await w.exit_code(15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()


@pytest.fixture
async def leaders(nc, settings: Settings) -> AsyncIterator[LeaderWatch]:
    watch = LeaderWatch()
    await watch.start(nc, settings.subject_prefix)
    yield watch
    watch.stop()


SHUTDOWN_DEADLINE = 10.0


async def test_sigterm_mid_campaign_records_the_batch_and_hands_the_campaign_over(
    start_worker: StartWorker, crm: Crm, events: Events, sink, db, leaders: LeaderWatch
) -> None:
    sink.data_delay = 0.02  # a slow provider: the signal lands mid-campaign
    # A lease far longer than the test waits: the next process can take the
    # campaign only if the stopping one gave its lease back.
    common = {
        "shutdown_timeout_seconds": str(SHUTDOWN_DEADLINE),
        "campaign_lease_seconds": "120",
    }
    first = await start_worker("first", **common)
    assert await leaders.wait(timeout=30) == "first"
    recipients = people(300)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    await sink.wait_for(30, timeout=30)

    first.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    code = await first.exit_code(SHUTDOWN_DEADLINE + 10)
    took = time.monotonic() - began
    print(f"SIGTERM to exit: {took:.2f} s")
    assert code == 0, first.log()
    assert took < SHUTDOWN_DEADLINE, "graceful stop within the shutdown deadline"
    assert "shutdown deadline exceeded" not in first.log()

    # The batch in flight was sent and recorded: nothing left sending or in doubt,
    # and what the sink got is exactly what the database says was sent.
    by_status = dict(
        await db.fetch(
            "SELECT status, count(*) FROM recipient WHERE campaign_id = $1 GROUP BY status", cid
        )
    )
    assert set(by_status) == {"sent", "pending"}, by_status  # stopped mid-campaign
    sent = {
        r["email"]
        for r in await db.fetch(
            "SELECT email FROM recipient WHERE campaign_id = $1 AND status = 'sent'", cid
        )
    }
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert set(received) == sent and max(received.values()) == 1
    # The lease was given back, not left to expire.
    entry = await db.fetchrow(
        "SELECT lease_owner, lease_until, completed_at FROM queue_entry WHERE campaign_id = $1",
        cid,
    )
    assert entry is not None
    assert entry["lease_owner"] is None and entry["lease_until"] is None, dict(entry)
    assert entry["completed_at"] is None

    # A second process takes the campaign over and completes it.
    await start_worker("second", **common)
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    assert done["event"] == "sent", done
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert received == Counter(r["email"] for r in recipients), "each exactly once"
    dup = await db.fetchval(
        "SELECT count(*) FROM (SELECT recipient_id FROM send_log WHERE campaign_id = $1 "
        "GROUP BY recipient_id HAVING count(*) > 1) d",
        cid,
    )
    assert dup == 0
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE campaign_id = $1", cid) == 300


async def test_campaign_actors_crashing_together_are_given_up_and_the_process_stays(
    start_worker: StartWorker, crm: Crm, sink, leaders: LeaderWatch
) -> None:
    # A rate governor that never answers in time: every campaign actor's token
    # request times out, the actor crashes and is restarted with backoff. Eight
    # campaigns crashing together used to exceed the process's restart
    # intensity (20 in 60 s) and exit the pod; each now has its own limit.
    worker = await start_worker(
        "fragile",
        token_request_timeout_seconds="0.000001",
        max_active_campaigns="8",
        start_throttle_per_hour="100",
        log_level="INFO",
    )
    await leaders.wait(timeout=30)
    campaigns = [await crm.campaign(people(3, f"c{i}.example")) for i in range(8)]
    for cid in campaigns:
        await crm.start(cid)

    async with asyncio.timeout(60):
        while worker.log().count("child restart limit exceeded; giving it up") < 8:
            assert worker.proc.returncode is None, worker.log()
            await asyncio.sleep(0.2)  # reading the process's log file: no event to wait on
    log = worker.log()
    assert "restart intensity exceeded" not in log
    assert "campaign actor given up after repeated crashes; dispatched again later" in log
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.exit_code(SHUTDOWN_DEADLINE + 10) == 0, worker.log()
    assert sink.count == 0  # no token ever reached an actor: nothing was sent


async def test_restart_intensity_exceeded_exits_1(
    settings: Settings, tmp_path: Path, leaders: LeaderWatch
) -> None:
    # The long-lived actors keep the process-level limit: a scheduler that
    # crashes on every message (tests/fault_worker.py) makes the process exit 1.
    log_path = tmp_path / "fragile.log"
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fault_worker",
            env=worker_env(settings, "fragile"),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = log_path.read_text(errors="replace")
    assert code == 1, log
    assert "restart intensity exceeded; shutting down" in log
    assert "supervisor gave up: exiting non-zero so the pod is restarted" in log
    assert "actor crashed" in log


async def _statuses(db, cid: int) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT status, count(*) AS n FROM recipient WHERE campaign_id = $1 GROUP BY status", cid
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def test_sigterm_with_a_hung_smtp_server_releases_every_unsent_claim(
    start_worker: StartWorker, crm: Crm, sink, db, leaders: LeaderWatch
) -> None:
    # The provider hangs before answering RCPT: nothing can be delivered. A
    # rolling deploy's SIGTERM must not leave those claims sending (in doubt
    # for the next owner): they never reached a mailbox, so they go back.
    sink.hang("rcpt")
    deadline = 6.0
    worker = await start_worker(
        "hung",
        shutdown_timeout_seconds=str(deadline),
        campaign_lease_seconds="120",
        smtp_timeout_seconds="60",  # the hang outlives the deadline
        batch_size="10",
        smtp_connections="2",
    )
    assert await leaders.wait(timeout=30) == "hung"
    cid = await crm.campaign(people(10))
    await crm.start(cid)
    await sink.wait_hung(2, timeout=30)  # both connections stuck in a transaction
    assert (await _statuses(db, cid)).get("sending") == 10

    worker.proc.send_signal(signal.SIGTERM)
    code = await worker.exit_code(deadline + 10)
    assert code == 0, worker.log()
    assert "shutdown deadline exceeded" not in worker.log()
    assert await _statuses(db, cid) == {"pending": 10}
    assert await db.fetchval("SELECT count(*) FROM send_log WHERE campaign_id = $1", cid) == 0
    entry = await db.fetchrow(
        "SELECT lease_owner, defer_reason, consecutive_transient_errors FROM queue_entry"
        " WHERE campaign_id = $1",
        cid,
    )
    assert entry is not None
    # Given back, not deferred: the next pod goes on at once, with a clean count.
    assert dict(entry) == {
        "lease_owner": None,
        "defer_reason": None,
        "consecutive_transient_errors": 0,
    }
    sink.release()
    assert sink.count == 0


async def test_sigterm_with_the_end_of_data_unanswered_records_only_those_in_doubt(
    start_worker: StartWorker, crm: Crm, sink, db, leaders: LeaderWatch
) -> None:
    # The provider took the data of two messages and never answers: they may be
    # delivered. The stop waits part of its deadline, cuts them, and records
    # them in doubt; the rest of the batch was never handed and goes back.
    sink.hang("data")
    deadline = 6.0
    worker = await start_worker(
        "hung-data",
        shutdown_timeout_seconds=str(deadline),
        campaign_lease_seconds="120",
        smtp_timeout_seconds="60",
        batch_size="10",
        smtp_connections="2",
    )
    assert await leaders.wait(timeout=30) == "hung-data"
    cid = await crm.campaign(people(10))
    await crm.start(cid)
    await sink.wait_hung(2, timeout=30)

    worker.proc.send_signal(signal.SIGTERM)
    code = await worker.exit_code(deadline + 10)
    assert code == 0, worker.log()
    assert "shutdown deadline exceeded" not in worker.log()
    assert await _statuses(db, cid) == {"in_doubt": 2, "pending": 8}
    logged = await db.fetch("SELECT status, error FROM send_log WHERE campaign_id = $1", cid)
    assert [r["status"] for r in logged] == ["in_doubt", "in_doubt"]
    assert all("in doubt" in r["error"] for r in logged)
    sink.release()


async def test_kill_9_mid_batch_leaves_in_doubt_only_the_sends_in_flight(
    start_worker: StartWorker,
    crm: Crm,
    events: Events,
    sink,
    db,
    leaders: LeaderWatch,
    settings: Settings,
) -> None:
    sink.data_delay = 0.02  # a slow provider: the kill lands mid-batch
    connections = 2
    depth = 2 * connections
    common = {
        "batch_size": "50",
        "smtp_connections": str(connections),
        "pipeline_depth": str(depth),
        "campaign_lease_seconds": "3",
    }
    first = await start_worker("first", **common)
    assert await leaders.wait(timeout=30) == "first"
    recipients = people(100)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    await sink.wait_for(9, timeout=30)  # within the first batch of 50
    first.proc.kill()
    await first.exit_code(10)
    assert (await _statuses(db, cid)).get("sending", 0) >= 40  # a batch was claimed

    # The next owner settles what the dead one left: only the handed waves are in doubt
    # (the one with SMTP and the next, handed while it was sent: pipelined).
    await start_worker("second", **common)
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    counts = await _statuses(db, cid)
    assert set(counts) <= {"sent", "in_doubt"} and sum(counts.values()) == 100, counts
    assert counts.get("in_doubt", 0) <= depth, counts
    assert done["event"] == ("sent" if "in_doubt" not in counts else "completed_with_errors")
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert max(received.values()) == 1, "nobody twice"
    sent = {
        r["email"]
        for r in await db.fetch(
            "SELECT email FROM recipient WHERE campaign_id = $1 AND status = 'sent'", cid
        )
    }
    assert sent <= set(received)
    # The dead owner's claims never sent went back to pending and their quota with
    # them: the takeover asked for a sync, which counts the sends, not the tokens
    # the dead process held. Exactly what went out (or may have) is spent.
    spent = counts.get("sent", 0) + counts.get("in_doubt", 0)
    assert await db.fetchval("SELECT emails_available FROM quota") == settings.monthly_quota - spent
