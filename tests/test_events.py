"""Events on JetStream: the stream, catch-up after downtime, deduplication, failures.

Real NATS with JetStream (the session's embedded server); each test has its own
subject prefix and therefore its own stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from prometheus_client import REGISTRY

from mailer.bus import Bus
from mailer.clock import FakeClock
from mailer.config import Settings
from mailer.events import (
    MSG_ID_HEADER,
    JetStreamEvents,
    UnsubscribeEvent,
    notification_for,
    owner_token,
    stream_name,
)
from mailer.messages import CampaignEvent, Notice
from tests.conftest import MakeService
from tests.helpers import Crm, Events, people

# JetStream reserves a stream's byte cap on disk: tests keep theirs small.
SMALL = 8 * 1024 * 1024

AT = datetime(2026, 11, 23, 7, 15, tzinfo=UTC)  # 10:15 in Moscow


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = Bus(settings.nats_url, prefix=settings.subject_prefix, name="test-events")
    await b.connect()
    yield b
    await b.close()


@pytest.fixture
async def js_events(bus: Bus, nc: Client) -> AsyncIterator[JetStreamEvents]:
    events = JetStreamEvents(bus, max_bytes=SMALL)
    await events.ensure_stream()
    yield events
    # Streams live on the session's server: drop this test's one.
    await nc.jetstream().delete_stream(events.stream)


def deferred(campaign_id: int = 7, owner: str = "manager-1", **kw: Any) -> CampaignEvent:
    fields: dict[str, Any] = {
        "event": "deferred",
        "campaign_id": campaign_id,
        "owner_id": owner,
        "status": "sending",
        "at": AT,
        "defer_reason": "rate_per_hour",
        "deferred_until": datetime(2026, 11, 23, 8, 0, tzinfo=UTC),
        "details": {"limit": "100", "used": "100"},
    }
    fields.update(kw)
    return CampaignEvent(**fields)


def _notice(events: JetStreamEvents, event: CampaignEvent) -> Notice:
    notice = events.notice(event)
    assert notice is not None
    return notice


async def fetch_all(nc: Client, stream: str, subject: str, durable: str) -> list[Msg]:
    """Everything a durable consumer created now receives, from the stream's start."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=stream,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    info = await js.stream_info(stream)
    got: list[Msg] = []
    while len(got) < info.state.messages:
        batch = await sub.fetch(info.state.messages - len(got), timeout=5)
        for msg in batch:
            await msg.ack()
        got.extend(batch)
    await sub.unsubscribe()
    return got


def failures(kind: str) -> float:
    value = REGISTRY.get_sample_value("mailer_events_publish_failures_total", {"kind": kind})
    return value or 0.0


