"""The chaos suite's short run: fixed seeds, several ``mailer run`` processes, faults, invariants.

Each round runs three OS processes against its own embedded stack (PostgreSQL, Redis, a
3-node NATS JetStream cluster, the SMTP sink), drives campaigns through the public API and
applies the seed's fault schedule (tests/chaos/schedule.py), then checks the invariants of
tests/chaos/checks.py. A failure prints ``seed=N``, the schedule and what broke; replay it
with ``python bench/chaos.py --rounds 1 --seed N``. Deselect with ``-m 'not chaos'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import pytest

from mailer.bus import Bus
from tests.chaos.driver import ChaosStack, Round, connect, instances_up, recipients_of
from tests.chaos.runner import play
from tests.chaos.schedule import CampaignPlan, Limits, RoundPlan, plan_round
from tests.helpers import Crm, Events

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

# Fixed seeds of the short run: between them every fault kind (see test_seeds_cover_every_kind).
SEEDS = (0, 11)


@pytest.fixture(scope="module")
async def chaos_stack() -> AsyncIterator[ChaosStack]:
    stack = ChaosStack(Path(tempfile.mkdtemp(prefix="mailer-chaos-")))
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


def test_seeds_cover_every_kind() -> None:
    from tests.chaos.schedule import KINDS

    kinds = {f.kind for seed in SEEDS for f in plan_round(seed).faults}
    assert kinds == set(KINDS), set(KINDS) - kinds
    assert plan_round(SEEDS[0]) == plan_round(SEEDS[0]), "a seed is its schedule"


async def test_rolling_restart_of_three_processes_leaves_nobody_in_doubt(
    chaos_stack: ChaosStack, tmp_path: Path
) -> None:
    """SIGTERM one process at a time, each started again before the next, mid-campaign:
    every recipient is sent exactly once and none is left in doubt."""
    plan = RoundPlan(
        seed=0,
        window=0.0,
        processes=3,
        limits=Limits(10_000, 10_000, "nobody", 0),
        campaigns=(CampaignPlan(0, "owner-a", 150, 0, 0, 0, 0, 0),),
    )
    rnd = Round(chaos_stack, plan, tag="rolling", logs=tmp_path)
    sink = chaos_stack.sink
    admin = chaos_stack.stack.endpoints.database_url
    from mailer.db import migrate
    from mailer.devstack import create_database, drop_database
    from mailer.sink import ByLocalPart
    from tests.chaos.driver import LeaderTrack, Processes

    await drop_database(admin, rnd.db_name)
    rnd.dsn = await create_database(admin, rnd.db_name)
    await migrate(rnd.dsn)
    sink.reset()
    sink.hook = ByLocalPart()
    # A slow provider while the processes restart, so that all three restarts land
    # mid-campaign however fast this machine starts a process (at 0.1 s the campaign
    # sometimes ended before the third); a quick one after, so the rest goes at once.
    sink.data_delay = 0.5
    nc = await connect(chaos_stack.nats_urls)
    procs = Processes(rnd._env, 3, tmp_path)
    leaders = LeaderTrack(nc, rnd.prefix)
    leaders.start()
    try:
        for i in range(3):
            await procs.start(i)
        await leaders.wait(timeout=60)
        await instances_up(nc, rnd.prefix, 3, timeout=60)
        crm = Crm(nc, rnd.prefix, user="owner-a")
        events = Events()
        await events.subscribe(nc, rnd.prefix)
        recipients = recipients_of(plan, 0)
        cid = await crm.campaign(recipients, subject="Rolling restart")
        await crm.call("campaign.start", {"campaign_id": cid})
        await sink.wait_for(10, timeout=30)
        stop_times = []
        for i in range(3):
            assert sink.count < len(recipients), "the restarts land mid-campaign"
            p = procs.running(i)
            assert p is not None
            began = time.monotonic()
            code = await procs.signal(p, signal.SIGTERM, wait=30)
            stop_times.append(round(time.monotonic() - began, 2))
            assert code == 0, p.log_path.read_text()[-3000:]
            await procs.start(i)
            await instances_up(nc, rnd.prefix, 3, timeout=60)
        print(f"SIGTERM to exit per process: {stop_times} s")
        sink.data_delay = 0.05
        await events.wait(cid, ("sent", "completed_with_errors"), timeout=120)
    finally:
        await procs.stop_all()
        leaders.stop()
        sink.data_delay = 0.0
        await nc.close()
    conn = await asyncpg.connect(rnd.dsn)
    try:
        counts = dict(
            await conn.fetch(
                "SELECT status, count(*) FROM recipient WHERE campaign_id = $1 GROUP BY status",
                cid,
            )
        )
    finally:
        await conn.close()
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    print(f"rolling restart: {counts}, {sum(received.values())} received")
    assert counts == {"sent": len(recipients)}, counts
    assert received == Counter(r["email"] for r in recipients), "each exactly once"
    await rnd.drop()


async def test_a_process_started_while_jetstream_has_no_quorum_waits_and_comes_up(
    chaos_stack: ChaosStack, tmp_path: Path
) -> None:
    """Two of three NATS nodes down: core NATS answers, JetStream has no meta leader, so
    the events stream and the actors' buckets cannot be had. A process starting then
    waits for them within MAILER_STARTUP_TIMEOUT_SECONDS (exit 3 only past it) instead of
    exiting 1 as if its supervisor had given up (long run seeds 5003, 5055, 5067, 5068)."""
    plan = RoundPlan(
        seed=0,
        window=0.0,
        processes=1,
        limits=Limits(10_000, 10_000, "nobody", 0),
        campaigns=(),
    )
    rnd = Round(chaos_stack, plan, tag="quorum", logs=tmp_path)
    admin = chaos_stack.stack.endpoints.database_url
    from mailer.db import migrate
    from mailer.devstack import create_database, drop_database
    from tests.chaos.driver import Processes

    await drop_database(admin, rnd.db_name)
    rnd.dsn = await create_database(admin, rnd.db_name)
    await migrate(rnd.dsn)
    nc = await connect(chaos_stack.nats_urls[:1])
    procs = Processes(rnd._env, 1, tmp_path)
    stack = chaos_stack.stack
    try:
        for node in ("nats-1", "nats-2"):
            await stack.stop_server(node)
        p = await procs.start(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.proc.wait(), 6)
        log = p.log_path.read_text(errors="replace")
        assert p.proc.returncode is None, log[-3000:]
        assert "waiting for nats" in log, log[-3000:]
        for node in ("nats-1", "nats-2"):
            await stack.start_server(node)
        await instances_up(nc, rnd.prefix, 1, timeout=60)
        assert p.proc.returncode is None
    finally:
        for node in ("nats-1", "nats-2"):
            await stack.start_server(node)
        await procs.stop_all()
        await nc.close()
    await rnd.drop()


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_round(chaos_stack: ChaosStack, seed: int) -> None:
    plan = plan_round(seed)
    # Not tmp_path: pytest keeps only its last three base dirs, and a failed round's
    # process logs are what one reads next.
    logs = chaos_stack.var / "logs" / f"seed-{seed}"
    verdict = await play(chaos_stack, plan, tag=f"{seed}-t", logs=logs, settle=60)
    print(verdict.report())
    assert not verdict.violations, f"seed={seed} (process logs in {logs})\n{verdict.report()}"


async def test_bus_reaches_a_cluster_given_as_comma_separated_urls(
    chaos_stack: ChaosStack,
) -> None:
    urls = chaos_stack.stack.endpoints.nats_url
    assert urls.count(",") == 2
    bus = Bus(urls, prefix="bus-cluster", name="bus-cluster-test")
    await bus.connect()
    try:

        async def echo(msg) -> None:
            await msg.respond(msg.data)

        await bus.nc.subscribe("bus-cluster.echo", cb=echo)
        assert (await bus.nc.request("bus-cluster.echo", b"1", timeout=5)).data == b"1"
        # The node it talks to goes away: it goes on through another of the list.
        port = bus.nc.connected_url.port
        node = next(f"nats-{i}" for i, u in enumerate(urls.split(",")) if u.endswith(f":{port}"))
        await chaos_stack.stack.stop_server(node)
        try:
            # Requests made while it reconnects wait in its buffer or time out: ask again.
            async with asyncio.timeout(20):
                while True:
                    try:
                        reply = await bus.nc.request("bus-cluster.echo", b"2", timeout=1)
                        break
                    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                        continue
            assert reply.data == b"2"
            assert bus.nc.connected_url.port != port
        finally:
            await chaos_stack.stack.start_server(node)
    finally:
        await bus.close()


async def test_a_restarted_server_keeps_its_port_and_postgres_its_data(
    chaos_stack: ChaosStack,
) -> None:
    import redis.asyncio as redis

    from mailer.devstack import create_database, drop_database

    stack = chaos_stack.stack
    e = stack.endpoints
    dsn = await create_database(e.database_url, "restart_keeps")
    r = redis.Redis.from_url(e.redis_url)
    try:
        await r.set("k", "v")
        before = stack.pids()
        await stack.restart_server("postgres", down=0.2)
        await stack.restart_server("redis")
        after = stack.pids()
        assert after["postgres"] != before["postgres"] and after["redis"] != before["redis"]
        assert stack.endpoints == e, "same ports"
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT 1") == 1  # the database survived
        await conn.close()
        await r.aclose()
        r = redis.Redis.from_url(e.redis_url)  # its connection was closed by the restart
        assert await r.get("k") is None, "Redis comes back empty"
        with pytest.raises(ValueError, match="no embedded server"):
            await stack.stop_server("smtp")
    finally:
        await r.aclose()
        await drop_database(e.database_url, "restart_keeps")
