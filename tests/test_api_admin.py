"""Unsubscribes, the quota and the audit log through the public API."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from mailer.actors.api import ApiActor
from mailer.api import admin
from mailer.api.context import Caller
from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER, Bus
from mailer.clock import FakeClock
from mailer.errors import ApiError
from mailer.messages import CampaignEvent, ErrorBody, ErrorReply, QuotaRef, QuotaView
from tests.helpers import Crm, Events, people

ADMIN = {"user": "root", "roles": "admin"}


async def test_unsubscribes(make_service, crm: Crm, db) -> None:
    await make_service()
    err = await crm.fails("unsubscribe.add", {"email": "anna@example.org"})
    assert err.code == "forbidden"
    assert err.message == "Недостаточно прав: это действие доступно только администратору."

    added = await crm.call(
        "unsubscribe.add", {"email": "Anna@Example.org", "source": "crm-import"}, **ADMIN
    )
    assert added["email"] == "anna@example.org" and added["unsubscribed"] is True
    assert added["source"] == "crm-import"
    # Again: the first source and time stay.
    again = await crm.call("unsubscribe.add", {"email": "anna@example.org"}, **ADMIN)
    assert again == added

    # Anyone may check.
    assert (await crm.call("unsubscribe.check", {"email": "ANNA@example.org"}))["unsubscribed"]
    assert not (await crm.call("unsubscribe.check", {"email": "b@example.org"}))["unsubscribed"]
    err = await crm.fails("unsubscribe.check", {"email": "nope"})
    assert err.code == "validation_error"

    for i in range(3):
        await crm.call("unsubscribe.add", {"email": f"z{i}@example.org"}, **ADMIN)
    assert (await crm.fails("unsubscribe.list", {})).code == "forbidden"
    page = await crm.call("unsubscribe.list", {"limit": 3}, **ADMIN)
    assert [u["email"] for u in page["items"]] == [
        "anna@example.org",
        "z0@example.org",
        "z1@example.org",
    ]
    rest = await crm.call("unsubscribe.list", {"cursor": page["next_cursor"]}, **ADMIN)
    assert [u["email"] for u in rest["items"]] == ["z2@example.org"]

    assert (await crm.fails("unsubscribe.remove", {"email": "anna@example.org"})).code == (
        "forbidden"
    )
    removed = await crm.call("unsubscribe.remove", {"email": "anna@example.org"}, **ADMIN)
    assert removed == {"email": "anna@example.org", "removed": True}
    assert not (await crm.call("unsubscribe.check", {"email": "anna@example.org"}))["unsubscribed"]
    actions = [r["action"] for r in await db.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["unsubscribe.add"] * 4 + ["unsubscribe.remove"]


async def test_quota_get_and_sync(make_service, crm: Crm, db, settings, redis_client) -> None:
    service = await make_service()
    quota = await crm.call("quota.get", {})
    assert set(quota) == {
        "emails_available",
        "monthly_limit",
        "last_synced_at",
        "sync_error",
        "account",
    }
    assert quota["account"] == "default"  # MAILER_SMTP_ACCOUNT: the one account's name
    assert (await crm.fails("quota.sync", {})).code == "forbidden"
    assert (await crm.fails("quota.get", {"x": 1})).code == "validation_error"

    # The operation itself, on a prefix of its own: whether the service wires a
    # syncer or not, these paths are exactly the ones asserted.
    lonely = Bus(settings.nats_url, prefix=f"{settings.subject_prefix}-nosync", name="t")
    await lonely.connect()
    try:
        ctx = ApiActor(
            bus=lonely,
            store=service.store,
            clock=service.clock,
            settings=settings,
            redis_client=redis_client,
            sender=None,
            events=_NoEvents(),
            version="0.0.0",
        ).context
        caller = _admin()
        with pytest.raises(ApiError) as caught:
            await admin.quota_sync(ctx, caller, QuotaRef())
        assert caught.value.code == "quota_sync_unavailable" and caught.value.status == 503

        async def syncer(msg) -> None:
            request = msgspec.json.decode(msg.data)
            if request["requested_by"] == "fail":
                body = ErrorReply(error=ErrorBody(code="provider", message="provider said 401"))
                await lonely.nc.publish(
                    msg.reply,
                    msgspec.json.encode(body),
                    headers={ERROR_CODE_HEADER: "502", ERROR_HEADER: "provider said 401"},
                )
                return
            row = await db.fetchrow(
                "UPDATE quota SET emails_available = 1234, last_synced_at = now() RETURNING *"
            )
            await msg.respond(msgspec.json.encode({k: row[k] for k in QuotaView.__struct_fields__}))

        await lonely.nc.subscribe(lonely.subject("internal", "quota", "sync"), cb=syncer)
        await lonely.nc.flush()
        fresh = await admin.quota_sync(ctx, caller, QuotaRef())
        assert fresh.emails_available == 1234 and fresh.last_synced_at is not None
        with pytest.raises(ApiError) as caught:
            await admin.quota_sync(ctx, msgspec.structs.replace(caller, user="fail"), QuotaRef())
        assert caught.value.code == "quota_sync_failed"
        assert caught.value.values["detail"] == "provider said 401"
    finally:
        await lonely.close()
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'quota.sync'") == 1


async def _first_sync_done(db) -> None:
    """The quota syncer syncs once when it starts; the tests change the row after that."""
    for _ in range(500):
        if await db.fetchval("SELECT last_synced_at FROM quota") is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the quota syncer never synced on start")


async def test_quota_sync_over_nats_by_the_running_syncer(make_service, crm: Crm, db) -> None:
    """quota.sync from a CRM caller reaches the service's own QuotaSyncActor (local provider)."""
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    await make_service(clock=clock, monthly_quota=500)
    await _first_sync_done(db)
    # What the provider will count this month: sent and in-doubt attempts (test
    # emails too); not failures, not last month.
    sends = [
        ("sent", False, clock.now()),
        ("sent", True, clock.now()),
        ("in_doubt", False, clock.now()),
        ("failed", False, clock.now()),
        ("sent", False, datetime(2026, 10, 31, 12, 0, tzinfo=UTC)),
    ]
    for status, is_test, at in sends:
        await db.execute(
            "INSERT INTO send_log (email, is_test, status, created_at) "
            "VALUES ('a@example.org', $1, $2, $3)",
            is_test,
            status,
            at,
        )
    # A stored value the provider's count will replace, and a stale error.
    await db.execute(
        "UPDATE quota SET emails_available = 7, last_synced_at = NULL, sync_error = 'old'"
    )
    clock.advance(timedelta(minutes=5))

    err = await crm.fails("quota.sync", {})
    assert err.code == "forbidden" and err.status == 403
    assert await db.fetchval("SELECT emails_available FROM quota") == 7

    fresh = await crm.call("quota.sync", {}, **ADMIN)
    assert fresh == {
        "emails_available": 497,
        "monthly_limit": 500,
        "last_synced_at": "2026-11-23T10:20:00Z",
        "sync_error": None,
        "account": "default",
    }
    row = await db.fetchrow("SELECT * FROM quota")
    assert row["emails_available"] == 497 and row["sync_error"] is None
    assert row["last_synced_at"] == clock.now()
    assert await crm.call("quota.get", {}) == fresh
    audit = await db.fetch(
        "SELECT at, actor_id, campaign_id, details FROM audit_log WHERE action = 'quota.sync'"
    )
    assert [
        (a["at"], a["actor_id"], a["campaign_id"], json.loads(a["details"])) for a in audit
    ] == [(clock.now(), "root", None, {})]


