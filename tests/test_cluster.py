"""Several mailer processes at once: leader election, failover, no duplicates.

The workers are real OS processes (``python -m mailer.cli run``) on the
session's embedded stack; the test drives them only over NATS and reads the
outcome from the SMTP sink and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from mailer.actors.api import SERVICE_NAME
from mailer.config import Settings
from tests.helpers import Crm, Events, LeaderWatch, people, worker_env


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(instance: str, **extra: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{instance}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailer.cli", "run"],
            env=worker_env(settings, instance, **{"campaign_lease_seconds": "3", **extra}),
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
    workers, crm: Crm, events: Events, sink, db, nc, settings: Settings, leaders: LeaderWatch
) -> None:
    # Each worker stamps its own Message-ID domain: the sink tells who sent what.
    for name in ("w1", "w2"):
        workers(name, **_two_at_once(name))
    await leaders.wait()
    await _instances_up(nc, settings.subject_prefix, 2)
    # The leader hands each campaign to one runner of the queue group, picked at
    # random by NATS: with 20 campaigns all land in one process with p = 2**-19.
    campaigns = [await crm.campaign(people(25, f"c{i}.example")) for i in range(20)]
    for cid in campaigns:
        await crm.start(cid)
    for cid in campaigns:
        done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
        assert done["event"] == "sent"

    rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert len(rcpts) == 500 and max(rcpts.values()) == 1
    dup = await db.fetchval(
        "SELECT count(*) FROM (SELECT recipient_id FROM send_log "
        "GROUP BY recipient_id HAVING count(*) > 1) d"
    )
    assert dup == 0
    # Both processes sent, and between them every message.
    by_process = Counter(_sent_by(m.data) for m in sink.messages)
    assert set(by_process) == {"w1", "w2"}, by_process
    assert by_process["w1"] + by_process["w2"] == 500


def _two_at_once(name: str) -> dict[str, str]:
    return {
        "max_active_campaigns": "2",
        "message_id_domain": f"{name}.mailer.test",
        "start_throttle_per_hour": "100",
    }


_MESSAGE_ID = re.compile(rb"^Message-ID: <[^@>]+@([a-z0-9]+)\.mailer\.test>", re.M | re.I)


def _sent_by(data: bytes) -> str:
    """The worker that sent a message, from its Message-ID domain."""
    found = _MESSAGE_ID.search(data)
    assert found is not None, data[:500]
    return found.group(1).decode()


async def _instances_up(nc, prefix: str, n: int, timeout: float = 20.0) -> None:
    """Waits until ``n`` workers of this test answer the micro service PING.

    A PING reaches only the services already up, so it is repeated until enough
    have answered; each answer is awaited, not slept for.
    """
    seen: set[str] = set()
    enough = asyncio.Event()

    async def on_pong(msg) -> None:
        info = json.loads(msg.data)
        if (info.get("metadata") or {}).get("subject_prefix") == prefix:
            seen.add(info["id"])
            if len(seen) >= n:
                enough.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_pong)
    try:
        async with asyncio.timeout(timeout):
            while not enough.is_set():
                await nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(enough.wait(), 0.25)
    finally:
        await sub.unsubscribe()


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
    workers, crm: Crm, events: Events, sink, db, nc, settings: Settings, leaders: LeaderWatch
) -> None:
    batch_size = 10
    sink.data_delay = 0.05  # a slow provider (~40 messages/s): the kill lands mid-campaign
    # w1 starts alone: it leads, and it is the only runner the campaign can go to.
    # The depth bounds the dead owner's doubt (batches join without a drain, so the
    # batch size alone no longer does).
    depth = batch_size
    w1 = workers(
        "w1",
        message_id_domain="w1.mailer.test",
        batch_size=str(batch_size),
        pipeline_depth=str(depth),
    )
    assert await leaders.wait() == "w1"
    cid = await crm.campaign(people(500))
    await crm.start(cid)
    await sink.wait_for(30, timeout=30)
    workers(
        "w2",
        message_id_domain="w2.mailer.test",
        batch_size=str(batch_size),
        pipeline_depth=str(depth),
    )
    await _instances_up(nc, settings.subject_prefix, 2)

    # The process about to die is both the leader and the campaign's lease owner.
    before = await db.fetchrow(
        "SELECT lease_owner, lease_epoch FROM queue_entry WHERE campaign_id = $1", cid
    )
    assert before["lease_owner"] == "w1" and leaders.holder == "w1"
    assert sink.count < 500, "still mid-campaign"
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    killed_at = time.monotonic()
    assert await leaders.wait(other_than="w1", timeout=15) == "w2"
    assert time.monotonic() - killed_at < 10, "a new leader within 10 s"

    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=90)
    counts = (await crm.get(cid))["counts"]
    print(f"after kill -9 of w1: {counts}")
    # Every recipient is settled: sent, or visibly in doubt (the dead owner's handed waves).
    assert set(counts) <= {"sent", "in_doubt"} and sum(counts.values()) == 500
    assert counts.get("in_doubt", 0) <= depth

    # w2 took the campaign's lease over (a new holder, a higher epoch) and sent the rest.
    after = await db.fetchrow(
        "SELECT lease_owner, lease_epoch, completed_at FROM queue_entry WHERE campaign_id = $1",
        cid,
    )
    assert after["lease_epoch"] > before["lease_epoch"] and after["completed_at"] is not None
    sender_of: dict[str, list[str]] = {}
    for m in sink.messages:
        for r in m.rcpt_tos:
            sender_of.setdefault(r, []).append(_sent_by(m.data))
    assert {"w1", "w2"} <= {w for ws in sender_of.values() for w in ws}

    # No duplicates, ever: every address reached the sink at most once ...
    assert max(len(ws) for ws in sender_of.values()) == 1
    # ... and the send log holds at most one success per (campaign, recipient).
    dup = await db.fetchval(
        "SELECT count(*) FROM (SELECT campaign_id, recipient_id FROM send_log "
        "WHERE status = 'sent' GROUP BY campaign_id, recipient_id HAVING count(*) > 1) d"
    )
    assert dup == 0
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
    assert sent <= set(sender_of)
    assert set(people_emails(500)) - set(sender_of) <= doubt
    # In doubt is never re-sent by the new owner: whatever of it arrived came from w1.
    assert all(sender_of[r] == ["w1"] for r in doubt if r in sender_of)
    assert done["event"] == ("completed_with_errors" if doubt else "sent")


def people_emails(n: int) -> list[str]:
    return [p["email"] for p in people(n)]
