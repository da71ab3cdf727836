"""A test email: the campaign's message, once, to an address the manager names.

It takes the same road as a campaign's mail, never a shortcut from the API:
the rate governor grants one token (``kind="test"``: it counts against the
hourly limit, the owner's day and the quota; working hours do not apply),
the SMTP sender actor sends it over the shared connection pool, and the
attempt is written to the send log with ``is_test = true``.

The message is rendered exactly as recipients get it (attachments, the
unsubscribe footer and headers included) except that the subject starts with
``[ТЕСТ] `` (``[TEST] `` for ``Mailer-Lang: en``), so nobody takes it for
the real one. The unsubscribe link is real and signed for the test address:
clicking it unsubscribes that address. The Message-ID names recipient 0.

Order of checks: address, rights, renderable message (nothing counted yet),
then the hourly test-email throttle, then the governor's token; a test email
the governor refuses (or cannot answer) gives its throttle slot back. A token holds
until its window ends (``valid_until``): a test email that waited for the
sender past it is not sent under it, but asks the governor once more (the
first token stays spent).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import nats.errors

from mailer import metrics, sendlog
from mailer.accounts import accounts_of
from mailer.actors.campaign import Mail
from mailer.actors.runtime import ActorDead, AskTimeout, MailboxFull
from mailer.api.context import ApiContext, Caller, check_address, require_owner
from mailer.bus import RemoteError
from mailer.clock import api_time
from mailer.dkim import dkim_signer
from mailer.errors import NotFound, Refused, SendFailed, Unavailable, ValidationFailed
from mailer.messages import TestEmail, TestEmailSent, TokenReply
from mailer.render import MessageTemplate, make_message_id
from mailer.store import Outcome
from mailer.texts import fields_of, reason_values, text
from mailer.transport import SendResult
from mailer.unsubscribe import unsubscribe_url

__all__ = ["send_test"]

log = logging.getLogger("mailer.api")

# The Message-ID's recipient part for a test email (no recipient row exists).
TEST_RECIPIENT_ID = 0
# Grants asked for one test email: a second one when the first expired unused.
_GRANTS = 2


async def send_test(ctx: ApiContext, caller: Caller, req: TestEmail) -> TestEmailSent:
    # A test email goes through the default SMTP account: its From, Message-ID and DKIM.
    s = accounts_of(ctx.settings).default.settings
    reason = check_address(req.email)
    if reason is not None:
        raise ValidationFailed(
            "validation_error", text_key="invalid_email", email=req.email, reason=reason
        )
    campaign = await ctx.store.get_campaign(req.campaign_id)
    if campaign is None:
        raise NotFound(campaign_id=req.campaign_id)
    require_owner(caller, campaign.owner_id)
    attachments = await ctx.store.attachments(req.campaign_id)
    try:
        template = MessageTemplate(
            from_email=s.from_email,
            from_name=s.from_name,
            subject=text("test_subject_prefix", caller.lang) + campaign.subject,
            text=campaign.body_text,
            html=campaign.body_html,
            message_id_domain=s.effective_message_id_domain,
            attachments=[(a.filename, a.content_type, a.content) for a in attachments],
            dkim=dkim_signer(s),
        )
        now = ctx.clock.now()
        message_id = make_message_id(campaign.id, TEST_RECIPIENT_ID, s.effective_message_id_domain)
        data = template.render(
            to_email=req.email,
            to_name=req.name,
            variables=req.variables,
            message_id=message_id,
            date=now,
            unsubscribe_url=unsubscribe_url(
                s.public_url, s.unsubscribe_secret, campaign.id, req.email
            ),
        )
    except ValueError as exc:
        raise ValidationFailed(detail=str(exc)) from None

    slot = await ctx.test_throttle.check(caller.user, now)
    # A grant is good until its window ends (the hour, the day): a test email
    # whose turn at SMTP comes later is not sent under it. It asks once more,
    # in the new window; the first token stays spent.
    for attempt in range(_GRANTS):
        asked_at = ctx.clock.now()
        try:
            grant = await _grant(ctx, caller, campaign.id, campaign.owner_id, asked_at)
        except (Refused, Unavailable):
            if attempt == 0:
                # Nothing was sent nor spent: the manager's hour keeps its slot.
                await ctx.test_throttle.give_back(caller.user, slot)
            raise
        result = await _send(ctx, Mail(req.email, data), not_after=grant.usable_until(asked_at))
        if not result.expired:
            break
        log.info("test email's send token expired before SMTP took it; asking again")
    else:
        raise Unavailable("sender_unavailable")
    status = _status(result)
    log_id = await ctx.db.log_test_send(
        campaign_id=campaign.id,
        email=req.email,
        status=status,
        message_id=message_id,
        answer=result.provider_answer or None,
        error=result.error,
        took_ms=result.took_ms,
        actor_id=caller.user,
        now=ctx.clock.now(),
    )
    sendlog.log_test_send(
        campaign.id,
        log_id,
        Outcome(
            recipient_id=0,
            email=req.email,
            status=status,
            message_id=message_id,
            answer=result.provider_answer or None,
            error=result.error,
            took_ms=result.took_ms,
        ),
    )
    if status != "sent":
        metrics.EMAILS_FAILED.labels(kind="test", reason=_metric_reason(status)).inc()
        raise SendFailed(
            error=result.error or result.provider_answer or status,
            status=status,
            send_log_id=log_id,
        )
    metrics.EMAILS_SENT.labels(kind="test").inc()
    return TestEmailSent(
        email=req.email,
        status=status,
        smtp_message_id=message_id,
        provider_answer=result.provider_answer or None,
        took_ms=result.took_ms,
        send_log_id=log_id,
    )


async def _grant(
    ctx: ApiContext, caller: Caller, campaign_id: int, owner_id: str, now: datetime
) -> TokenReply:
    """One send token from the governor, or the refusal worded for the caller."""
    try:
        grant = await ctx.tokens.request_tokens(campaign_id, owner_id, 1, kind="test")
    except (RemoteError, nats.errors.Error, TimeoutError) as exc:
        log.error("rate governor unavailable for a test email", extra={"error": repr(exc)})
        raise Unavailable("governor_unavailable") from None
    if grant.granted >= 1:
        return grant
    reason_code = grant.reason or "rate_per_hour"
    # quota_exhausted has no time (a top-up ends it): retry_at null, never "now".
    next_run = grant.retry_at or now
    # The reason's own words, as the manager's view has them, in the caller's language.
    worded: dict[str, Any] = reason_values(ctx.settings, until=next_run, now=now, lang=caller.lang)
    worded.update(
        limit=grant.daily_limit if reason_code == "daily_limit" else grant.limit,
        sent=grant.daily_sent,
    )
    # Details are strings: a wait with no time (the quota) has no retry_at at all.
    when = {} if grant.retry_at is None else {"retry_at": api_time(grant.retry_at)}
    raise Refused(
        reason_code,
        **when,
        **{k: v for k, v in worded.items() if k in fields_of(reason_code)},
    )


async def _send(ctx: ApiContext, mail: Mail, *, not_after: datetime | None) -> SendResult:
    try:
        [result] = await ctx.mailer.send_all([mail], not_after=not_after)
    except (ActorDead, MailboxFull):
        # Not handed to SMTP: nothing to log, the token is spent (never given back).
        raise Unavailable("sender_unavailable") from None
    except AskTimeout:
        # Handed over, outcome unknown: the send log says so instead of guessing.
        return SendResult(
            outcome="transient",
            smtp_code=None,
            provider_answer="",
            error="no answer from the SMTP sender in time; delivery unknown",
            took_ms=0.0,
            in_doubt=True,
        )
    return result


def _status(result: SendResult) -> str:
    """The send-log status of an attempt: sent, failed, transient or in_doubt."""
    if result.outcome == "sent":
        return "sent"
    if result.in_doubt:
        return "in_doubt"
    return "failed" if result.outcome == "permanent" else "transient"


def _metric_reason(status: str) -> str:
    return "permanent" if status == "failed" else status
