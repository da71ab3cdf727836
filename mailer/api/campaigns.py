"""Campaigns: create, update, get, list, delete, and the state changes a manager makes.

State changes (the contract the campaign actor and the scheduler rely on):

- start:  draft -> ready; the queue entry is (re)created; ``Wake`` is published.
- pause:  ready | sending -> paused; queue entry defer_reason='paused',
  deferred_until=NULL. A running campaign actor sees the status at its next
  batch (it claims only while 'sending') and stops.
- resume: paused -> ready; queue entry defer_reason=NULL, deferred_until=NULL,
  consecutive_transient_errors=0 (this also ends a circuit-breaker pause);
  then ``Wake``, so the scheduler runs it at once.
- cancel: draft | ready | sending | paused -> cancelled (finished_at set);
  queue entry completed_at=now, defer fields NULL. Pending recipients stay
  pending: a cancelled campaign is history, never resumed.
- delete: only draft, paused, sent, completed_with_errors or cancelled, and
  only while no campaign actor holds the campaign (one may still be finishing
  the batch it had when the campaign was paused or cancelled). A sending
  campaign is never deleted: ``campaign_sending`` tells to pause or cancel it
  first; a ready one must be cancelled (or paused) first.

Each runs in one transaction holding the campaign's locks (``ApiStore.locked``)
and writes its audit row there; the event is published after the commit.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import msgspec

from mailer.accounts import Account, accounts_of
from mailer.api.context import EDITABLE, ApiContext, Caller, check_message, require_owner
from mailer.api.outlook import queue_outlook, reevaluate_deferrals, with_estimate
from mailer.apistore import Locked
from mailer.errors import Conflict, Forbidden, NotFound, ValidationFailed
from mailer.messages import (
    CampaignCreate,
    CampaignDeleted,
    CampaignList,
    CampaignPage,
    CampaignRef,
    CampaignStart,
    CampaignUpdate,
    CampaignView,
    StartReply,
    StartWarning,
    Wake,
)
from mailer.rules import working_days_between
from mailer.store import CampaignRow
from mailer.texts import reason_values, text

__all__ = [
    "cancel",
    "create",
    "delete",
    "get",
    "list_campaigns",
    "pause",
    "resume",
    "start",
    "unschedule",
    "update",
]

PAUSABLE = ("ready", "sending")
# A scheduled start further ahead is more likely a typo than a plan.
MAX_SCHEDULE_AHEAD = timedelta(days=366)
CANCELLABLE = ("draft", "ready", "sending", "paused")
DELETABLE = ("draft", "paused", "sent", "completed_with_errors", "cancelled")


def check_accounts(ctx: ApiContext, account: str | None, backup: str | None) -> None:
    """The accounts a campaign names are configured, and its backup is another one."""
    accounts = accounts_of(ctx.settings)
    for field, name in (("account", account), ("backup_account", backup)):
        if name is not None and accounts.find(name) is None:
            raise ValidationFailed(
                "unknown_account", field=field, account=name, accounts=", ".join(accounts.names)
            )
    if backup is not None and accounts.get(backup) == accounts.get(account):
        raise ValidationFailed(
            "validation_error", text_key="backup_is_account", field="backup_account", account=backup
        )


async def create(ctx: ApiContext, caller: Caller, req: CampaignCreate) -> CampaignView:
    check_message(
        ctx.settings, subject=req.subject, body_text=req.body_text, body_html=req.body_html
    )
    check_accounts(ctx, req.account, req.backup_account)
    row = await ctx.store.create_campaign(
        owner_id=caller.user,
        name=req.name,
        subject=req.subject,
        body_text=req.body_text,
        body_html=req.body_html,
        priority=req.priority,
        now=ctx.clock.now(),
        account=req.account,
        backup_account=req.backup_account,
    )
    return await _view(ctx, row.id)


async def get(ctx: ApiContext, caller: Caller, req: CampaignRef) -> CampaignView:
    return await with_estimate(ctx, await ctx.own(caller, req.campaign_id))


async def update(ctx: ApiContext, caller: Caller, req: CampaignUpdate) -> CampaignView:
    fields = ("name", "subject", "body_text", "body_html", "priority", "account", "backup_account")
    changes = sorted(f for f in fields if getattr(req, f) is not msgspec.UNSET)
    if not changes:
        raise ValidationFailed("validation_error", text_key="nothing_to_update")
    now = ctx.clock.now()

    async def change(tx: Locked) -> None:
        c = _locked(tx, caller, req.campaign_id)
        if c.status not in EDITABLE:
            raise Conflict(status=c.status)
        name = c.name if isinstance(req.name, msgspec.UnsetType) else req.name
        subject = c.subject if isinstance(req.subject, msgspec.UnsetType) else req.subject
        body_text = c.body_text if isinstance(req.body_text, msgspec.UnsetType) else req.body_text
        body_html = c.body_html if isinstance(req.body_html, msgspec.UnsetType) else req.body_html
        priority = c.priority if isinstance(req.priority, msgspec.UnsetType) else req.priority
        account = c.smtp_account if isinstance(req.account, msgspec.UnsetType) else req.account
        backup = (
            c.backup_account
            if isinstance(req.backup_account, msgspec.UnsetType)
            else req.backup_account
        )
        check_message(ctx.settings, subject=subject, body_text=body_text, body_html=body_html)
        if account != c.smtp_account or backup != c.backup_account:
            # Checked when they change: a campaign kept as it was is not refused for
            # an account the configuration dropped since (its actor pauses it).
            check_accounts(ctx, account, backup)
        await tx.update(
            name=name,
            subject=subject,
            body_text=body_text,
            body_html=body_html,
            priority=priority,
            now=now,
            account=account,
            backup_account=backup,
        )
        await tx.audit(caller.user, "campaign.update", {"fields": changes}, now)

    await ctx.db.locked(req.campaign_id, change)
    return await _view(ctx, req.campaign_id)


async def list_campaigns(ctx: ApiContext, caller: Caller, req: CampaignList) -> CampaignPage:
    owner = req.owner_id
    if not caller.is_admin:
        # A manager lists their own; only an admin sees everyone's (owner_id omitted).
        if owner is not None and owner != caller.user:
            raise Forbidden(text_key="forbidden_other_owner")
        owner = caller.user
    items = await ctx.db.list_campaigns(
        owner_id=owner, statuses=req.status, cursor=req.cursor, limit=req.limit + 1
    )
    more = len(items) > req.limit
    items = items[: req.limit]
    return CampaignPage(items=items, next_cursor=items[-1].id if more else None)


async def delete(ctx: ApiContext, caller: Caller, req: CampaignRef) -> CampaignDeleted:
    now = ctx.clock.now()
    owner = ""

    async def change(tx: Locked) -> None:
        nonlocal owner
        c = _locked(tx, caller, req.campaign_id)
        owner = c.owner_id
        if c.status == "sending":
            raise Conflict("campaign_sending", status=c.status)
        if c.status not in DELETABLE:
            raise Conflict(status=c.status)
        if tx.lease_until is not None and tx.lease_until > now:
            raise Conflict("campaign_busy", status=c.status)
        # The audit row outlives the campaign (its campaign_id becomes NULL),
        # so the id and name go into the details.
        await tx.audit(
            caller.user,
            "campaign.delete",
            {"campaign_id": c.id, "name": c.name, "status": c.status},
            now,
        )
        await tx.delete()

    await ctx.db.locked(req.campaign_id, change, for_delete=True)
    await ctx.emit("deleted", campaign_id=req.campaign_id, owner_id=owner, status="deleted", at=now)
    return CampaignDeleted(campaign_id=req.campaign_id, deleted=True)


async def start(ctx: ApiContext, caller: Caller, req: CampaignStart) -> StartReply:
    """Queues a draft now, or for ``send_at``: every check (size, rendering, the start
    throttle) is made when it is scheduled, and the queue entry waits with reason
    ``scheduled`` until then (the scheduler's timer; no polling)."""
    s = ctx.settings
    send_at = _send_at(req.send_at, ctx.clock.now())
    view = await ctx.own(caller, req.campaign_id)
    if view.status != "draft":
        raise Conflict(status=view.status)
    total = sum(view.counts.values())
    if total > s.max_campaign_recipients:
        raise ValidationFailed("too_many_recipients", count=total, limit=s.max_campaign_recipients)
    if view.counts.get("pending", 0) == 0:
        raise ValidationFailed("empty_campaign")
    await _check_renderable(ctx, req.campaign_id)
    now = ctx.clock.now()
    # Counted only once the request is known to be startable: a refused start
    # (empty, too large, wrong state) does not use up the manager's hour.
    slot = await ctx.start_throttle.check(caller.user, now)
    row = await ctx.store.start(
        req.campaign_id, actor_id=caller.user, now=now, allowed_from=["draft"], send_at=send_at
    )
    if row is None:  # lost a race with another start, a cancel or a delete
        await ctx.start_throttle.give_back(caller.user, slot)
        current = await ctx.store.view(req.campaign_id)
        if current is None:
            raise NotFound(campaign_id=req.campaign_id)
        raise Conflict(status=current.status)
    warnings = await _start_warnings(ctx, caller, req.campaign_id, total, send_at)
    await _wake(ctx, req.campaign_id)
    await ctx.emit("queued", campaign_id=row.id, owner_id=row.owner_id, status="ready", at=now)
    return StartReply(campaign=await _view(ctx, req.campaign_id), warnings=warnings)


def _send_at(send_at: datetime | None, now: datetime) -> datetime | None:
    """The time to wait for, or None to start now (no time, or one not in the future)."""
    if send_at is None:
        return None
    if send_at.tzinfo is None:
        raise ValidationFailed(text_key="send_at_invalid", reason="no time zone offset")
    if send_at <= now:
        return None
    if send_at - now > MAX_SCHEDULE_AHEAD:
        raise ValidationFailed(
            text_key="send_at_invalid", reason=f"more than {MAX_SCHEDULE_AHEAD.days} days ahead"
        )
    return send_at


async def unschedule(ctx: ApiContext, caller: Caller, req: CampaignRef) -> CampaignView:
    """A scheduled campaign that has not started yet goes back to ``draft``."""
    now = ctx.clock.now()

    async def change(tx: Locked) -> str:
        c = _locked(tx, caller, req.campaign_id)
        at = await tx.unschedule_queue(now) if c.status == "ready" else None
        if at is None:
            raise Conflict("not_scheduled", status=c.status)
        await tx.set_status("draft", now)
        await tx.audit(caller.user, "campaign.unschedule", {"send_at": at.isoformat()}, now)
        await tx.audit(caller.user, "campaign.status", {"from": "ready", "to": "draft"}, now)
        return c.owner_id

    owner = await ctx.db.locked(req.campaign_id, change)
    await ctx.emit(
        "unscheduled", campaign_id=req.campaign_id, owner_id=owner, status="draft", at=now
    )
    return await _view(ctx, req.campaign_id)


async def pause(ctx: ApiContext, caller: Caller, req: CampaignRef) -> CampaignView:
    now = ctx.clock.now()

    async def change(tx: Locked) -> str:
        c = _locked(tx, caller, req.campaign_id)
        if c.status not in PAUSABLE:
            raise Conflict(status=c.status)
        await tx.set_status("paused", now)
        await tx.pause_queue()
        await tx.audit(caller.user, "campaign.pause", {}, now)
        await tx.audit(caller.user, "campaign.status", {"from": c.status, "to": "paused"}, now)
        return c.owner_id

    owner = await ctx.db.locked(req.campaign_id, change)
    await ctx.emit("paused", campaign_id=req.campaign_id, owner_id=owner, status="paused", at=now)
    # Campaigns waiting for its turn may go sooner now: their waits are decided again.
    await reevaluate_deferrals(ctx)
    return await _view(ctx, req.campaign_id)


async def resume(ctx: ApiContext, caller: Caller, req: CampaignRef) -> CampaignView:
    await ctx.own(caller, req.campaign_id)
    # A campaign paused because its message could not be built stays paused
    # until it can be: resuming it as it is would only pause it again.
    await _check_renderable(ctx, req.campaign_id)
    now = ctx.clock.now()

    async def change(tx: Locked) -> str:
        c = _locked(tx, caller, req.campaign_id)
        if c.status != "paused":
            raise Conflict(status=c.status)
        await tx.set_status("ready", now)
        await tx.resume_queue()
        await tx.audit(caller.user, "campaign.resume", {}, now)
        await tx.audit(caller.user, "campaign.status", {"from": "paused", "to": "ready"}, now)
        return c.owner_id

    owner = await ctx.db.locked(req.campaign_id, change)
    await _wake(ctx, req.campaign_id)
    await ctx.emit("resumed", campaign_id=req.campaign_id, owner_id=owner, status="ready", at=now)
    return await _view(ctx, req.campaign_id)


async def cancel(ctx: ApiContext, caller: Caller, req: CampaignRef) -> CampaignView:
    now = ctx.clock.now()

    async def change(tx: Locked) -> str:
        c = _locked(tx, caller, req.campaign_id)
        if c.status not in CANCELLABLE:
            raise Conflict(status=c.status)
        await tx.set_status("cancelled", now)
        await tx.cancel_queue(now)
        await tx.audit(caller.user, "campaign.cancel", {}, now)
        await tx.audit(caller.user, "campaign.status", {"from": c.status, "to": "cancelled"}, now)
        return c.owner_id

    owner = await ctx.db.locked(req.campaign_id, change)
    await ctx.emit(
        "cancelled", campaign_id=req.campaign_id, owner_id=owner, status="cancelled", at=now
    )
    await reevaluate_deferrals(ctx)  # as after a pause: its turn goes to the others
    return await _view(ctx, req.campaign_id)


# --- helpers ---------------------------------------------------------------------------------


def _locked(tx: Locked, caller: Caller, campaign_id: int) -> CampaignRow:
    if tx.campaign is None:
        raise NotFound(campaign_id=campaign_id)
    require_owner(caller, tx.campaign.owner_id)
    return tx.campaign


async def _view(ctx: ApiContext, campaign_id: int) -> CampaignView:
    view = await ctx.store.view(campaign_id)
    if view is None:  # deleted between the change and this read
        raise NotFound(campaign_id=campaign_id)
    return view


async def _check_renderable(ctx: ApiContext, campaign_id: int) -> None:
    """The whole message as the campaign actor will build it, attachments included."""
    row = await ctx.store.get_campaign(campaign_id)
    if row is None:
        raise NotFound(campaign_id=campaign_id)
    # Its accounts too: one the configuration dropped since would pause it at once.
    check_accounts(ctx, row.smtp_account, row.backup_account)
    attachments = await ctx.store.attachments(campaign_id)
    check_message(
        ctx.settings,
        subject=row.subject,
        body_text=row.body_text,
        body_html=row.body_html,
        attachments=[(a.filename, a.content_type, a.content) for a in attachments],
    )


async def _account_of(ctx: ApiContext, campaign_id: int) -> Account:
    """The SMTP account a campaign goes through (checked at start: configured)."""
    row = await ctx.store.get_campaign(campaign_id)
    accounts = accounts_of(ctx.settings)
    found = accounts.find(row.smtp_account if row is not None else None)
    return found if found is not None else accounts.default


async def _wake(ctx: ApiContext, campaign_id: int) -> None:
    # Every process's scheduler listens; the leader picks the campaign up now
    # instead of at its next timer.
    await ctx.bus.publish(
        ctx.bus.subject("internal", "scheduler", "wake"), Wake(campaign_id=campaign_id)
    )


async def _large_campaign_message(ctx: ApiContext, campaign_id: int, total: int, lang: str) -> str:
    """How long a large campaign takes, from the forecast: working hours, days
    and every other limit counted (the issue: "about 100 h" for 10 000 at
    100/h, when 9 working hours a day make it more than 11 working days)."""
    now = ctx.clock.now()
    outlook = (await queue_outlook(ctx)).get(campaign_id)
    account = await _account_of(ctx, campaign_id)
    base: dict[str, object] = {"count": total, "rate": account.rate_per_hour}
    if outlook is None or outlook.completes_at is None:
        return text("warning_large_campaign_unknown", lang, **base)
    done = outlook.completes_at
    days = working_days_between(ctx.hours, outlook.starts_at or now, done)
    if days <= 1:
        hours = max(1, math.ceil((done - now).total_seconds() / 3600))
        return text("warning_large_campaign", lang, hours=hours, **base)
    until = done.astimezone(ctx.hours.tz).strftime("%d.%m")
    return text("warning_large_campaign_days", lang, days=days, until=until, **base)


async def _start_warnings(
    ctx: ApiContext,
    caller: Caller,
    campaign_id: int,
    total: int,
    send_at: datetime | None = None,
) -> list[StartWarning]:
    """Accepted, but the manager should know it will not (all) go out now (or, for a
    scheduled start, at ``send_at``)."""
    s, now, lang = ctx.settings, ctx.clock.now(), caller.lang
    warnings: list[StartWarning] = []
    # The quota of the account it goes through.
    quota = await ctx.db.quota((await _account_of(ctx, campaign_id)).key)
    if quota is not None and quota.emails_available == 0:
        warnings.append(
            StartWarning(code="quota_exhausted", message=text("warning_quota_exhausted", lang))
        )
    at = send_at or now
    if not ctx.hours.is_open(at):
        opens = ctx.hours.next_open(at)
        values = reason_values(s, until=opens, now=now, lang=lang)
        key = "warning_outside_hours" if send_at is None else "warning_scheduled_outside_hours"
        message = text(key, lang, **values)
        warnings.append(StartWarning(code="outside_hours", message=message))
    if total > s.large_campaign_warning:
        message = await _large_campaign_message(ctx, campaign_id, total, lang)
        warnings.append(StartWarning(code="large_campaign", message=message))
    return warnings
