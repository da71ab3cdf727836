"""Scale-out: one campaign worked by several processes at once, in shards.

With ``shard_min_recipients`` set, a campaign with that many pending recipients
is run in one shard per live process: shard k sends the recipients with
id % shards = k under its own fenced lease, and the home (shard 0) alone gives
the final status. The services are real (in-process ``Service`` objects, or
``mailer run`` OS processes for a kill -9) on the session's embedded stack;
the outcome is read from the SMTP sink and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mailer.config import Settings
from mailer.sink import SmtpSink
from tests.helpers import Crm, Events, LeaderWatch, people, worker_env
from tests.test_cluster import _instances_up

_MESSAGE_ID = re.compile(rb"^Message-ID: <[^@>]+@([a-z0-9]+)\.mailer\.test>", re.M | re.I)


def _sent_by(data: bytes) -> str:
    """The service that sent a message, from its Message-ID domain."""
    found = _MESSAGE_ID.search(data)
    assert found is not None, data[:500]
    return found.group(1).decode()


# MAILER_PIPELINE_DEPTH of the killed processes: what each actor can leave in doubt.
KILL_DEPTH = 4


def _sharded(name: str) -> dict[str, Any]:
    return {
        "instance_id": name,
        "message_id_domain": f"{name}.mailer.test",
        "shard_min_recipients": 50,
        "batch_size": 20,
        "smtp_connections": 2,
        "rate_per_hour": 100_000,
        "campaign_lease_seconds": 3.0,
    }


async def _until(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    """Polls the database-backed ``predicate`` (an end state, not an event) until true."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110 (a database state, no event)
            await asyncio.sleep(0.05)


async def _no_live_lease(db: asyncpg.Connection, cid: int) -> bool:
    home = await db.fetchval("SELECT lease_owner FROM queue_entry WHERE campaign_id = $1", cid)
    helpers = await db.fetchval(
        "SELECT count(*) FROM campaign_shard WHERE campaign_id = $1 AND lease_owner IS NOT NULL",
        cid,
    )
    return home is None and helpers == 0


async def _exactly_once(sink: SmtpSink, db: asyncpg.Connection, cid: int, n: int) -> Counter[str]:
    """Every recipient reached the sink once; the send log agrees. Returns who sent how many."""
    rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert len(rcpts) == n and max(rcpts.values()) == 1, rcpts.most_common(3)
    dup = await db.fetchval(
        "SELECT count(*) FROM (SELECT recipient_id FROM send_log WHERE campaign_id = $1 "
        "GROUP BY recipient_id HAVING count(*) > 1) d",
        cid,
    )
    assert dup == 0
    return Counter(_sent_by(m.data) for m in sink.messages)


async def _final_once(db: asyncpg.Connection, events: Events, cid: int) -> None:
    """The final status was written once, and its event went out once."""
    finals = await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE campaign_id = $1 AND action = 'campaign.status' "
        "AND details->>'to' IN ('sent', 'completed_with_errors')",
        cid,
    )
    assert finals == 1
    # Every shard has let go: nothing could still publish a second final event.
    await _until(lambda: _no_live_lease(db, cid))
    await db.execute("SELECT 1")  # one more round trip: any late publish has landed
    assert len(events.of(cid, "sent") + events.of(cid, "completed_with_errors")) == 1


async def test_one_campaign_is_sent_by_two_services_each_a_real_share(
    make_service, crm: Crm, events: Events, sink: SmtpSink, db, nc, settings: Settings
) -> None:
    sink.data_delay = 0.002  # the campaign lasts long enough for both to take part
    await make_service(**_sharded("s1"))
    await make_service(**_sharded("s2"))
    await _instances_up(nc, settings.subject_prefix, 2)
    cid = await crm.campaign(people(300, "share.example"))
    await crm.start(cid)
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=90)
    assert done["event"] == "sent"

    by = await _exactly_once(sink, db, cid, 300)
    print(f"shares: {dict(by)}")
    assert set(by) == {"s1", "s2"}, by
    assert min(by.values()) >= 0.3 * 300, by
    shards = await db.fetchval("SELECT shards FROM queue_entry WHERE campaign_id = $1", cid)
    assert shards == 2
    await _final_once(db, events, cid)


