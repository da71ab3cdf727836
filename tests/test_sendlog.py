"""The log lines of sending (mailer/sendlog.py): per batch, per failed or retried recipient,
per accepted message unless MAILER_LOG_EACH_SEND=false; written through the real handler, so
the PII filter is applied as in production."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from mailer import logs
from mailer.logs import configure_logging, email_hash
from mailer.sink import PERMANENT_FAILURE, TRANSIENT_FAILURE, SmtpSink
from tests.conftest import MakeService
from tests.helpers import Crm, Events

SALT = "sendlog-test-salt-0123456789"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    salt, full = logs._State.hash_salt, logs._State.full_emails
    stream = io.StringIO()
    configure_logging(level="INFO", json=True, full_emails=False, hash_salt=SALT, stream=stream)
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logs._State.hash_salt, logs._State.full_emails = salt, full


def _lines(stream: io.StringIO, campaign_id: int) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    return [x for x in lines if x["logger"] == "mailer.send" and x["campaign_id"] == campaign_id]


RECIPIENTS = [
    {"email": "anna@one.example"},
    {"email": "boris@two.example"},
    {"email": "nobody@three.example"},
    {"email": "later@four.example"},
]


async def _run(
    make_service: MakeService, crm: Crm, events: Events, sink: SmtpSink, **settings: Any
) -> int:
    await make_service(**settings)
    sink.fail("nobody@three.example", PERMANENT_FAILURE)
    sink.fail("later@four.example", TRANSIENT_FAILURE, times=1)
    cid = await crm.campaign(RECIPIENTS)
    await crm.start(cid)
    deferred = await events.wait(cid, ("deferred",), timeout=20)
    assert deferred["defer_reason"] == "transient_error"
    return cid


async def test_a_batch_logs_each_outcome_and_a_summary(
    make_service: MakeService, crm: Crm, events: Events, sink: SmtpSink, log_lines: io.StringIO
) -> None:
    cid = await _run(make_service, crm, events, sink)
    lines = _lines(log_lines, cid)
    by_message: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_message.setdefault(line["message"], []).append(line)

    sent = by_message["email sent"]
    assert sorted(x["email_masked"] for x in sent) == ["an***@one.example", "bo***@two.example"]
    for x in sent:
        assert x["level"] == "INFO"
        assert x["email_domain"] in ("one.example", "two.example")
        assert isinstance(x["recipient_id"], int) and x["took_ms"] >= 0
        assert x["smtp_message_id"].startswith("<") and x["smtp_answer"].startswith("250")
    assert {x["email_hash"] for x in sent} == {
        email_hash("anna@one.example", salt=SALT),
        email_hash("boris@two.example", salt=SALT),
    }

    [failed] = by_message["email failed"]
    assert failed["level"] == "WARNING"
    assert failed["email_masked"] == "no***@three.example"
    assert failed["email_domain"] == "three.example"
    assert "email_hash" not in failed  # WARNING: masked + domain only
    assert failed["smtp_answer"].startswith("550") and failed["error"]

    [retried] = by_message["email will be retried"]
    assert retried["level"] == "INFO" and retried["email_masked"] == "la***@four.example"
    assert retried["smtp_answer"].startswith("451")

    [batch] = by_message["batch sent"]
    assert batch["level"] == "INFO"
    assert (batch["recipients"], batch["sent"], batch["failed"], batch["transient"]) == (4, 2, 1, 1)
    assert batch["took_ms"] > 0

    text = log_lines.getvalue()
    for r in RECIPIENTS:
        assert r["email"] not in text  # never a full address above DEBUG


async def test_log_each_send_false_keeps_only_failures_and_batches(
    make_service: MakeService, crm: Crm, events: Events, sink: SmtpSink, log_lines: io.StringIO
) -> None:
    cid = await _run(make_service, crm, events, sink, log_each_send=False)
    messages = sorted(x["message"] for x in _lines(log_lines, cid))
    assert messages == ["batch sent", "email failed", "email will be retried"]


async def test_a_test_email_logs_its_line(
    make_service: MakeService, crm: Crm, sink: SmtpSink, log_lines: io.StringIO
) -> None:
    await make_service()
    cid = await crm.campaign(RECIPIENTS[:1])
    sink.fail("boss@five.example", PERMANENT_FAILURE)
    await crm.fails("campaign.test", {"campaign_id": cid, "email": "boss@five.example"})
    [line] = _lines(log_lines, cid)
    assert line["message"] == "email failed" and line["test_email"] is True
    assert line["email_masked"] == "bo***@five.example" and line["send_log_id"]
