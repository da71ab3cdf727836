"""The pipelined campaign loop keeps the wave invariants (mailer/actors/campaign.py).

While a wave is with SMTP, the previous one is recorded and the next one handed and
rendered. Not timed: what is checked is the order of the records, that no more than the
pipeline's depth (MAILER_PIPELINE_DEPTH) is ever handed and unrecorded (all a kill -9 could
leave in doubt), that the depth is used (beyond one window in flight), and that a crash
at each stage of a wave sends nobody twice and loses nobody. Real NATS, PostgreSQL, Redis
and SMTP sink; the stage hook only looks at the database or raises.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.helpers import Crm, Events, people

CONNECTIONS = 3
QUOTA = 1000
STAGES = ("handed", "sending", "prepared", "sent")


async def _handed_unrecorded(db, cid: int) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM recipient WHERE campaign_id = $1 AND status = 'sending'"
        " AND handed_at IS NOT NULL",
        cid,
    )
    return n


@pytest.mark.parametrize("depth", [2 * CONNECTIONS, 5 * CONNECTIONS])
async def test_records_follow_the_waves_and_the_depth_bounds_the_doubt(
    make_service, crm: Crm, events: Events, sink, db, settings, depth: int
) -> None:
    seen: dict[str, int] = {}
    most = 0
    ids: list[int] = []

    async def look(campaign_id: int, batch: int, stage: str) -> None:
        nonlocal most
        seen[stage] = seen.get(stage, 0) + 1
        if ids:
            most = max(most, await _handed_unrecorded(db, ids[0]))

    sink.data_delay = 0.005  # SMTP takes a while: the database work overlaps it
    await make_service(
        batch_size=20, smtp_connections=CONNECTIONS, pipeline_depth=depth, stage_fault=look
    )
    recipients = people(47)
    cid = await crm.campaign(recipients)
    ids.append(cid)
    await crm.start(cid)
    assert (await events.wait(cid, ("sent", "completed_with_errors")))["event"] == "sent"

    # Every stage was passed through; the next wave was handed while one was in flight.
    assert set(seen) == set(STAGES) and seen["prepared"] > 0
    # More than the wave with SMTP is handed ahead, never more than the depth.
    assert CONNECTIONS < most <= depth
    if depth > 2 * CONNECTIONS:
        assert most > 2 * CONNECTIONS  # the depth is used, not just two waves
    # Records in wave order: the send log's rows follow the claim (id) order.
    logged = [
        r["recipient_id"]
        for r in await db.fetch(
            "SELECT recipient_id FROM send_log WHERE campaign_id = $1 ORDER BY id", cid
        )
    ]
    assert logged == sorted(logged) and len(logged) == 47
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert received == Counter(r["email"] for r in recipients)


@pytest.mark.parametrize("stage", STAGES)
async def test_a_crash_at_any_stage_sends_nobody_twice(
    make_service, crm: Crm, events: Events, sink, db, stage: str
) -> None:
    crashes: list[str] = []

    async def crash(campaign_id: int, batch: int, at: str) -> None:
        # Once, in the second batch, at this stage of a wave past its first.
        if batch == 2 and at == stage and not crashes:
            crashes.append(at)
            raise RuntimeError(f"injected crash at {at}")

    await make_service(
        batch_size=10, smtp_connections=CONNECTIONS, stage_fault=crash, monthly_quota=QUOTA
    )
    recipients = people(31)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)

    assert crashes == [stage]
    # An in-process crash records what SMTP answered and gives back what it never got:
    # everybody is sent, once.
    assert done["event"] == "sent", done
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert received == Counter(r["email"] for r in recipients), "each exactly once"
    statuses = await db.fetch(
        "SELECT status, count(*) AS n FROM recipient WHERE campaign_id = $1 GROUP BY 1", cid
    )
    assert {r["status"]: r["n"] for r in statuses} == {"sent": 31}
    dup = await db.fetchval(
        "SELECT count(*) FROM (SELECT recipient_id FROM send_log WHERE campaign_id = $1"
        " GROUP BY recipient_id HAVING count(*) > 1) d",
        cid,
    )
    assert dup == 0
    # The crashed batch's tokens never given to SMTP (its unsent waves, the next
    # batch asked for in advance) gave their quota back: exactly the sends are spent.
    assert await db.fetchval("SELECT emails_available FROM quota") == QUOTA - 31


async def test_a_stop_mid_batch_gives_back_the_quota_of_everything_it_did_not_send(
    make_service, crm: Crm, events: Events, sink, db
) -> None:
    """A SIGTERM's stop in the middle of a batch (the next one asked for in advance):
    the claims not sent go back to pending and their quota back to the allowance, so a
    rolling deploy spends on each recipient exactly what its sends cost."""
    stopping: list[asyncio.Future[None]] = []
    stop_began = asyncio.Event()
    services = []

    async def stop_in_second_batch(campaign_id: int, batch: int, at: str) -> None:
        if batch == 2 and at == "prepared" and not stopping:
            stopping.append(asyncio.ensure_future(services[0].stop()))
            stop_began.set()

    sink.data_delay = 0.005
    services.append(
        await make_service(
            batch_size=10,
            smtp_connections=CONNECTIONS,
            stage_fault=stop_in_second_batch,
            monthly_quota=QUOTA,
        )
    )
    recipients = people(40)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    async with asyncio.timeout(30):
        await stop_began.wait()
        await stopping[0]
    sent_by_first = len(sink.messages)
    assert 0 < sent_by_first < 40
    assert await db.fetchval("SELECT emails_available FROM quota") == QUOTA - sent_by_first

    await make_service(batch_size=10, smtp_connections=CONNECTIONS, monthly_quota=QUOTA)
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    assert done["event"] == "sent", done
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert received == Counter(r["email"] for r in recipients), "each exactly once"
    assert await db.fetchval("SELECT emails_available FROM quota") == QUOTA - 40