async def test_pause_stops_every_shard_and_resume_finishes(
    make_service, crm: Crm, events: Events, sink: SmtpSink, db, nc, settings: Settings
) -> None:
    sink.data_delay = 0.02  # slow: the pause lands mid-campaign
    await make_service(**_sharded("p1"))
    await make_service(**_sharded("p2"))
    await _instances_up(nc, settings.subject_prefix, 2)
    cid = await crm.campaign(people(300, "pause.example"))
    await crm.start(cid)

    async def both_sending() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM campaign_shard "
            "WHERE campaign_id = $1 AND lease_owner IS NOT NULL",
            cid,
        )
        return bool(n) and sink.count >= 20

    await _until(both_sending)
    await crm.call("campaign.pause", {"campaign_id": cid})
    # Every shard lets go (the home and the helper both see the pause).
    await _until(lambda: _no_live_lease(db, cid))
    assert (
        await db.fetchval(
            "SELECT count(*) FROM recipient WHERE campaign_id = $1 AND status = 'sending'", cid
        )
        == 0
    )
    paused_at = sink.count
    assert paused_at < 300, "paused mid-campaign"
    assert (await crm.get(cid))["status"] == "paused"
    # Nothing more goes out while paused: a dispatch now would be seen at once.
    await crm.call("campaign.get", {"campaign_id": cid})
    assert sink.count == paused_at

    sink.data_delay = 0.0
    await crm.call("campaign.resume", {"campaign_id": cid})
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=90)
    assert done["event"] == "sent"
    await _exactly_once(sink, db, cid, 300)
    await _final_once(db, events, cid)


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(instance: str, **extra: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{instance}.log").open("wb")
        env = worker_env(
            settings,
            instance,
            campaign_lease_seconds="3",
            message_id_domain=f"{instance}.mailer.test",
            shard_min_recipients="50",
            pipeline_depth=str(KILL_DEPTH),
            **extra,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailer.cli", "run"], env=env, stdout=log, stderr=log
        )
        procs.append(proc)
        return proc

    yield start
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


@pytest.mark.parametrize("victim", ["home", "helper"])
async def test_kill_9_of_a_shards_process_mid_campaign(
    victim: str,
    workers,
    crm: Crm,
    events: Events,
    sink: SmtpSink,
    db,
    nc,
    settings: Settings,
) -> None:
    sink.data_delay = 0.01  # slow enough that the kill lands mid-campaign
    procs = {name: workers(name) for name in ("k1", "k2", "k3")}
    watch = LeaderWatch()
    await watch.start(nc, settings.subject_prefix)
    try:
        await watch.wait()
        await _instances_up(nc, settings.subject_prefix, 3)
        n = 400
        cid = await crm.campaign(people(n, "kill.example"))
        await crm.start(cid)

        async def sharded() -> bool:
            live = await db.fetchval(
                "SELECT count(*) FROM campaign_shard WHERE campaign_id = $1 "
                "AND lease_owner IS NOT NULL",
                cid,
            )
            return live >= 1 and sink.count >= 40

        await _until(sharded)
        # A process holding a shard of the campaign: its lease must be taken over.
        if victim == "home":
            holders = await db.fetch(
                "SELECT lease_owner FROM queue_entry WHERE campaign_id = $1 "
                "AND lease_owner IS NOT NULL",
                cid,
            )
        else:
            holders = await db.fetch(
                "SELECT lease_owner FROM campaign_shard WHERE campaign_id = $1 "
                "AND lease_owner IS NOT NULL",
                cid,
            )
        # Preferably not the leader (whose own failover is test_cluster's); when
        # the leader holds it, the kill takes both over at once.
        owners = sorted((r["lease_owner"] == watch.holder, r["lease_owner"]) for r in holders)
        assert owners, f"no live {victim} lease"
        name = owners[0][1]
        assert sink.count < n, "still mid-campaign"
        procs[name].send_signal(signal.SIGKILL)
        procs[name].wait()

        done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=120)
        counts = (await crm.get(cid))["counts"]
        print(f"after kill -9 of {name} ({victim}): {counts}")
        # Every recipient settled: sent, or visibly in doubt (the dead shard's waves).
        assert set(counts) <= {"sent", "in_doubt"} and sum(counts.values()) == n
        # At most the pipeline's depth per campaign actor the dead process ran (two).
        assert counts.get("in_doubt", 0) <= 2 * KILL_DEPTH, counts
        assert done["event"] == ("sent" if not counts.get("in_doubt") else "completed_with_errors")
        rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
        assert max(rcpts.values()) == 1
        # Nothing lost: every recipient not in doubt reached the sink.
        assert len(rcpts) >= n - counts.get("in_doubt", 0)
        await _final_once(db, events, cid)
    finally:
        watch.stop()