async def test_quota_sync_over_nats_says_when_the_provider_failed(
    make_service, crm: Crm, db
) -> None:
    # The provider's API is a port nobody listens on: every sync fails there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1/user"
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    await make_service(clock=clock, quota_provider="http", quota_http_url=dead)
    await db.execute("UPDATE quota SET emails_available = 42, sync_error = NULL")

    err = await crm.fails("quota.sync", {}, **ADMIN)
    assert err.code == "quota_sync_failed" and err.status == 502
    assert err.message.startswith("Не удалось синхронизировать квоту: ")
    assert "ClientConnectorError" in err.message or "Connect" in err.message
    # The last good number stays; the error is recorded for the operator.
    row = await db.fetchrow("SELECT emails_available, sync_error FROM quota")
    assert row["emails_available"] == 42 and row["sync_error"]
    details = await db.fetchval(
        "SELECT details FROM audit_log WHERE action = 'quota.sync' ORDER BY id DESC LIMIT 1"
    )
    assert json.loads(details)["error"] == row["sync_error"]


async def test_quota_sync_over_nats_resumes_a_campaign_waiting_for_quota(
    make_service, crm: Crm, db, events: Events, sink
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    await make_service(clock=clock, monthly_quota=500)
    await _first_sync_done(db)
    await db.execute("UPDATE quota SET emails_available = 0")
    cid = await crm.campaign(people(2))
    started = await crm.start(cid)
    assert [w["code"] for w in started["warnings"]] == ["quota_exhausted"]
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "quota_exhausted" and not sink.messages

    fresh = await crm.call("quota.sync", {}, **ADMIN)
    assert fresh["emails_available"] == 500
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent" and len(sink.messages) == 2
    assert await db.fetchval("SELECT emails_available FROM quota") == 498


async def test_audit_list(make_service, crm: Crm) -> None:
    await make_service()
    cid = await crm.campaign([{"email": "a@example.org"}])
    for i in range(3):
        await crm.call("campaign.update", {"campaign_id": cid, "priority": i})
    page = await crm.call("audit.list", {"campaign_id": cid, "limit": 3})
    assert [e["action"] for e in page["items"]] == [
        "campaign.create",
        "recipients.add",
        "campaign.update",
    ]
    assert page["items"][1]["details"] == {"count": 1, "duplicates": 0}
    assert page["items"][2]["details"] == {"fields": ["priority"]}
    assert page["items"][0]["actor_id"] == "manager-1"
    rest = await crm.call("audit.list", {"campaign_id": cid, "cursor": page["next_cursor"]})
    assert len(rest["items"]) == 2 and rest["next_cursor"] is None
    assert (await crm.fails("audit.list", {"campaign_id": cid}, user="x")).code == "forbidden"


def _admin() -> Caller:
    return Caller(user="root", roles=frozenset({"admin"}), lang="ru")


class _NoEvents:
    async def emit(self, event: CampaignEvent) -> None:
        pass
