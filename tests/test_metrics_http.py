"""Metric declarations and the operational HTTP server (/metrics, /healthz, /readyz)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mailer import metrics
from mailer.http import HttpServer
from mailer.service import Service
from mailer.sink import PERMANENT_FAILURE, SmtpSink
from tests.conftest import MakeService
from tests.helpers import Crm, Events, people

EXPECTED_FAMILIES = {
    # name as the text parser reports it (counters lose their _total suffix)
    "mailer_emails_sent": "counter",
    "mailer_emails_failed": "counter",
    "mailer_send_duration_seconds": "histogram",
    "mailer_tokens_granted": "counter",
    "mailer_tokens_denied": "counter",
    "mailer_rate_limiter_redis_errors": "counter",
    "mailer_actor_mailbox_depth": "gauge",
    "mailer_actor_mailbox_full": "counter",
    "mailer_actor_restarts": "counter",
    "mailer_campaigns_active": "gauge",
    "mailer_queue_depth": "gauge",
    "mailer_leader": "gauge",
    "mailer_defers": "counter",
    "mailer_circuit_breaker_state": "gauge",
    "mailer_processing_seconds": "histogram",
    "mailer_processing_oldest_seconds": "gauge",
    "mailer_build_info": "gauge",  # an Info is a gauge in the classic text format
}


def test_all_metrics_are_declared_with_help() -> None:
    body, content_type = metrics.render_latest()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].documentation, name


def test_series_are_precreated_for_alerts() -> None:
    value = REGISTRY.get_sample_value
    assert value("mailer_emails_sent_total", {"kind": "campaign"}) is not None
    assert value("mailer_emails_failed_total", {"kind": "test", "reason": "in_doubt"}) is not None
    assert value("mailer_rate_limiter_redis_errors_total", {"policy": "fail_open"}) is not None
    assert value("mailer_defers_total", {"reason": "quota_exhausted"}) is not None
    build = [s for m in REGISTRY.collect() for s in m.samples if s.name == "mailer_build_info"]
    assert len(build) == 1
    assert build[0].labels["version"]


async def test_a_campaign_moves_the_send_counters(
    make_service: MakeService, crm: Crm, events: Events, sink: SmtpSink
) -> None:
    """Counted by the campaign actor as outcomes are recorded; read from the service's /metrics."""
    service = await make_service()
    recipients = people(6)
    sink.fail(recipients[4]["email"], PERMANENT_FAILURE)
    before = await _scrape(service)
    cid = await crm.campaign(recipients)
    await crm.start(cid)
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "completed_with_errors"
    after = await _scrape(service)
    assert _moved(before, after) == {
        ("mailer_emails_sent_total", (("kind", "campaign"),)): 5,
        ("mailer_emails_failed_total", (("kind", "campaign"), ("reason", "permanent"))): 1,
    }
    # What the server shows is the process's registry.
    sent = REGISTRY.get_sample_value("mailer_emails_sent_total", {"kind": "campaign"})
    assert after[("mailer_emails_sent_total", (("kind", "campaign"),))] == sent


async def test_test_emails_move_the_test_counters(
    make_service: MakeService, crm: Crm, sink: SmtpSink
) -> None:
    service = await make_service()
    cid = await crm.campaign(people(1))
    before = await _scrape(service)
    await crm.call("campaign.test", {"campaign_id": cid, "email": "boss@example.org"})
    after = await _scrape(service)
    assert _moved(before, after) == {("mailer_emails_sent_total", (("kind", "test"),)): 1}

    sink.fail("nobody@example.org", PERMANENT_FAILURE)
    err = await crm.fails("campaign.test", {"campaign_id": cid, "email": "nobody@example.org"})
    assert err.code == "test_email_failed"
    assert _moved(after, await _scrape(service)) == {
        ("mailer_emails_failed_total", (("kind", "test"), ("reason", "permanent"))): 1
    }


async def test_a_running_service_serves_health_and_metrics(make_service: MakeService) -> None:
    service = await make_service()
    assert service.http_port
    base = f"http://127.0.0.1:{service.http_port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 200
            ready = await resp.json()
            assert ready["nats"] is True and ready["postgres"] is True
        async with session.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(EXPECTED_FAMILIES) <= set(families)
    # The service's own actors are there (the mailbox depth is read at scrape).
    depth = {s.labels["actor"] for s in families["mailer_actor_mailbox_depth"].samples}
    assert {"rate-governor", "api", "scheduler"} <= depth


async def _scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the service's /metrics, by name and labels."""
    url = f"http://127.0.0.1:{service.http_port}/metrics"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _moved(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    """How the email counters moved between two scrapes (only those that did)."""
    names = ("mailer_emails_sent_total", "mailer_emails_failed_total")
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if key[0] in names and after[key] != before.get(key, 0.0)
    }


