"""The log lines of sending: one per batch, one per recipient that did not go out, and
(unless ``MAILER_LOG_EACH_SEND=false``) one per message the SMTP server accepted.

Written after the outcomes are recorded, and from what was recorded: an outcome the store
did not write (a late record for rows no longer this lease's) gets no line of its own, and a
transient answer that used up the recipient's attempts is logged as the failure it became.
Levels follow the PII policy (mailer.logs):

| line                          | level   | address fields                        |
|-------------------------------|---------|---------------------------------------|
| ``email sent``                | INFO    | domain, masked, hash                  |
| ``email will be retried``     | INFO    | domain, masked, hash (transient: the  |
|                               |         | recipient is pending again)           |
| ``email failed``              | WARNING | domain, masked (permanent: 5xx, bad   |
|                               |         | address, transient attempts used up)  |
| ``email delivery in doubt``   | WARNING | domain, masked                        |
| ``batch sent``                | INFO    | none: counts by outcome and took_ms   |

Every line carries ``campaign_id``; the per-recipient ones ``recipient_id``,
``smtp_message_id`` (the Message-ID we generated: searchable in the provider's logs),
``smtp_answer`` (the server's reply) and ``took_ms``. The SMTP error text may quote the
address; the log filter masks it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from mailer.logs import email_fields, mask_email
from mailer.store import Outcome

__all__ = ["log_batch", "log_test_send"]

log = logging.getLogger("mailer.send")

_MAX_TEXT: Final = 300


def _short(text: str | None) -> str | None:
    if text is None or len(text) <= _MAX_TEXT:
        return text
    return text[: _MAX_TEXT - 1] + "…"


def _masked(address: str) -> dict[str, str]:
    """WARNING and above: the masked form and the domain only."""
    fields = email_fields(address)
    return {"email_domain": fields["email_domain"], "email_masked": mask_email(address)}


def _one(fields: dict[str, Any], o: Outcome, status: str, *, each_send: bool) -> None:
    """``status``: what the recipient row became (``o.status`` unless the store decided)."""
    fields = {
        **fields,
        "smtp_message_id": o.message_id,
        "smtp_answer": _short(o.answer),
        "took_ms": round(o.took_ms, 1),
    }
    if status == "sent":
        if each_send:
            log.info("email sent", extra={**fields, **email_fields(o.email)})
    elif o.status == "transient" and status != "failed":
        retry = {"error": _short(o.error), "short_circuited": o.short_circuited}
        log.info("email will be retried", extra={**fields, **email_fields(o.email), **retry})
    elif status == "in_doubt":
        failure = {**_masked(o.email), "error": _short(o.error)}
        log.warning("email delivery in doubt", extra={**fields, **failure})
    else:
        log.warning("email failed", extra={**fields, **_masked(o.email), "error": _short(o.error)})


def log_batch(
    campaign_id: int,
    outcomes: Sequence[Outcome],
    written: Mapping[int, str],
    *,
    took_ms: float,
    each_send: bool,
) -> None:
    """The lines of one recorded batch of a campaign (see the module docstring).

    ``written``: the status each recipient row got, as the store's ``record`` returns it.
    """
    counts: dict[str, int] = {}
    # Asked once per batch, not per message: a sent message's line is the only
    # per-recipient INFO line most batches have.
    each_send = each_send and log.isEnabledFor(logging.INFO)
    for o in outcomes:
        status = written.get(o.recipient_id)
        if status is None:
            counts["not_recorded"] = counts.get("not_recorded", 0) + 1
            continue
        kind = "failed" if o.status == "transient" and status == "failed" else o.status
        counts[kind] = counts.get(kind, 0) + 1
        if status == "sent" and not each_send:
            continue  # its line is off: no fields built for nothing
        fields = {"campaign_id": campaign_id, "recipient_id": o.recipient_id}
        _one(fields, o, status, each_send=each_send)
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "batch sent",
        extra={
            "campaign_id": campaign_id,
            "recipients": len(outcomes),
            "sent": counts.get("sent", 0),
            "failed": counts.get("failed", 0),
            "transient": counts.get("transient", 0),
            "in_doubt": counts.get("in_doubt", 0),
            "not_recorded": counts.get("not_recorded", 0),
            "took_ms": round(took_ms, 1),
        },
    )


def log_test_send(campaign_id: int, send_log_id: int, outcome: Outcome) -> None:
    """The line of one test email (always written: test emails are few).

    ``outcome.recipient_id`` is ignored: a test email has no recipient row; its send-log
    row is named instead.
    """
    fields = {"campaign_id": campaign_id, "test_email": True, "send_log_id": send_log_id}
    _one(fields, outcome, outcome.status, each_send=True)
