"""The manager's view (the seeds' poll endpoint): what runs, what waits, and why.

For the acting user (an admin may name another ``owner_id``):
- ``active_campaign``: the owner's campaign being sent now -- the one in
  status 'sending' first, else the head of their queue, else a paused one --
  with its recipient counts;
- ``queued_count`` / ``paused_count``: the owner's other unfinished campaigns
  waiting in the queue (ready, or sending but deferred) / paused;
- ``next_campaign_at``: when the next of those may start: the forecast's
  first message for it (``mailer.forecast``: its turn in the queue and every
  limit), else its deferral's end; null only when it cannot be known (the
  quota is exhausted: nothing starts until a top-up);
- ``reason_code`` + ``reason``: why the active campaign waits (null while it
  sends), with its human text in the caller's language; ``empty`` when the
  owner has nothing queued; ``paused`` for a manager's pause,
  ``circuit_breaker`` for the breaker's, ``render_error`` for a campaign
  whose message the engine could not build;
- ``next_run_at``: until when it waits (its ``deferred_until``, the
  governor's ``next_send`` answer: the first moment every limit allows; null
  for a pause, which only a resume ends, and for the quota, which only a
  top-up ends);
- ``estimated_start_at`` / ``estimated_completion_at`` / ``estimate_reason``
  on the active campaign and each queued one: the forecast (``api.outlook``).

Placeholders of the texts come from data, never from wording fixed in a
template: the hourly limit, the working hours, their time zone and the
transient retry delay from settings; when the deferral ends (its hour, and
"today"/"tomorrow"/a weekday and date relative to now, in the working-hours
time zone) from ``deferred_until``; the daily sent/limit from the owner's
limit and, best effort, the day's counter in Redis (the limit itself when
Redis does not answer: the day is used up).
"""

from __future__ import annotations

import logging
from datetime import datetime

from mailer.accounts import accounts_of
from mailer.api.context import ApiContext, Caller
from mailer.api.outlook import estimate_of, queue_outlook
from mailer.apistore import OwnerQueueRow
from mailer.errors import Forbidden
from mailer.messages import ActiveCampaign, ManagerStatus, QueuedCampaign, StatusRequest
from mailer.texts import ACCOUNT_REASONS, Lang, reason_key, reason_values, text

__all__ = ["STATUS_QUEUE_LIMIT", "reason_text", "status"]

log = logging.getLogger("mailer.api")

# The view lists at most this many of the owner's unfinished campaigns.
STATUS_QUEUE_LIMIT = 50


async def status(ctx: ApiContext, caller: Caller, req: StatusRequest) -> ManagerStatus:
    owner = req.owner_id or caller.user
    if owner != caller.user and not caller.is_admin:
        raise Forbidden(text_key="forbidden_other_owner")
    rows, queued, paused = await ctx.db.owner_queue(owner, STATUS_QUEUE_LIMIT)
    outlooks = await queue_outlook(ctx) if rows else {}
    estimates = {r.id: estimate_of(r.id, r.status, outlooks) for r in rows}
    accounts = accounts_of(ctx.settings)
    queue = [
        QueuedCampaign(
            account=(r.smtp_account or accounts.default.name) if accounts.several else None,
            defer_account=_waits_for(ctx, r.defer_reason or "", r) or None,
            id=r.id,
            name=r.name,
            status=r.status,
            priority=r.priority,
            queued_at=r.queued_at,
            defer_reason=r.defer_reason,
            deferred_until=r.deferred_until,
            estimated_start_at=estimates[r.id][0],
            estimated_completion_at=estimates[r.id][1],
            estimate_reason=estimates[r.id][2],
        )
        for r in rows
    ]
    if not rows:
        return ManagerStatus(
            owner_id=owner,
            active_campaign=None,
            queued_count=0,
            paused_count=0,
            next_campaign_at=None,
            reason_code="empty",
            reason=text("empty", caller.lang),
            next_run_at=None,
            queue=[],
        )
    active = rows[0]
    code = _reason_code(active)
    waiting = [r for r in rows[1:] if r.status in ("ready", "sending")]
    now = ctx.clock.now()
    nxt = _next_start(waiting[0], estimates[waiting[0].id][0]) if waiting else None
    return ManagerStatus(
        owner_id=owner,
        active_campaign=ActiveCampaign(
            id=active.id,
            name=active.name,
            status=active.status,
            counts=await ctx.store.counts(active.id),
            started_at=active.started_at,
            estimated_start_at=estimates[active.id][0],
            estimated_completion_at=estimates[active.id][1],
            estimate_reason=estimates[active.id][2],
        ),
        queued_count=queued - (active.status != "paused"),
        paused_count=paused - (active.status == "paused"),
        next_campaign_at=nxt if nxt is not None and nxt > now else None,
        reason_code=code,
        reason=None if code is None else await reason_text(ctx, code, owner, active, caller.lang),
        next_run_at=active.deferred_until,
        queue=queue,
    )


def _next_start(row: OwnerQueueRow, forecast_start: datetime | None) -> datetime | None:
    """When the next of the owner's campaigns may start: the forecast's first
    message (it has not sent yet), else its own deferral's end."""
    return forecast_start if forecast_start is not None else row.deferred_until


def _reason_code(row: OwnerQueueRow) -> str | None:
    if row.status == "paused":
        # A late deferral by an actor that had not yet seen the pause may have
        # overwritten the reason; the status says it is a pause all the same.
        engine = ("circuit_breaker", "render_error")
        return row.defer_reason if row.defer_reason in engine else "paused"
    return row.defer_reason


async def reason_text(
    ctx: ApiContext, code: str, owner_id: str, row: OwnerQueueRow, lang: Lang
) -> str:
    now = ctx.clock.now()
    account = _waits_for(ctx, code, row)
    values = reason_values(
        ctx.settings, until=row.deferred_until, now=now, lang=lang, account=account
    )
    if code == "daily_limit":
        limit = ctx.daily_limits.limit_for(owner_id)
        values.update(limit=limit, sent=await _sent_today(ctx, owner_id, limit))
    key = reason_key(code, until=row.deferred_until, now=now, account=account)
    return text(key, lang, **values)


def _waits_for(ctx: ApiContext, code: str, row: OwnerQueueRow) -> str:
    """The SMTP account a wait is for, named only with several accounts: the one
    the deferral recorded (a backup's hour during a failover), else the campaign's."""
    accounts = accounts_of(ctx.settings)
    if not accounts.several or code not in ACCOUNT_REASONS:
        return ""
    own = row.smtp_account or accounts.default.name
    if code == "circuit_breaker":  # its own count of failed attempts, on its own account
        return own
    return row.defer_account or own


async def _sent_today(ctx: ApiContext, owner_id: str, limit: int) -> int:
    if ctx.daily_counter is None:
        return limit
    try:
        return await ctx.daily_counter.day_used(owner_id, ctx.hours.local_date(ctx.clock.now()))
    except Exception:  # best effort: a view must not fail because Redis does
        log.warning("daily counter unavailable for the manager's view", exc_info=True)
        return limit
