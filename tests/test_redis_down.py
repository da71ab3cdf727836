"""Redis dies under a running service: sending fails open, the API throttles fail closed.

This test owns its Redis (a separate redis-server process on a free port) so
that stopping it does not touch the session's shared one.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from mailer import metrics
from mailer.devstack import free_port
from tests.helpers import Crm, Events, people

UNAVAILABLE = "Сервис временно недоступен. Попробуйте позже."


def _launch_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    binary = Path(sys.executable).parent / "redis-server"
    return subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _wait_for_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    if await client.ping():
                        return
                except (redis.ConnectionError, OSError):
                    await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = _launch_redis(port, tmp_path)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
async def own_redis(
    redis_process: tuple[str, subprocess.Popen[bytes]],
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    url, proc = redis_process
    await _wait_for_redis(url)
    yield url, proc


def _fail_open_count() -> float:
    return metrics.RATE_LIMITER_REDIS_ERRORS.labels(policy="fail_open")._value.get()


async def test_sending_goes_on_and_throttles_refuse_when_redis_stops(
    make_service, crm: Crm, events: Events, sink, own_redis
) -> None:
    url, proc = own_redis
    service = await make_service(redis_url=url, batch_size=5)
    sink.data_delay = 0.02  # slow enough that Redis dies mid-campaign
    cid = await crm.campaign(people(60))
    other = await crm.campaign(people(1, "other.example"))
    await crm.start(cid)
    await sink.wait_for(10, timeout=20)

    before = _fail_open_count()
    proc.kill()
    proc.wait()

    # The API throttles fail closed, with the text the manager reads.
    err = await crm.fails("campaign.start", {"campaign_id": other})
    assert err.code == "throttle_backend_unavailable" and err.message == UNAVAILABLE
    err = await crm.fails("campaign.test", {"campaign_id": cid, "email": "me@example.org"})
    assert err.code == "throttle_backend_unavailable" and err.message == UNAVAILABLE
    assert (await crm.get(other))["status"] == "draft"

    # The running campaign fails open: it keeps sending to the end.
    done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
    assert done["event"] == "sent" and done["counts"] == {"sent": 60}
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(
        p["email"] for p in people(60)
    )
    assert _fail_open_count() > before

    # Still ready: without Redis the pod keeps serving (fail open), so its
    # readiness must not take it out of the Service; the body says Redis is down.
    url = f"http://127.0.0.1:{service.http_port}/readyz"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "nats": True,
            "postgres": True,
            "started": True,
            "reported": {"redis": False, "smtp": True},
        }
    # And the dependency gauge, read at scrape time, says the same.
    url = f"http://127.0.0.1:{service.http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert 'mailer_dependency_up{dependency="redis"} 0.0' in await resp.text()


async def test_the_first_request_after_a_redis_restart_is_served(
    make_service, crm: Crm, events: Events, own_redis, tmp_path: Path
) -> None:
    """Redis restarts while the pod idles: its pooled connection is dead, and the next
    command must reconnect instead of failing (a start refused with 503 in production)."""
    url, proc = own_redis
    await make_service(redis_url=url)
    first, second = await crm.campaign(people(1)), await crm.campaign(people(1, "b.example"))
    await crm.start(first)  # the throttle and the governor leave connections in the pool
    await events.wait(first, ("sent",), timeout=20)  # nothing touches Redis from here on

    proc.kill()
    proc.wait()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    again = _launch_redis(port, tmp_path)
    try:
        await _wait_for_redis(url)
        await crm.start(second)  # not throttle_backend_unavailable
        assert (await crm.get(second))["status"] in ("ready", "sending", "sent")
    finally:
        again.kill()
        again.wait()


async def test_a_service_started_without_redis_warns_and_stays_ready(
    make_service, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="mailer.service"):
        service = await make_service(redis_url=dead)
    warnings = [r for r in caplog.records if r.name == "mailer.service"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "Redis does not answer at start" in warnings[0].getMessage()
    base = f"http://127.0.0.1:{service.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["reported"]["redis"] is False
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    assert 'mailer_dependency_up{dependency="redis"} 0.0' in text
    assert 'mailer_dependency_up{dependency="postgres"} 1.0' in text
    assert 'mailer_dependency_up{dependency="nats"} 1.0' in text
