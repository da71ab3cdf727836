"""docs/api.md stays true: every subject documented, every example a valid request, the
Python client runs against a real service."""

from __future__ import annotations

import ast
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mailer.api.routes import routes
from mailer.bus import Bus
from mailer.config import Settings
from mailer.errors import CODES
from mailer.events import MSG_ID_HEADER, JetStreamEvents, Notification, UnsubscribeEvent
from mailer.messages import CampaignEvent

DOC = (Path(__file__).parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
ROUTES = {r.subject: r for r in routes(Settings())}
CLI = re.compile(r"^nats req mailer\.(\S+) '(.*?)'", re.MULTILINE)
PY = re.compile(r'^await call\("([^"]+)", (\{.*?\})(?:, [a-z]+=.*)?\)$', re.MULTILINE)


def test_every_subject_and_error_code_is_documented() -> None:
    headings = set(re.findall(r"^### (\S+)$", DOC, re.MULTILINE))
    assert set(ROUTES) <= headings
    for code in CODES:
        assert f"`{code}`" in DOC, code


@pytest.mark.parametrize("subject,body", CLI.findall(DOC))
def test_cli_examples_are_valid_requests(subject: str, body: str) -> None:
    msgspec.json.decode(body.encode(), type=ROUTES[subject].request, strict=True)


def test_python_examples_are_valid_requests() -> None:
    found = PY.findall(DOC)
    assert len(found) >= len(ROUTES) - 1  # attachments.add builds its content in code
    for subject, body in found:
        if subject == "attachments.add":
            continue  # its content is computed (base64 of the file)
        value = ast.literal_eval(body)
        msgspec.json.decode(json.dumps(value).encode(), type=ROUTES[subject].request, strict=True)


async def test_python_client_runs(make_service, settings, sink) -> None:
    await make_service()
    [block] = [
        b for b in re.findall(r"```python\n(.*?)```", DOC, re.DOTALL) if "async def main" in b
    ]
    code = block.replace("nats://127.0.0.1:4222", settings.nats_url)
    code = code.replace('f"mailer.{subject}"', f'f"{settings.subject_prefix}.{{subject}}"')
    code = code.replace("asyncio.run(main())", "")
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    await namespace["main"]()  # type: ignore[operator]


def _section(subject: str) -> str:
    """The text of one endpoint's ``### <subject>`` section."""
    m = re.search(rf"^### {re.escape(subject)}\n(.*?)(?=^##)", DOC, re.MULTILINE | re.DOTALL)
    assert m, f"no section for {subject}"
    return m[1]


@pytest.mark.parametrize("subject", sorted(ROUTES))
def test_every_endpoint_section_has_request_reply_errors_and_examples(subject: str) -> None:
    section = _section(subject)
    for label in ("Request:", "Reply:", "Errors:"):
        assert label in section, f"{subject}: no {label!r} line"
    shell = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert any(f"nats req mailer.{subject} " in b for b in shell), f"{subject}: no nats req"
    python = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert any(f'await call("{subject}", ' in b for b in python), f"{subject}: no Python"
    # Every code the "Errors" line names is one the API really answers with.
    errors = re.search(r"Errors:(.*?)(?:\n\n|```)", section, re.DOTALL)
    assert errors, subject
    named = set(re.findall(r"`([a-z_]+)`", errors[1]))
    assert named, f"{subject}: the Errors line names no code"
    assert named <= set(CODES), f"{subject}: unknown codes {named - set(CODES)}"


def _events_section() -> str:
    m = re.search(r"^## Events\n(.*?)(?=^## )", DOC, re.MULTILINE | re.DOTALL)
    assert m
    return m[1]


def _event_examples() -> dict[str, dict[str, Any]]:
    """The JSON example of each event subject, keyed by the subject after the prefix."""
    found: dict[str, dict[str, Any]] = {}
    pattern = r"\*\*`<prefix>\.(events\.[a-z.<>]+)`\*\*.*?```json\n(.*?)```"
    for subject, body in re.findall(pattern, _events_section(), re.DOTALL):
        found[subject] = json.loads(body)
    return found


def test_event_payload_examples_have_exactly_the_published_fields() -> None:
    examples = _event_examples()
    types: dict[str, type[msgspec.Struct]] = {
        "events.campaign.<event>": CampaignEvent,
        "events.notify.<owner>": Notification,
        "events.unsubscribe": UnsubscribeEvent,
    }
    assert set(examples) == set(types)
    for subject, typ in types.items():
        example = examples[subject]
        # The same keys as the payload (msgspec writes every field, null ones too)...
        assert set(example) == set(typ.__struct_fields__), subject
        # ...with values of the right types.
        msgspec.convert(example, typ)


def _msg_id_templates() -> dict[str, str]:
    rows = re.findall(r"^\| `(events\.[a-z.<>]+)` \| `([^`]+)`", _events_section(), re.MULTILINE)
    return dict(rows)


def _fill(template: str, payload: dict[str, Any]) -> str:
    """A documented Nats-Msg-Id template filled from an event's payload."""

    def value(name: str) -> str:
        if name == "deferred_until, or at when null":
            name = "deferred_until" if payload["deferred_until"] is not None else "at"
        raw = payload[name]
        if name in ("at", "deferred_until"):  # isoformat(), as the docs say
            return datetime.fromisoformat(raw.replace("Z", "+00:00")).isoformat()
        return str(raw)

    return re.sub(r"<([^>]+)>", lambda m: value(m[1]), template)


async def test_documented_msg_ids_are_the_published_ones(settings: Settings) -> None:
    """Events published through JetStream carry the Nats-Msg-Id the docs describe."""
    templates = _msg_id_templates()
    assert set(templates) == {
        "events.campaign.<event>",
        "events.notify.<owner>",
        "events.unsubscribe",
    }
    bus = Bus(settings.nats_url, prefix=settings.subject_prefix, name="docs-test")
    await bus.connect()
    try:
        events = JetStreamEvents(bus, max_bytes=settings.events_max_bytes)
        await events.ensure_stream()
        at = datetime(2026, 11, 23, 10, 15, 0, 123456, tzinfo=UTC)
        deferred = CampaignEvent(
            event="deferred",
            campaign_id=7,
            owner_id="manager.1",
            status="sending",
            at=at,
            defer_reason="rate_per_hour",
            deferred_until=datetime(2026, 11, 23, 11, tzinfo=UTC),
            details={"limit": "100", "used": "100"},
        )
        await events.emit(deferred)
        notice = events.notice(deferred)
        assert notice is not None
        await events.publish_notice(notice)
        await events.unsubscribed(
            UnsubscribeEvent(
                email="anna@example.org",
                email_hash="3f1c9a0b7d2e4c61",
                email_domain="example.org",
                source="link",
                campaign_id=7,
                at=at,
            )
        )
        await events.emit(
            CampaignEvent(
                event="progress",
                campaign_id=7,
                owner_id="manager.1",
                status="sending",
                at=at,
                counts={"sent": 1},
            )
        )
        js = bus.nc.jetstream()
        sub = await js.pull_subscribe(
            bus.subject("events", ">"), stream=events.stream, durable=None
        )
        msgs = await sub.fetch(4, timeout=5)
        assert len(msgs) == 4
        prefix = settings.subject_prefix + "."
        by_template = {
            "events.campaign.<event>": msgs[0],
            "events.notify.<owner>": msgs[1],
            "events.unsubscribe": msgs[2],
        }
        assert msgs[1].subject == prefix + "events.notify.manager%2E1"  # the documented escape
        for template, msg in by_template.items():
            payload = json.loads(msg.data)
            assert (msg.headers or {})[MSG_ID_HEADER] == _fill(templates[template], payload)
        assert msgs[3].subject == prefix + "events.campaign.progress"
        assert MSG_ID_HEADER not in (msgs[3].headers or {})  # "none for progress"
    finally:
        await bus.close()
