"""The API is a NATS micro service: $SRV.PING / INFO / STATS find it and every endpoint."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client
from prometheus_client import REGISTRY

from mailer.api.routes import routes
from tests.helpers import Crm


async def _ours(nc: Client, subject: str, prefix: str) -> dict[str, Any]:
    """Publishes a discovery request; returns the reply of this test's service.

    The NATS server is shared by the session, so other services may answer
    too; ours is the one whose metadata names this test's subject prefix.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=5)
            data: dict[str, Any] = json.loads(msg.data)
            if data.get("metadata", {}).get("subject_prefix") == prefix:
                return data
    finally:
        await sub.unsubscribe()


async def test_discovery_lists_the_service_and_every_endpoint(
    make_service, nc: Client, crm: Crm, settings
) -> None:
    await make_service()
    prefix = settings.subject_prefix
    for ping_subject in ("$SRV.PING", "$SRV.PING.mailer"):
        ping = await _ours(nc, ping_subject, prefix)
        assert ping["name"] == "mailer" and ping["type"] == "io.nats.micro.v1.ping_response"
    service_id = ping["id"]

    info = json.loads((await nc.request(f"$SRV.INFO.mailer.{service_id}", b"", timeout=5)).data)
    assert info["description"] == "Email campaigns of the CRM"
    listed = {e["name"]: e["subject"] for e in info["endpoints"]}
    expected = {r.name: f"{prefix}.{r.subject}" for r in routes(settings)}
    assert listed == expected
    assert len(expected) == 34
    assert all(e["queue_group"] == "q" for e in info["endpoints"])

    await crm.call("quota.get", {})
    await crm.fails("campaign.get", {"campaign_id": 1})
    stats = json.loads((await nc.request(f"$SRV.STATS.mailer.{service_id}", b"", timeout=5)).data)
    by_name = {e["name"]: e for e in stats["endpoints"]}
    assert set(by_name) == set(expected)
    assert by_name["quota-get"]["num_requests"] == 1
    assert by_name["campaign-get"]["num_requests"] == 1


def _api_count(subject: str, code: str) -> float:
    return (
        REGISTRY.get_sample_value("mailer_api_requests_total", {"subject": subject, "code": code})
        or 0.0
    )


def _api_latencies(subject: str) -> float:
    labels = {"subject": subject}
    return REGISTRY.get_sample_value("mailer_api_request_duration_seconds_count", labels) or 0.0


async def test_error_replies_count_in_micro_stats_and_in_metrics(
    make_service, nc: Client, crm: Crm, settings
) -> None:
    await make_service()
    ping = await _ours(nc, "$SRV.PING.mailer", settings.subject_prefix)
    before = {
        ("campaign.get", "ok"): _api_count("campaign.get", "ok"),
        ("campaign.get", "not_found"): _api_count("campaign.get", "not_found"),
        ("campaign.get", "validation_error"): _api_count("campaign.get", "validation_error"),
        ("quota.get", "ok"): _api_count("quota.get", "ok"),
    }
    latencies = _api_latencies("campaign.get")

    await crm.call("quota.get", {})
    err = await crm.fails("campaign.get", {"campaign_id": 999})
    assert err.code == "not_found" and err.status == 404  # the JSON body and the headers
    err = await crm.fails("campaign.get", {"campaign_id": "x"})
    assert err.code == "validation_error" and err.message
    cid = await crm.campaign([{"email": "a@example.org"}])
    await crm.call("campaign.get", {"campaign_id": cid})

    stats = json.loads((await nc.request(f"$SRV.STATS.mailer.{ping['id']}", b"", timeout=5)).data)
    by_name = {e["name"]: e for e in stats["endpoints"]}
    assert by_name["campaign-get"]["num_requests"] == 3
    assert by_name["campaign-get"]["num_errors"] == 2
    assert by_name["campaign-get"]["last_error"]
    assert by_name["quota-get"]["num_errors"] == 0

    moved = {key: _api_count(*key) - value for key, value in before.items()}
    assert moved == {
        ("campaign.get", "ok"): 1,
        ("campaign.get", "not_found"): 1,
        ("campaign.get", "validation_error"): 1,
        ("quota.get", "ok"): 1,
    }
    assert _api_latencies("campaign.get") - latencies == 3