async def test_the_leader_dispatches_to_the_least_loaded_process(
    make_service, crm: Crm, events: Events, sink: SmtpSink, db, nc, settings: Settings
) -> None:
    # Sharding off: each campaign has one lease. NATS's random pick would split
    # four otherwise than two and two with p = 5/8; the least-loaded dispatch never.
    sink.data_delay = 0.05  # slow: every campaign is still running when the next starts
    common = {"max_active_campaigns": 4, "rate_per_hour": 100_000, "batch_size": 5}
    await make_service(instance_id="l1", **common)
    await make_service(instance_id="l2", **common)
    await _instances_up(nc, settings.subject_prefix, 2)
    campaigns = [await crm.campaign(people(40, f"least{i}.example")) for i in range(4)]
    for cid in campaigns:
        await crm.start(cid)

        async def leased(cid: int = cid) -> bool:
            owner = await db.fetchval(
                "SELECT lease_owner FROM queue_entry WHERE campaign_id = $1", cid
            )
            return owner is not None

        await _until(leased)
    rows = await db.fetch(
        "SELECT lease_owner FROM queue_entry WHERE campaign_id = ANY($1::bigint[])", campaigns
    )
    owners = Counter(r["lease_owner"] for r in rows)
    assert owners == {"l1": 2, "l2": 2}, owners
    sink.data_delay = 0.0
    for cid in campaigns:
        done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=90)
        assert done["event"] == "sent"


async def test_shards_refused_for_the_hour_wait_once_with_one_answer(
    make_service, crm: Crm, events: Events, sink: SmtpSink, db, nc, settings: Settings
) -> None:
    limited = {"rate_per_hour": 100}
    await make_service(**{**_sharded("r1"), **limited})
    await make_service(**{**_sharded("r2"), **limited})
    await _instances_up(nc, settings.subject_prefix, 2)
    hour = datetime.now(UTC).hour
    cid = await crm.campaign(people(300, "hour.example"))
    await crm.start(cid)
    await events.wait(cid, ("deferred",), timeout=60)
    # Every shard refused lets go; the wait is the campaign's, written once.
    await _until(lambda: _no_live_lease(db, cid))
    q = await db.fetchrow(
        "SELECT defer_reason, deferred_until, shards FROM queue_entry WHERE campaign_id = $1", cid
    )
    assert q["shards"] == 2 and q["defer_reason"] == "rate_per_hour"
    assert q["deferred_until"] > datetime.now(UTC)
    assert len(events.of(cid, "deferred")) == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE campaign_id = $1 AND action = 'campaign.defer'",
            cid,
        )
        == 1
    )
    if datetime.now(UTC).hour == hour:  # the hour did not turn during the test
        # The hour's limit holds across both processes' shards.
        assert sink.count == 100
        assert Counter(r for m in sink.messages for r in m.rcpt_tos).most_common(1)[0][1] == 1
