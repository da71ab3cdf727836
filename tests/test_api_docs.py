"""docs/api.md stays true: every subject documented, every example a valid request (the
raw JSON ones decoded as the service does, the client's bound to its methods, the ``mailer``
CLI's parsed by the CLI), the first Python example runs against a real service."""

from __future__ import annotations

import ast
import inspect
import json
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from mailer.api.routes import routes
from mailer.bus import Bus
from mailer.cli import root
from mailer.client import MailerClient
from mailer.config import Settings
from mailer.errors import CODES
from mailer.events import (
    MSG_ID_HEADER,
    JetStreamEvents,
    Notification,
    SuppressionEvent,
    UnsubscribeEvent,
)
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


async def test_python_client_runs(make_service, settings, sink, monkeypatch) -> None:
    """The first Python example, as printed: it takes the server from the environment."""
    await make_service()
    [block] = [
        b for b in re.findall(r"```python\n(.*?)```", DOC, re.DOTALL) if "async def main" in b
    ]
    monkeypatch.setenv("MAILER_NATS_URL", settings.nats_url)
    monkeypatch.setenv("MAILER_SUBJECT_PREFIX", settings.subject_prefix)
    code = block.replace("asyncio.run(main())", "")
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    await namespace["main"]()  # type: ignore[operator]
    assert len(sink.messages) == 1


TYPED = re.compile(r"^await mailer\.(?:acting\((.*?)\)\.)?([a-z_]+)\((.*)\)$", re.MULTILINE)


def test_typed_examples_call_real_methods() -> None:
    """Each ``await mailer.<method>(…)`` line names a client method and fits its signature."""
    found = TYPED.findall(DOC)
    assert len(found) >= len(ROUTES)
    for acting, method, args in found:
        fn = getattr(MailerClient, method)
        call = ast.parse(f"f({args})", mode="eval").body
        assert isinstance(call, ast.Call)
        # Computed arguments ("Привет".encode()) count by position only.
        positional = [None if isinstance(a, ast.Call) else ast.literal_eval(a) for a in call.args]
        named = {k.arg: ... for k in call.keywords}
        inspect.signature(fn).bind(None, *positional, **named)
        if acting:
            inspect.signature(MailerClient.acting).bind(
                None, **dict.fromkeys(re.findall(r"([a-z]+)=", acting))
            )


def _cli_lines() -> list[list[str]]:
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", DOC, re.DOTALL):
        for line in block.splitlines():
            if line.startswith("mailer "):
                lines.append(shlex.split(line, comments=True)[1:])
    return lines


@pytest.mark.parametrize("argv", _cli_lines(), ids=" ".join)
def test_mailer_cli_examples_parse(argv: list[str]) -> None:
    """Each ``mailer …`` line names a command and options it really has (Click parses every
    option before it answers ``--help``: an unknown one is a usage error, exit 2)."""
    result = CliRunner().invoke(root, [*argv, "--help"])
    assert result.exit_code == 0, (argv, result.output)
    assert "No such option" not in result.output


def test_every_subject_has_a_typed_example_and_a_cli_one_where_there_is_a_command() -> None:
    without_cli = {"attachments.list", "attachments.remove"}
    for subject in ROUTES:
        section = _section(subject)
        assert re.search(r"^await mailer\.", section, re.MULTILINE), subject
        if subject not in without_cli:
            assert re.search(r"^mailer ", section, re.MULTILINE), subject


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
        "events.suppression.<reason>": SuppressionEvent,
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
        "events.suppression.<reason>",
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
        await events.publish_notice(
            events.suppression_notice(
                SuppressionEvent(
                    email="anna@example.org",
                    email_hash="3f1c9a0b7d2e4c61",
                    email_domain="example.org",
                    reason="hard_bounce",
                    source="dsn",
                    campaign_id=7,
                    recipient_id=1234,
                    detail="failed 5.1.1",
                    at=at,
                )
            )
        )
        msgs = await sub.fetch(5, timeout=5)
        assert len(msgs) == 5
        prefix = settings.subject_prefix + "."
        by_template = {
            "events.campaign.<event>": msgs[0],
            "events.notify.<owner>": msgs[1],
            "events.unsubscribe": msgs[2],
            "events.suppression.<reason>": msgs[4],
        }
        assert msgs[4].subject == prefix + "events.suppression.hard_bounce"
        assert msgs[1].subject == prefix + "events.notify.manager%2E1"  # the documented escape
        for template, msg in by_template.items():
            payload = json.loads(msg.data)
            assert (msg.headers or {})[MSG_ID_HEADER] == _fill(templates[template], payload)
        assert msgs[3].subject == prefix + "events.campaign.progress"
        assert MSG_ID_HEADER not in (msgs[3].headers or {})  # "none for progress"
    finally:
        await bus.close()