def test_no_created_series() -> None:
    body, _ = metrics.render_latest()
    assert b"_created" not in body


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("campaign-123", "campaign"),
        ("campaign-42-retry", "campaign"),
        ("campaign:550e8400-e29b-41d4-a716-446655440000", "campaign"),
        ("campaign_0a1b2c3d4e", "campaign"),
        ("rate-governor", "rate-governor"),
        ("scheduler", "scheduler"),
        ("smtp-pool-2", "smtp-pool"),
        ("s3-uploader", "s3-uploader"),
        ("123", "unnamed"),
    ],
)
def test_actor_kind(name: str, kind: str) -> None:
    assert metrics.actor_kind(name) == kind


def test_mailbox_depth_is_summed_per_kind_at_scrape() -> None:
    depths = {"campaign-1": 3, "campaign-2": 4, "rate-governor": 1}
    for name, depth in depths.items():
        metrics.register_mailbox(name, functools.partial(int, depth))

    def broken() -> int:
        raise RuntimeError("mailbox gone")

    metrics.register_mailbox("scheduler", broken)
    try:
        value = REGISTRY.get_sample_value
        assert value("mailer_actor_mailbox_depth", {"actor": "campaign"}) == 7
        assert value("mailer_actor_mailbox_depth", {"actor": "rate-governor"}) == 1
        assert value("mailer_actor_mailbox_depth", {"actor": "scheduler"}) is None
        metrics.unregister_mailbox("campaign-2")
        assert value("mailer_actor_mailbox_depth", {"actor": "campaign"}) == 3
    finally:
        for name in [*depths, "scheduler"]:
            metrics.unregister_mailbox(name)
    assert REGISTRY.get_sample_value("mailer_actor_mailbox_depth", {"actor": "campaign"}) is None


def test_render_latest_negotiates_openmetrics() -> None:
    body, content_type = metrics.render_latest("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# -- HTTP server --------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.result: dict[str, bool] = {"nats": True, "postgres": True, "redis": True}
        self.delay = 0.0
        self.error: Exception | None = None

    async def __call__(self) -> dict[str, bool]:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return dict(self.result)


@pytest.fixture
async def checks() -> Checks:
    return Checks()


@pytest.fixture
async def server(checks: Checks) -> AsyncIterator[HttpServer]:
    srv = HttpServer("127.0.0.1", 0, readiness=checks, readiness_timeout=0.2)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    srv.add_routes([web.get("/unsubscribe", hello)])
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def _url(srv: HttpServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.port}{path}"


async def test_port_zero_picks_a_free_port(server: HttpServer) -> None:
    assert server.port > 0


async def test_healthz(server: HttpServer, client: aiohttp.ClientSession) -> None:
    async with client.get(_url(server, "/healthz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_readyz_ok(server: HttpServer, client: aiohttp.ClientSession) -> None:
    async with client.get(_url(server, "/readyz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"nats": True, "postgres": True, "redis": True}


async def test_readyz_503_when_a_check_fails(
    server: HttpServer, client: aiohttp.ClientSession, checks: Checks
) -> None:
    checks.result["redis"] = False
    async with client.get(_url(server, "/readyz")) as resp:
        assert resp.status == 503
        assert await resp.json() == {"nats": True, "postgres": True, "redis": False}


async def test_readyz_503_when_the_check_raises_or_hangs(
    server: HttpServer, client: aiohttp.ClientSession, checks: Checks
) -> None:
    checks.error = ConnectionError("postgres down")
    async with client.get(_url(server, "/readyz")) as resp:
        assert resp.status == 503
    checks.error = None
    checks.delay = 5.0
    async with client.get(_url(server, "/readyz")) as resp:
        assert resp.status == 503
        assert await resp.json() == {"readiness": False}


async def test_metrics_endpoint(server: HttpServer, client: aiohttp.ClientSession) -> None:
    async with client.get(_url(server, "/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert "mailer_emails_sent_total" in text
    assert "# HELP mailer_queue_depth" in text


async def test_added_routes_are_served(server: HttpServer, client: aiohttp.ClientSession) -> None:
    async with client.get(_url(server, "/unsubscribe")) as resp:
        assert resp.status == 200
        assert await resp.text() == "hello"

    async def late(request: web.Request) -> web.Response:
        return web.Response()

    with pytest.raises(RuntimeError, match="before start"):
        server.add_routes([web.get("/late", late)])


async def test_stop_is_idempotent_and_closes_the_port(checks: Checks) -> None:
    srv = HttpServer("127.0.0.1", 0, readiness=checks)
    await srv.stop()  # before start: no-op
    await srv.start()
    port = srv.port
    await srv.stop()
    await srv.stop()
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
