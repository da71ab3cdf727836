"""Several mailer processes at once: leader election, failover, no duplicates.

The workers are real OS processes (``python -m mailer.cli run``) on the
session's embedded stack; the test drives them only over NATS and reads the
outcome from the SMTP sink and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from mailer.config import Settings, env_name
from tests.helpers import Crm, Events, LeaderWatch, people


def _env(settings: Settings, instance: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    values = {
        "nats_url": settings.nats_url,
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "smtp_host": settings.smtp_host,
        "smtp_port": str(settings.smtp_port),
        "subject_prefix": settings.subject_prefix,
        "redis_key_prefix": settings.redis_key_prefix,
        "instance_id": instance,
        "http_port": "0",
        "working_hours_start": "00:00",
        "working_hours_end": "24:00",
        "leader_ttl_seconds": "3",
        "campaign_lease_seconds": "3",
        "batch_size": "10",
        "smtp_connections": "2",
        "rate_per_hour": "100000",
        "log_level": "WARNING",
    }
    values.update(extra)
    env.update({env_name(k): v for k, v in values.items()})
    return env


@pytest.fixture
def workers(
    settings: Settings, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(instance: str, **extra: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{instance}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailer.cli", "run"],
            env=_env(settings, instance, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    yield start
    # Shown by pytest only when the test failed: what each worker said.
    for log_path in sorted(tmp_path.glob("*.log")):
        print(f"--- {log_path.name} ---")
        print("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]))
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def leaders(nc, settings: Settings) -> AsyncIterator[LeaderWatch]:
    watch = LeaderWatch()
    await watch.start(nc, settings.subject_prefix)
    yield watch
    watch.stop()


async def test_two_processes_send_every_recipient_exactly_once(
    workers, crm: Crm, events: Events, sink, db, leaders: LeaderWatch
) -> None:
    workers("w1", max_active_campaigns="2")
    workers("w2", max_active_campaigns="2")
    await leaders.wait()
    a = await crm.campaign(people(250, "a.example"))
    b = await crm.campaign(people(250, "b.example"))
    await crm.start(a)
    await crm.start(b)
    for cid in (a, b):
        done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
        assert done["event"] == "sent"

    rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert len(rcpts) == 500 and max(rcpts.values()) == 1
    dup = await db.fetchval(
        "SELECT count(*) FROM (SELECT recipient_id FROM send_log "
        "GROUP BY recipient_id HAVING count(*) > 1) d"
    )
    assert dup == 0


async def test_a_graceful_stop_hands_leadership_over_within_a_second(
    make_service, db, leaders: LeaderWatch
) -> None:
    first = await make_service(instance_id="first")
    await leaders.wait()
    second = await make_service(instance_id="second")
    leader, other = (first, second) if leaders.holder == "first" else (second, first)
    old_epoch = leader.leader_epoch
    assert old_epoch and not other.leader_epoch
    began = time.monotonic()
    await leader.stop()  # resigns: deletes the lease key
    await leaders.wait(other_than=leader.settings.instance_id, timeout=5)
    took = time.monotonic() - began
    print(f"handover took {took:.3f} s")
    assert took < 1.0
    async with asyncio.timeout(5):
        await other.leadership.wait()
    assert other.leader_epoch > old_epoch  # the fencing token only grows
    assert await db.fetchval("SELECT epoch FROM leader_fence") == other.leader_epoch


async def test_kill_9_of_the_leader_mid_campaign(
    workers, crm: Crm, events: Events, sink, db, leaders: LeaderWatch
) -> None:
    sink.data_delay = 0.01  # a slow provider: the kill lands mid-campaign
    procs = {"w1": workers("w1"), "w2": workers("w2")}
    leader = await leaders.wait()
    cid = await crm.campaign(people(500))
    await crm.start(cid)
    await sink.wait_for(60, timeout=30)

    procs[leader].send_signal(signal.SIGKILL)
    procs[leader].wait()
    killed_at = time.monotonic()
    survivor = await leaders.wait(other_than=leader, timeout=15)
    assert survivor != leader
    assert time.monotonic() - killed_at < 10, "a new leader within 10 s"

    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=90)
    counts = (await crm.get(cid))["counts"]
    assert sum(counts.values()) == 500
    assert counts.get("pending", 0) == 0 and counts.get("sending", 0) == 0

    # No duplicates, ever: every address reached the sink at most once.
    rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert max(rcpts.values()) == 1
    # Every recipient recorded as sent was received; the only ones not
    # received are those left visibly in doubt by the killed process.
    sent = {
        r["email"]
        for r in await db.fetch(
            "SELECT email FROM recipient WHERE campaign_id = $1 AND status = 'sent'", cid
        )
    }
    doubt = {
        r["email"]
        for r in await db.fetch(
            "SELECT email FROM recipient WHERE campaign_id = $1 AND status = 'in_doubt'", cid
        )
    }
    assert sent <= set(rcpts)
    assert set(people_emails(500)) - set(rcpts) <= doubt
    assert done["event"] == ("completed_with_errors" if doubt else "sent")


def people_emails(n: int) -> list[str]:
    return [p["email"] for p in people(n)]
