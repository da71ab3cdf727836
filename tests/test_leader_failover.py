"""The leader lease under change and loss: config drift, a lost bucket, failover times.

Policy under test (README, "Failure policies"): the lease
bucket is created or updated to the configured TTL and replicas; the fencing
token comes from PostgreSQL and only grows, whatever happens to the bucket; a
graceful stop hands leadership over within a second even while the old leader
is sending, and after a kill -9 a follower leads within the TTL plus a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mailer.actors.leader import KEY, bucket_name
from mailer.config import Settings
from mailer.service import Service
from tests.helpers import Crm, Events, LeaderWatch, people, worker_env

pytestmark = pytest.mark.timeout(120)


async def _new_epoch(service: Service, above: int, timeout: float) -> int:
    """Waits until ``service`` leads with an epoch above ``above``."""
    async with asyncio.timeout(timeout):
        return await service.wait_leading(above)


async def test_a_changed_leader_ttl_updates_the_bucket_and_the_new_pod_starts(
    make_service, nc, settings: Settings
) -> None:
    old = await make_service(leader_ttl_seconds=3.0)
    async with asyncio.timeout(15):
        await old.leadership.wait()
    # A rollout with another TTL: the new pod starts while the old one still runs.
    new = await make_service(leader_ttl_seconds=5.0)
    stream = f"KV_{bucket_name(settings.subject_prefix)}"
    info = await nc.jetstream().stream_info(stream)
    assert info.config.max_age == 5.0
    assert info.config.num_replicas == 1  # MAILER_NATS_REPLICAS
    assert info.config.max_msgs_per_subject == 1
    await old.stop()
    async with asyncio.timeout(15):
        await new.leadership.wait()


async def test_the_lease_bucket_deleted_under_the_leader_a_new_one_leads_and_sends(
    make_service, nc, settings: Settings, crm: Crm, events: Events, sink, db
) -> None:
    # Many elections ago: the fence in PostgreSQL is far above what a new
    # bucket's revisions start from.
    await db.execute("UPDATE leader_fence SET epoch = 1000")
    service = await make_service()
    before = await _new_epoch(service, 1000, timeout=15)

    js = nc.jetstream()
    await js.delete_key_value(bucket_name(settings.subject_prefix))
    began = time.monotonic()
    epoch = await _new_epoch(service, before, timeout=10)
    print(f"new leadership {time.monotonic() - began:.2f} s after the bucket was deleted")
    assert epoch == before + 1  # from PostgreSQL: it only grows
    kv = await js.key_value(bucket_name(settings.subject_prefix))
    entry = await kv.get(KEY)
    assert entry.revision is not None and entry.revision < before  # NATS started over

    cid = await crm.campaign(people(20))
    await crm.start(cid)
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=30)
    assert done["event"] == "sent"
    assert await db.fetchval("SELECT epoch FROM leader_fence") == service.leader_epoch


class HoldBatch:
    """The campaign fault hook: holds one batch between its send and its record
    until released, so a stop lands while a batch is in flight, every time."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, campaign_id: int, batch: int) -> None:
        if batch == self.batch:
            self.holding.set()
            async with asyncio.timeout(30):
                await self.release.wait()


async def test_a_graceful_stop_of_a_leader_that_is_sending_hands_over_within_a_second(
    make_service, crm: Crm, events: Events, sink
) -> None:
    hold = HoldBatch(batch=2)
    fast = {"batch_size": 10, "rate_per_hour": 100_000}
    first = await make_service(instance_id="first", fault=hold, **fast)
    async with asyncio.timeout(15):
        await first.leadership.wait()
    cid = await crm.campaign(people(100))
    await crm.start(cid)  # first is the only runner: it sends the campaign
    async with asyncio.timeout(30):
        await hold.holding.wait()  # its second batch is sent, not yet recorded
    second = await make_service(instance_id="second", **fast)
    assert not second.leadership.is_set()

    began = time.monotonic()
    stopping = asyncio.ensure_future(first.stop())
    try:
        async with asyncio.timeout(5):
            await second.leadership.wait()
        took = time.monotonic() - began
    finally:
        hold.release.set()  # the batch in flight is recorded, then first drains
    await stopping
    print(f"handover while sending took {took:.3f} s")
    assert took <= 1.0

    # The campaign first gave back is taken over by second and sent to the end.
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    assert done["event"] == "sent", done
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert len(received) == 100 and max(received.values()) == 1


@pytest.fixture
async def os_worker(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[asyncio.subprocess.Process]]]:
    procs: list[tuple[asyncio.subprocess.Process, Path]] = []

    async def start(instance: str, **extra: str) -> asyncio.subprocess.Process:
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
        procs.append((proc, log_path))
        return proc

    yield start
    for proc, log_path in procs:
        print(f"--- {log_path.name} (exit {proc.returncode}) ---")
        print("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]))
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


@pytest.fixture
async def leaders(nc, settings: Settings) -> AsyncIterator[LeaderWatch]:
    watch = LeaderWatch()
    await watch.start(nc, settings.subject_prefix)
    yield watch
    watch.stop()


TTL = 3.0


@pytest.mark.parametrize("follower_starts", ["before the kill", "after the kill"])
async def test_after_kill_9_of_the_leader_a_follower_leads_within_the_ttl_plus_a_second(
    follower_starts: str, os_worker, make_service, leaders: LeaderWatch
) -> None:
    worker = await os_worker("doomed", leader_ttl_seconds=str(TTL))
    assert await leaders.wait(timeout=30) == "doomed"
    follower: Service | None = None
    if follower_starts == "before the kill":
        follower = await make_service(instance_id="follower", leader_ttl_seconds=TTL)
    worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await worker.wait()
    if follower is None:
        # A pod that comes up while the lease of a dead leader runs out (a
        # rollout): it times the expiry from the entry's age, not from its start.
        await asyncio.sleep(TTL / 2)
        follower = await make_service(instance_id="follower", leader_ttl_seconds=TTL)
    async with asyncio.timeout(TTL + 5):
        await follower.leadership.wait()
    took = time.monotonic() - killed
    print(f"follower ({follower_starts}) leads {took:.2f} s after kill -9 (TTL {TTL} s)")
    assert took <= TTL + 1.0
