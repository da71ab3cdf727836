"""Failure paths of the connections: PostgreSQL dropping every connection
(what a restart looks like from here) and NATS going away and coming back.

Policy under test (README, "Failure policies"): pool connections are replaced;
an actor whose query or request failed crashes and is restarted with backoff;
the database is the checkpoint, so the campaign completes and no recipient is
sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from mailer.devstack import free_port
from tests.helpers import Crm, Events, people


async def test_postgres_dropping_every_connection_mid_campaign(
    make_service, crm: Crm, events: Events, sink, db, database_url: str
) -> None:
    await make_service(batch_size=5)
    sink.data_delay = 0.01
    cid = await crm.campaign(people(80))
    await crm.start(cid)
    await sink.wait_for(20, timeout=20)

    name = database_url.rsplit("/", 1)[1]
    dropped = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        name,
    )
    assert dropped > 0

    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert max(rcpts.values()) == 1, "nobody twice"
    counts = (await crm.get(cid))["counts"]
    assert counts.get("pending", 0) == 0 and counts.get("sending", 0) == 0
    # Whatever was not recorded as sent is visibly in doubt, never silently lost.
    assert counts.get("sent", 0) + counts.get("in_doubt", 0) == 80
    sent = {
        r["email"]
        for r in await db.fetch(
            "SELECT email FROM recipient WHERE campaign_id = $1 AND status = 'sent'", cid
        )
    }
    assert sent <= set(rcpts)
    assert done["event"] == ("sent" if counts == {"sent": 80} else "completed_with_errors")


class NatsServer:
    """A nats-server of this test's own, which it may stop and start again."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = Path(sys.executable).parent / "nats-server"
        self.proc = subprocess.Popen(
            [str(binary), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "js")
    server.start()
    yield server
    server.stop()


async def _connect(url: str) -> nats.aio.client.Client:
    async with asyncio.timeout(10):
        while True:
            try:
                return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            except Exception:
                await asyncio.sleep(0.1)


async def test_nats_going_away_and_coming_back_mid_campaign(
    own_nats: NatsServer, make_service, settings, sink, db, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="mailer.bus")
    nc = await _connect(own_nats.url)
    await make_service(nats_url=own_nats.url, batch_size=5, leader_ttl_seconds=2.0)
    crm = Crm(nc, settings.subject_prefix)
    events = Events()
    await events.subscribe(nc, settings.subject_prefix)
    await nc.flush()
    sink.data_delay = 0.01
    cid = await crm.campaign(people(80))
    await crm.start(cid)
    await sink.wait_for(20, timeout=20)

    own_nats.stop()
    await asyncio.sleep(1.0)  # an outage of a second: requests in flight fail
    own_nats.start()

    # The service reconnects by itself; the campaign is finished without anyone
    # acting (the final event is published after the outage, so our own
    # subscription, resubscribed on reconnect, sees it).
    await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    rcpts = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert max(rcpts.values()) == 1, "nobody twice"
    counts = (await crm.get(cid))["counts"]
    assert counts.get("pending", 0) == 0 and counts.get("sending", 0) == 0
    assert counts.get("sent", 0) + counts.get("in_doubt", 0) == 80
    # The outage was real, and seen: the service's connection logged it.
    assert any(r.getMessage() == "nats disconnected" for r in caplog.records)
    assert any(r.getMessage() == "nats reconnected" for r in caplog.records)
    # Through our backoff: each try waited, and the waits are logged.
    tries = [r for r in caplog.records if r.getMessage() == "nats reconnecting"]
    assert tries and all(0 < getattr(r, "wait_seconds", 0) <= 5.0 for r in tries)
    await nc.close()


def test_reconnect_backoff_doubles_with_jitter_up_to_five_seconds() -> None:
    from mailer.bus import reconnect_delay

    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (50, 5.0)]:
        waits = [reconnect_delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > ceiling / 10  # jittered, not one fixed wait