async def test_stream_is_created_once_and_brought_to_the_configured_limits(
    bus: Bus, nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    events = JetStreamEvents(bus, max_age_seconds=3600, max_bytes=SMALL)
    try:
        info = await events.ensure_stream()
        assert events.stream == stream_name(settings.subject_prefix)
        assert info.config.name == "MAILER_EVENTS_" + settings.subject_prefix.replace(".", "_")
        assert info.config.subjects == [f"{settings.subject_prefix}.events.>"]
        assert info.config.storage == api.StorageType.FILE
        assert info.config.max_age == 3600

        # A second pod starting with the same configuration: no error, same stream.
        again = await JetStreamEvents(bus, max_age_seconds=3600, max_bytes=SMALL).ensure_stream()
        assert again.created == info.created

        # A new release with other limits updates the stream in place.
        changed = await JetStreamEvents(bus, max_age_seconds=7200, max_bytes=SMALL).ensure_stream()
        assert changed.created == info.created
        assert changed.config.max_age == 7200
        assert (await js.stream_info(events.stream)).config.max_age == 7200
    finally:
        await js.delete_stream(events.stream)


def test_stream_name_from_prefix() -> None:
    assert stream_name("t3.mailer") == "MAILER_EVENTS_t3_mailer"
    assert stream_name("mailer") == "MAILER_EVENTS_mailer"


async def test_consumer_created_after_the_events_catches_up(
    js_events: JetStreamEvents, nc: Client, settings: Settings
) -> None:
    p = settings.subject_prefix
    started = CampaignEvent(
        event="started", campaign_id=7, owner_id="ivan.petrov", status="sending", at=AT
    )
    later = deferred(owner="ivan.petrov")
    gone = UnsubscribeEvent(
        email="Anna@Example.org",
        email_hash="0123456789abcdef",
        email_domain="example.org",
        source="link",
        campaign_id=7,
        at=AT,
    )
    # Published while no consumer exists at all (the CRM side is down).
    await js_events.emit(started)
    await js_events.emit(later)
    await js_events.publish_notice(_notice(js_events, later))
    await js_events.unsubscribed(gone)

    got = await fetch_all(nc, js_events.stream, f"{p}.events.>", "crm-catch-up")

    assert [m.subject for m in got] == [
        f"{p}.events.campaign.started",
        f"{p}.events.campaign.deferred",
        f"{p}.events.notify.ivan%2Epetrov",
        f"{p}.events.unsubscribe",
    ]
    assert msgspec.json.decode(got[0].data, type=CampaignEvent) == started
    assert msgspec.json.decode(got[1].data, type=CampaignEvent) == later
    note = msgspec.json.decode(got[2].data)
    assert note == {
        "owner_id": "ivan.petrov",
        "campaign_id": 7,
        "kind": "deferred",
        "reason_code": "rate_per_hour",
        "message": "Достигнут лимит 100 писем/час. Продолжим в 11:00.",
        "deferred_until": "2026-11-23T08:00:00Z",
        "at": "2026-11-23T07:15:00Z",
    }
    assert msgspec.json.decode(got[3].data, type=UnsubscribeEvent) == gone
    # Every one of them has a natural identity for deduplication.
    assert all(m.headers and m.headers.get(MSG_ID_HEADER) for m in got)


async def test_a_repeated_event_is_stored_once(
    js_events: JetStreamEvents, nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    event = deferred()
    await js_events.emit(event)
    await js_events.emit(event)  # a restarted actor announcing the same deferral again
    await js_events.publish_notice(_notice(js_events, event))
    await js_events.publish_notice(_notice(js_events, event))
    state = (await js.stream_info(js_events.stream)).state
    assert state.messages == 2

    # Progress has no natural identity: two reports at one instant are both kept.
    progress = CampaignEvent(
        event="progress", campaign_id=7, owner_id="m", status="sending", at=AT, counts={"sent": 1}
    )
    await js_events.emit(progress)
    await js_events.emit(progress)
    assert (await js.stream_info(js_events.stream)).state.messages == 4

    got = await fetch_all(nc, js_events.stream, f"{settings.subject_prefix}.events.>", "dedup")
    assert got[0].headers is not None
    assert got[0].headers[MSG_ID_HEADER] == f"7:deferred:{AT.isoformat()}"


async def test_failed_publish_is_logged_and_counted_never_raised(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    # No ensure_stream: nothing captures the subjects, JetStream has no responder.
    events = JetStreamEvents(bus, publish_timeout=1.0, max_bytes=SMALL)
    before = failures("campaign"), failures("unsubscribe")
    with caplog.at_level(logging.WARNING, logger="mailer.events"):
        await events.emit(deferred())
        await events.unsubscribed(
            UnsubscribeEvent(
                email="a@example.org",
                email_hash="h",
                email_domain="example.org",
                source="link",
                campaign_id=None,
                at=AT,
            )
        )
    assert failures("campaign") == before[0] + 1
    assert failures("unsubscribe") == before[1] + 1
    warnings = [r for r in caplog.records if r.message == "event not stored on JetStream"]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    # The unsubscribe line names neither the address nor its hash.
    assert all("a@example.org" not in r.getMessage() + str(r.__dict__) for r in warnings)

    await bus.close()  # a closed connection is a failure like any other
    await events.emit(deferred())
    assert failures("campaign") == before[0] + 2


def test_notification_texts() -> None:
    # rate_per_hour: the limit from the event's details, the hour in Moscow time.
    note = notification_for(deferred())
    assert note is not None
    assert note.message == "Достигнут лимит 100 писем/час. Продолжим в 11:00."
    assert (note.kind, note.reason_code, note.owner_id) == (
        "deferred",
        "rate_per_hour",
        "manager-1",
    )

    # Without details the hourly limit comes from the settings, like the manager's view.
    bare = notification_for(deferred(details=None))
    assert bare is not None and bare.message == note.message

    # A reason text whose values are missing (the owner's daily sent/limit) falls
    # back to a generic text, never "{limit}".
    daily = notification_for(deferred(defer_reason="daily_limit", details=None))
    assert daily is not None and "{" not in daily.message
    assert daily.message == "Рассылка 7 отложена (daily_limit) до 23.11.2026 11:00 МСК."

    # The same words as the manager's view, from the same settings and clock.
    office = msgspec.structs.replace(
        Settings(),
        timezone="Asia/Yekaterinburg",
        working_hours_start="10:00",
        working_hours_end="19:00",
        transient_retry_delay_minutes=2,
    )
    friday_night = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)  # 21:00 in Yekaterinburg
    monday_ten = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)
    outside = notification_for(
        deferred(
            at=friday_night,
            defer_reason="outside_hours",
            deferred_until=monday_ten,
            details=None,
        ),
        settings=office,
    )
    assert outside is not None
    assert outside.message == (
        "Сейчас вне рабочего времени (10:00-19:00 Asia/Yekaterinburg). "
        "Продолжим в понедельник, 30.11, в 10:00 Asia/Yekaterinburg."
    )
    retry = notification_for(
        deferred(
            defer_reason="transient_error",
            deferred_until=AT + timedelta(minutes=2),
            details=None,
        ),
        settings=office,
    )
    assert retry is not None
    assert retry.message == "Временная ошибка отправки. Повторим попытку через 2 минуты."

    errors = CampaignEvent(
        event="completed_with_errors",
        campaign_id=9,
        owner_id="m",
        status="completed_with_errors",
        at=AT,
        counts={"sent": 8, "failed": 2},
    )
    done = notification_for(errors)
    assert done is not None and done.reason_code == "completed_with_errors"
    assert "отправлено 8" in done.message and "не доставлено 2" in done.message

    paused = notification_for(
        deferred(event="paused", defer_reason="circuit_breaker", deferred_until=None, details=None)
    )
    assert paused is not None and paused.kind == "paused" and "{" not in paused.message

    started = deferred(event="started", defer_reason=None, deferred_until=None)
    assert notification_for(started) is None


def test_owner_token_keeps_subjects_one_level() -> None:
    assert owner_token("manager-1") == "manager-1"
    assert owner_token("ivan.petrov") == "ivan%2Epetrov"
    assert owner_token("a b*>%") == "a%20b%2A%3E%25"
    assert owner_token("") == "%00"


async def test_service_events_survive_a_consumer_that_was_down(
    make_service: MakeService, crm: Crm, events: Events, nc: Client, settings: Settings
) -> None:
    await make_service()
    cid = await crm.campaign(people(3))
    await crm.start(cid)
    await events.wait(cid, ("sent", "completed_with_errors"))

    # Only now does the consumer exist; the whole campaign story is still there.
    p = settings.subject_prefix
    got = await fetch_all(nc, stream_name(p), f"{p}.events.campaign.>", f"late-{cid}")
    story = [
        msgspec.json.decode(m.data, type=CampaignEvent)
        for m in got
        if msgspec.json.decode(m.data)["campaign_id"] == cid
    ]
    names = [e.event for e in story]
    assert names[-1] == "sent", names
    assert names.index("started") < names.index("progress") < names.index("sent"), names
    assert story[-1].counts == {"sent": 3}
    assert story[-1].at <= datetime.now(UTC) + timedelta(seconds=1)


async def test_start_publishes_queued_on_the_stream(
    make_service: MakeService, crm: Crm, events: Events, nc: Client, settings: Settings
) -> None:
    clock = FakeClock(AT)
    await make_service(clock=clock)
    cid = await crm.campaign(people(2))
    # An admin starts the manager's campaign: the event names the owner, not the caller.
    await crm.call("campaign.start", {"campaign_id": cid}, user="boss", roles="admin")
    await events.wait(cid, ("sent", "completed_with_errors"))

    p = settings.subject_prefix
    got = await fetch_all(nc, stream_name(p), f"{p}.events.>", f"queued-{cid}")
    mine = [m for m in got if msgspec.json.decode(m.data).get("campaign_id") == cid]
    mine = [m for m in mine if m.subject.startswith(f"{p}.events.campaign.")]
    queued = [m for m in mine if m.subject == f"{p}.events.campaign.queued"]
    assert len(queued) == 1
    assert mine[0] is queued[0], "queued comes first: " + str([m.subject for m in mine])
    payload = msgspec.json.decode(queued[0].data)
    # The documented payload: the campaign, its owner, the new status, when.
    assert {k: v for k, v in payload.items() if v is not None} == {
        "event": "queued",
        "campaign_id": cid,
        "owner_id": "manager-1",
        "status": "ready",
        "at": "2026-11-23T07:15:00Z",
    }
    assert set(payload) <= {
        "event",
        "campaign_id",
        "owner_id",
        "status",
        "at",
        "counts",
        "defer_reason",
        "deferred_until",
        "details",
    }
    assert queued[0].headers is not None
    assert queued[0].headers[MSG_ID_HEADER] == f"{cid}:queued:{AT.isoformat()}"
    # Core NATS subscribers saw it live too.
    assert len(events.of(cid, "queued")) == 1

    # A refused start (no longer a draft) publishes nothing more.
    assert (await crm.fails("campaign.start", {"campaign_id": cid})).code == "invalid_state"
    again = await fetch_all(nc, stream_name(p), f"{p}.events.>", f"again-{cid}")
    queued_again = [m for m in again if m.subject == f"{p}.events.campaign.queued"]
    assert [msgspec.json.decode(m.data)["campaign_id"] for m in queued_again] == [cid]
